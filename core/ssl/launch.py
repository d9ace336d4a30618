"""Process-group setup for `dinodist train`: N local ranks (spawned, gloo on 127.0.0.1) or under torchrun.

A rank that fails with a `DinodistError` reports the one-line message to the parent, which re-raises it;
once one rank has failed the others get a short grace period (they are usually blocked in a collective)
and are then terminated.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinodist.core.errors import DinodistError
from dinodist.core.net import free_port

# An SSL rank may wait in a collective for minutes (a checkpoint save, a slow rank's data loading).
TIMEOUT_S = 600.0


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _child(rank: int, world: int, port: int, errors, fn: Callable, args: tuple, timeout_s: float) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        fn(*args)
    except DinodistError as exc:
        errors.put((rank, str(exc)))
        raise SystemExit(2) from None
    except BaseException as exc:  # noqa: BLE001 - any failure must reach the parent as one line
        last = traceback.format_exc().strip().splitlines()[-1]
        errors.put((rank, f"rank {rank} failed: {last}"))
        raise SystemExit(1) from exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any], nproc: int, args: tuple = (), timeout_s: float = TIMEOUT_S, grace_s: float = 5.0
) -> None:
    """Run fn(*args) on `nproc` local ranks (gloo, 127.0.0.1, a free port); raise the first rank's error."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, nproc, port, errors, fn, args, timeout_s), daemon=False)
        for r in range(nproc)
    ]
    for p in procs:
        p.start()
    failed_at = None
    while any(p.is_alive() for p in procs):
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        time.sleep(0.05)
    for p in procs:
        p.join()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    if msgs:
        raise DinodistError(sorted(msgs)[0][1])
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise DinodistError(f"rank {bad[0][0]} exited with code {bad[0][1]}")
