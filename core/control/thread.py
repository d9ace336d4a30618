"""A rank's control-plane client in a thread of its own.

The training loop can block for long (a collective, a receive from a slow teacher, loading a
checkpoint); heartbeats from this thread keep saying "the process is alive" meanwhile. Stats
travel through a queue, and commands come back through `report()`'s return value, so the loop
never touches the socket.
"""

from __future__ import annotations

import queue
import threading

from dinodist.core.control.client import ControlClient


class ControlThread:
    """Owns one `ControlClient`: registers, heartbeats every `heartbeat_interval_s`, relays commands."""

    def __init__(self, addr: str, rank: int, group: str, role: str, secret: bytes | str | None,
                 register_kw: dict, heartbeat_interval_s: float) -> None:
        self._stats: queue.SimpleQueue = queue.SimpleQueue()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._final: tuple[str, str] | None = None
        self._args = (addr, rank, group, role, secret, register_kw, heartbeat_interval_s)
        self._thread = threading.Thread(target=self._loop, name="dinodist-control-client", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        addr, rank, group, role, secret, register_kw, interval = self._args
        client = ControlClient(addr, rank, group, role=role, secret=secret, heartbeat_interval_s=interval)
        try:
            client.register(**register_kw)
            while not self._stop.is_set():
                sent = False
                while not self._stats.empty():
                    client.heartbeat(self._stats.get())
                    sent = True
                if not sent:
                    client.heartbeat()
                cmd = client.poll_command(timeout_ms=100)
                if cmd is not None:
                    self._commands.put(cmd)
            while not self._stats.empty():
                client.heartbeat(self._stats.get())
            if self._final is not None:
                kind, message = self._final
                if kind == "done":
                    client.done({})
                else:
                    client.error(message)
        finally:
            client.close()

    def report(self, stats: dict) -> str | None:
        """Queue one iteration's stats; returns a pending command ("stop", "checkpoint") or None."""
        self._stats.put(stats)
        return None if self._commands.empty() else self._commands.get()

    def close(self, kind: str = "done", message: str = "") -> None:
        """Send the final `done` (or `error` with `message`) and stop the thread."""
        self._final = (kind, message)
        self._stop.set()
        self._thread.join(timeout=5)
