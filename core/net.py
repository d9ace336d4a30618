"""Sockets without torch: the local launcher (a driver module) picks rendezvous ports here."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that was free a moment ago (the OS picks it; races are unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
