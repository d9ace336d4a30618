from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import pytest
import torch
import torch.distributed as dist

# Tests run on a 2-core machine, often beside other processes: one intra-op thread per process
# keeps multi-process tests from oversubscribing and keeps timings stable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------------ the `multiproc` marker
# `pytest -m "not multiproc"` is the fast inner loop, so every test that starts a process (a rank,
# a CLI run, a spawned gloo group) must carry the marker. Rather than trust that by reading, a test
# that starts a process without it fails here, naming itself.

_running: dict[str, pytest.Item | None] = {"item": None}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running["item"] = item  # module fixtures set up within the first test's protocol count as it
    yield
    _running["item"] = None


def _refuse_unmarked(what: str) -> None:
    item = _running["item"]
    if item is not None and item.get_closest_marker("multiproc") is None:
        raise RuntimeError(f"{item.nodeid} starts a process ({what}) but is not marked "
                           "@pytest.mark.multiproc")


def _guard(cls: type, method: str, what: str) -> None:
    original = getattr(cls, method)

    def guarded(self, *args, **kwargs):
        _refuse_unmarked(what)
        return original(self, *args, **kwargs)

    setattr(cls, method, guarded)


_guard(subprocess.Popen, "__init__", "subprocess")
_guard(multiprocessing.process.BaseProcess, "start", "multiprocessing")


@pytest.fixture(scope="module")
def world():
    """A one-rank gloo world in this process (FSDP2 needs a process group; no process is started)."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
