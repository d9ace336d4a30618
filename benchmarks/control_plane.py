"""Control-plane overhead, side by side in one run: what a heartbeat costs the training loop, and how many
heartbeats per second the orchestrator can take (every message HMAC-signed), with and without metrics.

    python benchmarks/control_plane.py [--n 5000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402

from dinodist.core.control.client import ControlClient  # noqa: E402
from dinodist.orchestrator.control import ControlServer  # noqa: E402
from dinodist.orchestrator.metrics import MetricsExporter  # noqa: E402

SECRET = b"benchmark-secret-0123456789abcdef"


def stats(it: int) -> dict:
    return {"iteration": it, "step_seconds": 0.05, "wait_seconds": 0.01, "images": 32,
            "losses": {"dino_local_crops_loss": 1.0, "dino_global_crops_loss": 1.0, "ibot_loss": 1.0,
                       "koleo_loss": -0.1}}


def client_cost(n: int, interval: float) -> float:
    """Microseconds per heartbeat() call (every message HMAC-signed), the server polling in its thread."""
    with ControlServer(secret=SECRET).start() as srv:
        with ControlClient(srv.address, 0, "vits", key=srv.rank_key(0, "vits"), heartbeat_interval_s=interval,
                           sndhwm=n + 10) as c:
            c.register()
            t0 = time.perf_counter()
            for it in range(n):
                c.heartbeat(stats(it))
            return (time.perf_counter() - t0) / n * 1e6


def server_rate(n: int, metrics: bool) -> float:
    """Heartbeats per second the server verifies (and feeds to the exporter), queue pre-filled."""
    ex = MetricsExporter(port=None) if metrics else None
    with ControlServer(secret=SECRET, on_message=ex.observe_message if ex else None) as srv:
        srv._sock.setsockopt(zmq.RCVHWM, n + 10)  # keep the whole pre-filled queue
        with ControlClient(srv.address, 0, "vits", key=srv.rank_key(0, "vits"), heartbeat_interval_s=0,
                           sndhwm=n + 10) as c:
            c.register()
            while srv.poll(0.05) == 0:
                pass
            for it in range(n):
                c.heartbeat(stats(it))
            time.sleep(0.5)  # let zmq move the queue to the server side
            done, t0 = 0, time.perf_counter()
            while done < n:
                done += srv.poll(0.1)
            return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    n = p.parse_args().n
    send = client_cost(n, 0.0)
    fold_only = client_cost(n, 60.0)
    print(f"client heartbeat() that sends (signed)  : {send:7.1f} us/call")
    print(f"client heartbeat() not due (fold stats) : {fold_only:7.1f} us/call  (x{fold_only / send:.2f})")
    for it_s in (0.05, 1.0):
        print(f"  share of a {it_s:g} s iteration, sending every iteration: {send * 1e-6 / it_s:.2e}")
    base = server_rate(n, False)
    with_metrics = server_rate(n, True)
    print(f"server, verify only      : {base:9.0f} heartbeats/s")
    print(f"server, verify + metrics : {with_metrics:9.0f} heartbeats/s  (x{with_metrics / base:.2f})")


if __name__ == "__main__":
    main()
