"""A rank's control-plane client in a thread of its own.

The training loop can block for long (a collective, a receive from a slow teacher, loading a
checkpoint); heartbeats from this thread keep saying "the process is alive" meanwhile. Stats
travel through a queue, and commands come back through `report()`'s return value, so the loop
never touches the socket. With `cuda_device`, this thread also samples that GPU through NVML
once per heartbeat interval (core/control/telemetry.py), off the training loop's path.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from dinodist.core.control import messages as m
from dinodist.core.control.client import ControlClient, rank_key_from_env
from dinodist.core.control.telemetry import GpuSampler


class ControlThread:
    """Owns one `ControlClient`: registers, heartbeats every `heartbeat_interval_s`, relays commands.

    The rank signs with `key`, else with the key derived from the job `secret`, else with the key
    in $DINODIST_CONTROL_KEY. `cuda_device`: the CUDA ordinal this rank trains on (None on CPU).
    """

    def __init__(self, addr: str, rank: int, group: str, role: str, secret: bytes | str | None,
                 register_kw: dict, heartbeat_interval_s: float, *, key: bytes | None = None,
                 cuda_device: int | None = None) -> None:
        # Resolved here, in the rank's own thread, so that a missing key is an error the rank reports
        # instead of a control thread dying unseen.
        if key is None:
            key = (m.rank_key(m.check_secret(secret), rank, group) if secret
                   else rank_key_from_env(rank, group))
        self._stats: queue.SimpleQueue = queue.SimpleQueue()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._final: tuple[str, str] | None = None
        self._args = (addr, rank, group, role, key, register_kw, heartbeat_interval_s, cuda_device)
        self._thread = threading.Thread(target=self._loop, name="dinodist-control-client", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        addr, rank, group, role, key, register_kw, interval, cuda_device = self._args
        client = ControlClient(addr, rank, group, role=role, key=key, heartbeat_interval_s=interval)
        sampler = GpuSampler.open(cuda_device) if cuda_device is not None else None
        next_sample = 0.0
        try:
            client.register(**register_kw)
            while not self._stop.is_set():
                gauges: dict[str, Any] = {}
                if sampler is not None and time.monotonic() >= next_sample:
                    gauges = sampler.sample()
                    next_sample = time.monotonic() + interval
                sent = False
                while not self._stats.empty():
                    client.heartbeat({**self._stats.get(), **gauges})
                    gauges = {}
                    sent = True
                if not sent:
                    client.heartbeat(gauges)
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
            if sampler is not None:
                sampler.close()
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
