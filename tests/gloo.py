"""Run a function on N spawned gloo ranks inside a test, with a timeout and the ranks' tracebacks on failure.

    run_gloo(_check, world=2, tmp_path=tmp_path)          # calls _check(rank) on every rank

`fn` must be a module-level function (spawned children import it by name). Each rank joins a
127.0.0.1 world, runs `fn(rank, *args)`, meets the others at a barrier and leaves; a rank that
raises writes its traceback, and the test fails with all of them.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinodist.core.net import free_port


def _rank(rank: int, world: int, port: int, errors: str, timeout_s: float, fn: Callable, args: tuple) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        fn(rank, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(errors, f"err.{rank}").write_text(traceback.format_exc())
        raise
    # the rank's work is checked and done: skip interpreter teardown, where a C++ thread left joinable
    # (seen once on a fresh CI machine: "terminate called without an active exception") aborts a rank
    # that had passed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo(fn: Callable, world: int, tmp_path: Path, *args, timeout_s: float = 60.0) -> None:
    errors = tmp_path / "gloo-errors"
    errors.mkdir(exist_ok=True)
    ctx = mp.start_processes(_rank, args=(world, free_port(), str(errors), timeout_s, fn, args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__}: {world} gloo ranks did not finish within {timeout_s:g} s")
    except mp.ProcessRaisedException:
        pytest.fail("\n".join(p.read_text() for p in sorted(errors.glob("err.*"))))
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
