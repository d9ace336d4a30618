"""BatchLoader worker processes: the in-process path's batches, errors and dead workers as one line."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from dinodist.core.data import BatchLoader, CropConfig
from dinodist.core.errors import DinodistError

CFG = CropConfig(global_size=32, local_size=16, n_local=2, gram_size=16)


def _images(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 40 + 3 * i, 48 - 2 * i), dtype=torch.uint8, generator=gen)
            for i in range(n)]


class ListSource:
    """In-memory images; module level so spawned workers can unpickle it."""

    name = "list"

    def __init__(self, images: list[torch.Tensor], broken: dict[int, str] | None = None):
        self.images = images
        self.broken = broken or {}

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> torch.Tensor:
        if self.broken.get(i) == "dinodist":
            raise DinodistError(f"list: cannot read sample {i} after 4 attempts")
        if self.broken.get(i) == "odd":
            raise OddError("sample", i)
        return self.images[i]

    def label(self, i: int) -> int:
        return i % 3


class OddError(Exception):
    """Does not survive pickling (two required arguments): the loader must still raise one line."""

    def __init__(self, what: str, i: int):
        super().__init__(f"{what} {i} is odd")


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if torch.is_tensor(v):
            assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_worker_batches_are_bit_identical_to_in_process_ones():
    src = ListSource(_images(7))
    args = (src, CFG, 6, 11, slice(1, 5), 8)
    with BatchLoader(*args, workers=0) as plain, BatchLoader(*args, workers=2) as procs:
        assert procs.workers == 2 and procs.prefetch == 2 and plain.workers == 0
        # in order, then a replay (resume) and a jump ahead: stale prefetched work is dropped
        for t in [0, 1, 2, 3, 4, 2, 3, 9, 10, 1]:
            _same(plain.get(t), procs.get(t))


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_worker_errors_reach_the_rank_as_raised_and_a_dead_worker_is_one_line():
    n, g, seed = 6, 2, 5
    from dinodist.core.data.sampler import global_batch

    first = {t: int(global_batch(t, g, n, seed)[0][0]) for t in range(40)}
    bad_t = next(t for t in range(1, 40) if first[t] not in {first[0]} and t % 2 == 1)
    odd_t = next(t for t in range(bad_t + 1, 40)
                 if first[t] not in {first[0], first[bad_t]} and t % 2 == 0)
    broken = {first[bad_t]: "dinodist", first[odd_t]: "odd"}
    src = ListSource(_images(n), broken)
    with BatchLoader(src, CFG, g, seed, slice(0, g), 8, workers=2, uint8=True) as ld:
        got = ld.get(0)  # uint8 crops from a worker, as they are built here
        assert got["collated_global_crops"].dtype == torch.uint8
        _same(got, ld.build(0))
        for _ in range(2):  # asked again: the same error, no hang
            with pytest.raises(DinodistError, match=f"cannot read sample {first[bad_t]} ") as err:
                ld.get(bad_t)
            assert type(err.value) is DinodistError
        with pytest.raises(DinodistError, match=f"iteration {odd_t}: OddError: sample {first[odd_t]} is odd"):
            ld.get(odd_t)
        # a worker killed under the rank (OOM killer): the batches it owed end in one line, no hang
        proc = ld._workers.procs[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        clean = [t for t in range(odd_t + 1, 200)
                 if not set(global_batch(t, g, n, seed)[0].tolist()) & broken.keys()]
        with pytest.raises(DinodistError, match=rf"process 1 \(pid {proc.pid}\) exited with code -9"):
            for t in clean[:8]:
                ld.get(t)


def test_owns_builds_ahead_only_the_loaders_own_iterations():
    src = ListSource(_images(7))
    args = (src, CFG, 6, 11, slice(0, 6), 8)
    evens = BatchLoader(*args, prefetch=3, owns=lambda t: t % 2 == 0)
    plain = BatchLoader(*args, prefetch=0)
    try:
        assert evens._ahead(0) == [2, 4, 6]
        evens.get(0)
        assert sorted(evens._futures) == [2, 4, 6]  # nothing built for the other loader's iterations
        _same(evens.get(4), plain.get(4))  # a served iteration is the same batch, prefetched or not
        assert sorted(evens._futures) == [6, 8, 10]  # 2 was skipped over: dropped, not kept
        # a loader serving (almost) nothing scans a bounded window, not for ever
        assert BatchLoader(*args, prefetch=2, owns=lambda t: False)._ahead(0) == []
    finally:
        evens.close()
        plain.close()
