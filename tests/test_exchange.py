"""Row exchange between teacher ranks and student ranks (core.targets) over gloo on random tensors."""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinodist.core.errors import DinodistError
from dinodist.core.net import free_port
from dinodist.core.targets import (
    HEADS,
    ExchangePlan,
    P2PTargetSource,
    TargetDims,
    Targets,
    concat,
    crop_major,
    ibot_counts,
    post_recv_block,
    recv_last_layers,
    send_block,
    send_last_layers,
    send_targets,
    wait_block,
)

G, P, DB, DI = 12, 9, 5, 3
DIMS = TargetDims(HEADS, dino_dim=DB, ibot_dim=DI)


def _truth(iteration: int) -> tuple[Targets, torch.Tensor]:
    """The targets of the whole global batch, as a single teacher would compute them."""
    g = torch.Generator().manual_seed(1000 + iteration)
    masks = torch.rand(G, 2, P, generator=g) < torch.rand(G, 2, 1, generator=g)  # variable counts, some zero
    n = int(masks.sum())
    tensors = {
        "dino": torch.randn(G, 2, DB, generator=g),
        "ibot": torch.randn(n, DI, generator=g),
        "ibot_counts": ibot_counts(masks),
    }
    return Targets(HEADS, iteration, 0, G, tensors), masks


def _world(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from dinodist.core.distributed import destroy, init_from_env

    try:
        init_from_env("gloo", timeout_s=30)
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    destroy()


def _spawn(fn, world: int, args=(), timeout: float = 60.0) -> list[int]:
    # fork: the children reuse the parent's imported torch (seconds saved per rank on 2 cores);
    # safe here because the parent never initialises a process group
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_world, args=(r, world, port, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _exchange_worker(rank: int, teachers: list[int], groups: dict, iterations: int, depth: int,
                     header_channel: bool = False) -> None:
    plan = ExchangePlan(G, teachers, groups)
    # the NCCL layout: headers over a gloo group of the whole world, payloads on the default group
    hg = dist.new_group(backend="gloo") if header_channel else None
    cpu = torch.device("cpu")
    shapes = {"dino_last_layer.weight": (7, DB), "ibot_last_layer.weight": (4, DI)}
    students = [r for ranks in groups.values() for r in ranks]
    if rank in teachers:
        if rank == teachers[0]:
            g = torch.Generator().manual_seed(7)
            send_last_layers({k: torch.randn(*s, generator=g) for k, s in shapes.items()}, students, cpu)
        a, b = plan.teacher_rows(rank)
        in_flight: list[list] = []
        for it in range(iterations):
            truth, _ = _truth(it)
            works, nbytes = send_targets(plan, rank, truth.slice(a, b), cpu, header_group=hg)
            assert nbytes > 0 or not plan.sends(rank)
            in_flight.append(works)
            while len(in_flight) > depth:  # the bounded queue the teacher loop uses
                for w in in_flight.pop(0):
                    w.wait()
        for works in in_flight:
            for w in works:
                w.wait()
        # the store gather: the second teacher rank's block of the last iteration to the first
        last_truth = _truth(iterations - 1)[0]
        if rank == teachers[1]:
            for w in send_block(last_truth.slice(a, b), teachers[0], cpu, header_group=hg):
                w.wait()
        elif len(teachers) > 1:
            c, d = plan.teacher_rows(teachers[1])
            got = wait_block(post_recv_block(DIMS, teachers[1], iterations - 1, c, d,
                                             last_truth.slice(c, d).tensors["ibot_counts"], cpu,
                                             header_group=hg))
            for k, v in last_truth.slice(c, d).tensors.items():
                assert torch.equal(got.tensors[k], v), k
        return
    last = recv_last_layers(shapes, teachers[0], cpu)
    g = torch.Generator().manual_seed(7)
    for k in sorted(shapes):
        assert torch.equal(last[k], torch.randn(*shapes[k], generator=g)), k
    a, b = plan.student_rows(rank)
    source = P2PTargetSource(plan, rank, DIMS, range(iterations), lambda it: ibot_counts(_truth(it)[1][a:b]),
                             cpu, depth=depth, header_group=hg)
    for it in range(iterations):
        got = source.get(it)
        want = _truth(it)[0].slice(a, b)
        assert (got.start, got.stop, got.iteration) == (a, b, it)
        for k in want.tensors:
            assert torch.equal(got.tensors[k], want.tensors[k]), (rank, it, k)
    def wire_bytes(i: int, t) -> int:
        masked = int(_truth(i)[0].slice(t.start, t.stop).tensors["ibot_counts"].sum())
        return (5 + 2 * (t.stop - t.start)) * 8 + 4 * (2 * (t.stop - t.start) * DB + masked * DI)

    expected = sum(wire_bytes(i, t) for i in range(iterations) for t in plan.recvs(rank))
    assert source.bytes_received == expected


def test_plan_rows_cover_batch_exactly_once():
    plan = ExchangePlan(12, [0, 1, 2], {"a": [3, 4], "b": [5, 6, 7, 8], "c": [9]})
    for ranks in plan.student_groups.values():
        covered = []
        for r in ranks:
            rows = [i for t in plan.recvs(r) for i in range(t.start, t.stop)]
            a, b = plan.student_rows(r)
            assert rows == list(range(a, b))
            covered += rows
        assert covered == list(range(12))
    for t in plan.teacher_ranks:
        sent = sorted(i for tr in plan.sends(t) for i in range(tr.start, tr.stop))
        a, b = plan.teacher_rows(t)
        assert sent == sorted(list(range(a, b)) * 3)  # once per student group


def test_plan_rejects_indivisible_batch():
    with pytest.raises(DinodistError, match="student group 'b'.*not divisible"):
        ExchangePlan(12, [0, 1], {"a": [2, 3], "b": [4, 5, 6, 7, 8]}, even_batches=True)


def test_slice_and_concat_roundtrip():
    truth, _ = _truth(3)
    parts = [truth.slice(0, 5), truth.slice(5, 6), truth.slice(6, 12)]
    joined = concat(parts)
    for k in truth.tensors:
        assert torch.equal(joined.tensors[k], truth.tensors[k])


def test_crop_major_matches_dense_collated_order():
    truth, masks = _truth(1)
    t = truth.slice(2, 9)
    m = masks[2:9]
    # dense route: scatter the masked vectors into a full [r,2,P,Di] grid, then collate crop-major
    dense = torch.zeros(7, 2, P, DI)
    dense[m] = t.tensors["ibot"]
    collated_masks = m.transpose(0, 1).reshape(14, P)
    want_ibot = dense.transpose(0, 1).reshape(14 * P, DI)[collated_masks.flatten().nonzero().flatten()]
    got = crop_major(t, m)
    assert torch.equal(got["ibot"], want_ibot)
    assert torch.equal(got["dino"], torch.cat([t.tensors["dino"][:, 0], t.tensors["dino"][:, 1]]))


def test_crop_major_rejects_other_masks():
    truth, masks = _truth(0)
    other = masks.clone()
    other[0, 0] = ~other[0, 0]
    with pytest.raises(DinodistError, match="iteration 0: the teacher's iBOT mask counts differ"):
        crop_major(truth, other)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("header_channel", [False, True])
def test_p2p_exchange_three_groups_pipelined(header_channel):
    # 2 teacher ranks (6 rows each); group a: 3 ranks (4 rows, rank 3 straddles both teachers);
    # group b: 1 rank with the whole batch. Depth 2 keeps two iterations in flight.
    codes = _spawn(_exchange_worker, 6, ([0, 1], {"a": [2, 3, 4], "b": [5]}, 4, 2, header_channel))
    assert codes == [0] * 6


def _mismatch_worker(rank: int) -> None:
    plan = ExchangePlan(G, [0], {"a": [1]})
    cpu = torch.device("cpu")
    if rank == 0:
        truth, _ = _truth(0)
        truth.iteration = 5  # a teacher that is on another iteration than the student
        works, _ = send_targets(plan, 0, truth, cpu)
        for w in works:
            w.wait()
        return
    source = P2PTargetSource(plan, 1, DIMS, range(1), lambda it: _truth(it)[0].tensors["ibot_counts"], cpu)
    with pytest.raises(DinodistError, match="from teacher rank 0 for rank 1 do not match"):
        source.get(0)


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_p2p_header_mismatch_is_a_clear_error():
    assert _spawn(_mismatch_worker, 2) == [0, 0]


def test_store_replay_source_gives_the_rows_of_the_live_exchange(tmp_path):
    from dinodist.core.target_store import StoreReader, StoreWriter
    from dinodist.core.targets import StoreTargetSource

    manifest = {"teacher_hash": "random-init:0", "teacher_arch": "tiny-vit7b", "data_fingerprint": "x",
                "crop_config": {"global_size": 32}, "target_kind": "heads", "topology": "t",
                "global_batch_size": G}
    writer = StoreWriter(tmp_path / "store", manifest, dtype="fp32", async_write=False)
    for it in range(3):
        writer.append(it, _truth(it)[0].tensors, {"iteration": it})
    writer.close()
    source = StoreTargetSource(StoreReader(tmp_path / "store"), 4, 9)
    for it in (2, 0, 1):
        got, want = source.get(it), _truth(it)[0].slice(4, 9)
        assert (got.start, got.stop) == (4, 9)
        for k in want.tensors:
            assert torch.equal(got.tensors[k], want.tensors[k]), (it, k)


# ------------------------------------------------------------------------------ step and wait times


class _FakeEvent:
    """Stands for torch.cuda.Event on a machine without CUDA: records where and when it was recorded."""

    made: list[_FakeEvent] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.stream, self.time_ms, self.synced = None, None, False
        _FakeEvent.made.append(self)

    def record(self, stream=None) -> None:
        self.stream, self.time_ms = stream, 250.0 * len(_FakeEvent.made)

    def query(self) -> bool:
        return self.time_ms is not None

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, end: _FakeEvent) -> float:
        return end.time_ms - self.time_ms


def test_step_timer_is_the_host_clock_on_cpu_and_cuda_events_on_a_cuda_device(monkeypatch):
    from dinodist.core.targets import CudaTimer, WallTimer, step_timer

    wall = step_timer(torch.device("cpu"))
    assert isinstance(wall, WallTimer) and isinstance(step_timer("cpu"), WallTimer)
    a = wall.mark()
    b = wall.mark()
    assert wall.ready(b) and 0 <= wall.seconds(a, b) < 1
    # no CUDA here: choosing and driving the CUDA timer must not touch the device (events are mocked)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    _FakeEvent.made = []
    for device in (torch.device("cuda"), torch.device("cuda", 1), "cuda:0"):
        assert isinstance(step_timer(device), CudaTimer)
    timer = step_timer(torch.device("cuda", 1))
    start, end = timer.mark(), timer.mark()
    assert start.stream == end.stream == ("stream of", torch.device("cuda", 1))
    assert timer.ready(end) and timer.seconds(start, end) == 0.25  # milliseconds -> seconds
    assert not start.synced
    timer.wait(end)
    assert end.synced


class _LaggingTimer:
    """A device clock whose marks complete `lag` marks after they are made, as CUDA events do while the
    host runs ahead of the stream; each interval is 0.25 s per mark between its ends."""

    def __init__(self, lag: int) -> None:
        self.made, self.lag, self.waited = 0, lag, []

    def mark(self) -> int:
        self.made += 1
        return self.made

    def ready(self, mark: int) -> bool:
        return mark <= self.made - self.lag

    def wait(self, mark: int) -> None:
        self.waited.append(mark)
        self.lag = 0

    def seconds(self, start: int, end: int) -> float:
        return 0.25 * (end - start)


def test_teacher_times_come_from_its_timer_and_wait_for_the_device_without_a_sync(tmp_path, monkeypatch):
    import dinodist.teacher.run as run
    from dinodist.orchestrator.runtime.jobs import teacher_job
    from dinodist.orchestrator.topology import load_topology

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    topo = load_topology(os.path.join(root, "configs", "topologies", "cpu-small.yaml"),
                         {"train.iterations": 5, "control.on_failure": "stop"})
    timer = _LaggingTimer(lag=6)  # 4 marks per iteration: an iteration's times are known 2 iterations later
    monkeypatch.setattr(run, "step_timer", lambda device: timer)
    reported: list[tuple[int, int]] = []

    def report(stats: dict) -> None:
        reported.append((stats["iteration"], timer.made))

    totals = run.run_teacher(teacher_job(topo, tmp_path), ExchangePlan(4, [0], {}), 0, None, None,
                             torch.device("cpu"), report)
    lines = [json.loads(x) for x in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [r[0] for r in reported] == list(range(5))
    # forward: mark 1 -> 2, wait: 3 -> 4, step: 1 -> 4
    times = {(x["forward_seconds"], x["wait_seconds"], x["step_seconds"]) for x in lines}
    assert times == {(0.25, 0.25, 0.75)}
    assert (totals["iterations"], totals["wait_seconds"], totals["step_seconds"]) == (5, 1.25, 3.75)
    # iteration i is published once the device has passed it: 2 iterations later, the rest at the end
    assert [made for _, made in reported] == [12, 16, 20, 20, 20]
    assert timer.waited == [20]  # the one wait for the device: after the last iteration


def test_student_wait_seconds_come_from_its_timer(tmp_path, monkeypatch):
    import torch.distributed as dist

    import dinodist.students.run as run
    from dinodist.orchestrator.runtime.inline import run_inline

    timer = _LaggingTimer(lag=0)
    monkeypatch.setattr(run, "step_timer", lambda device: timer)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    joined = dist.is_initialized()
    try:
        run_inline(os.path.join(root, "configs", "topologies", "cpu-small.yaml"), "tiny-vits", tmp_path, 2)
    finally:
        if not joined and dist.is_initialized():
            dist.destroy_process_group()
    lines = [json.loads(x) for x in (tmp_path / "tiny-vits" / "metrics.jsonl").read_text().splitlines()]
    assert [x["wait_seconds"] for x in lines] == [0.25, 0.25] and timer.made == 4
    assert all(x["step_seconds"] > 0 for x in lines)  # the host clock, which the step's one read makes right
