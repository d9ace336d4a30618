"""The runtime runs what `dinodist plan` plans: uneven per-rank shares and chunked prototype losses.

- One row-split rule (core.rows.rank_rows) for the planner, teacher ranks and student ranks.
- Uneven exchange: a 3-rank teacher (2/3/3 rows) feeds groups whose boundaries cross its own.
- Chunked losses (train.loss_chunk_rows > 0) give the losses, gradients and parameter updates of the
  unchunked path, through the real inline loop and through the sharded student directly.
- A 3-rank student group on G = 8 rows (2/3/3) with a 2-rank teacher trains every row once per
  iteration and follows the 1-rank trajectory of the same student. KoLeo is off (koleo_weight 0) for
  that comparison: it is per rank by definition (nearest neighbours within a rank's rows), so with
  it on the 1-rank and 3-rank runs optimise different objectives; its term is still reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from dinodist.core.errors import DinodistError
from dinodist.core.net import free_port
from dinodist.core.rows import loss_scale, rank_rows
from dinodist.core.targets import (
    HEADS,
    ExchangePlan,
    P2PTargetSource,
    TargetDims,
    Targets,
    ibot_counts,
    send_targets,
)

REPO = Path(__file__).resolve().parent.parent
G = 8
ITERATIONS = 2
CHUNK = 3  # smaller than every row count below: DINO (8 rows x crops) and iBOT run in several chunks
TERMS = ("loss", "dino_global", "dino_local", "ibot", "koleo")


# ------------------------------------------------------------------------------------ row split


def test_one_row_split_rule_for_planner_and_runtime():
    from dinodist.orchestrator.allocate import rank_rows as planner_rank_rows

    for g_batch in (1, 7, 8, 13, 4096):
        for d in range(1, min(g_batch, 9) + 1):
            rows = [rank_rows(g_batch, d, r) for r in range(d)]
            assert rows == [planner_rank_rows(g_batch, d, r) for r in range(d)]
            assert [i for s in rows for i in range(s.start, s.stop)] == list(range(g_batch))
            plan = ExchangePlan(g_batch, list(range(d)), {"s": list(range(d, 2 * d))})
            assert [plan.teacher_rows(r) for r in range(d)] == [(s.start, s.stop) for s in rows]
            assert [plan.student_rows(d + r) for r in range(d)] == [(s.start, s.stop) for s in rows]
            # the loss factors of a group average to 1: the even case is the unscaled loss
            scales = [loss_scale(s.stop - s.start, d, g_batch) for s in rows]
            assert abs(sum(scales) / d - 1.0) < 1e-12
            if g_batch % d == 0:
                assert scales == [1.0] * d
    assert [s.stop - s.start for s in (rank_rows(8, 3, r) for r in range(3))] == [2, 3, 3]


def test_exchange_plan_errors_name_the_group():
    with pytest.raises(DinodistError, match="student group 'b'.*not divisible.*even_batches: false"):
        ExchangePlan(8, [0], {"a": [1, 2], "b": [3, 4, 5]}, even_batches=True)
    with pytest.raises(DinodistError, match="teacher: its 9 ranks exceed the global batch 8"):
        ExchangePlan(8, list(range(9)), {"a": [9]})
    with pytest.raises(DinodistError, match="student group 'a' has no ranks"):
        ExchangePlan(8, [0], {"a": []})


def test_uneven_plan_sends_every_row_once_per_group():
    plan = ExchangePlan(G, [0, 1, 2], {"a": [3, 4], "b": [5, 6, 7], "c": [8]})
    assert [plan.teacher_rows(r) for r in range(3)] == [(0, 2), (2, 5), (5, 8)]
    for ranks in plan.student_groups.values():
        covered = []
        for r in ranks:
            got = [i for t in plan.recvs(r) for i in range(t.start, t.stop)]
            a, b = plan.student_rows(r)
            assert got == list(range(a, b))
            covered += got
        assert covered == list(range(G))
    # group a's rank 3 owns [0, 4): it straddles teacher ranks 0 and 1
    assert [(t.src, t.start, t.stop) for t in plan.recvs(3)] == [(0, 0, 2), (1, 2, 4)]


# --------------------------------------------------------------------------- uneven P2P exchange


P, DB, DI = 6, 5, 3
DIMS = TargetDims(HEADS, dino_dim=DB, ibot_dim=DI)


def _truth(iteration: int) -> Targets:
    g = torch.Generator().manual_seed(50 + iteration)
    masks = torch.rand(G, 2, P, generator=g) < 0.5
    tensors = {"dino": torch.randn(G, 2, DB, generator=g),
               "ibot": torch.randn(int(masks.sum()), DI, generator=g), "ibot_counts": ibot_counts(masks)}
    return Targets(HEADS, iteration, 0, G, tensors)


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


def _spawn(fn, world: int, args=(), timeout: float = 60.0) -> list[int | None]:
    # fork: children reuse the parent's torch; the parent never initialises a process group
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


def _exchange_worker(rank: int, teachers: list[int], groups: dict) -> None:
    plan = ExchangePlan(G, teachers, groups)
    cpu = torch.device("cpu")
    if rank in teachers:
        a, b = plan.teacher_rows(rank)
        works = []
        for it in range(ITERATIONS):
            works += send_targets(plan, rank, _truth(it).slice(a, b), cpu)[0]
        for w in works:
            w.wait()
        return
    a, b = plan.student_rows(rank)
    source = P2PTargetSource(plan, rank, DIMS, range(ITERATIONS),
                             lambda it: _truth(it).tensors["ibot_counts"][a:b], cpu)
    for it in range(ITERATIONS):
        got, want = source.get(it), _truth(it).slice(a, b)
        assert (got.start, got.stop) == (a, b)
        for k in want.tensors:
            assert torch.equal(got.tensors[k], want.tensors[k]), (rank, it, k)


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_p2p_exchange_with_uneven_teacher_and_student_shares():
    # teacher 2/3/3 rows; group a 4/4 (rank 3 straddles teacher ranks 0 and 1); group b all 8 rows
    assert _spawn(_exchange_worker, 6, ([0, 1, 2], {"a": [3, 4], "b": [5]})) == [0] * 6


# ------------------------------------------------------------------------------ tiny distillation


def _topology(path: Path) -> Path:
    topo = {
        "name": "uneven",
        "backend": "gloo",
        "cluster": {"nodes": 1, "devices_per_node": 5, "device": "cpu"},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 2, "embed_dim": 64, "num_heads": 4},
                    "checkpoint": None, "targets": "heads", "shard": "fsdp", "devices": 2},
        "students": [{"name": "tiny-vits", "arch": "tiny-vits", "overrides": {"depth": 2}, "devices": 3}],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2},
        "train": {"global_batch_size": G, "iterations": ITERATIONS, "seed": 5, "lr": 2e-3,
                  "koleo_weight": 0.0, "even_batches": False, "loss_chunk_rows": CHUNK},
        "metrics": {"port": 0},
        "control": {"bind": "127.0.0.1", "port": 0, "heartbeat_timeout_s": 20},
        "output": str(path.parent / "unused"),
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def _with_chunk_rows(chunk: int):
    """orchestrator.rank.student_job with the student's loss_chunk_rows forced to `chunk`."""
    from dinodist.orchestrator.runtime.jobs import student_job

    def job(topo, name, out):
        j = student_job(topo, name, out)
        return dataclasses.replace(j, loss=dataclasses.replace(j.loss, loss_chunk_rows=chunk))

    return job


def _grad_check(topology: Path, out: Path) -> dict:
    """Two iterations of the sharded student, chunked vs unchunked, on the same inline targets.

    Returns the largest differences of losses, gradients and parameters after each SGD step
    (a plain step: the parameter update is lr x gradient, nothing amplifies rounding).
    """
    import torch.distributed as dist

    from dinodist.core.data.loader import BatchLoader
    from dinodist.core.data.sources import build_source
    from dinodist.core.distributed import group_mesh
    from dinodist.core.targets import crop_major, masks_from_collated
    from dinodist.orchestrator.runtime.jobs import student_job, teacher_job
    from dinodist.orchestrator.topology import load_topology
    from dinodist.students.loss import attach_chunked_losses, chunked_heads_loss, distill_loss
    from dinodist.students.model import build_student, shard_student
    from dinodist.teacher.model import last_layers, load_teacher
    from dinodist.teacher.targets import compute_targets

    topo = load_topology(topology)
    sj, tj = student_job(topo, "tiny-vits", out), teacher_job(topo, out)
    cpu, group = torch.device("cpu"), dist.group.WORLD
    loaded = load_teacher(tj.arch, tj.overrides, None, tj.kind, tj.dino_head, tj.ibot_head, tj.seed)
    last = last_layers(loaded.model)
    tloader = BatchLoader(build_source(tj.source), dataclasses.replace(tj.crops, n_local=0), G, tj.seed,
                          slice(0, G), loaded.spec.patch_size)
    students = {}
    for chunk in (0, CHUNK):
        s = shard_student(build_student(sj.arch, sj.overrides, sj.kind, sj.dino_head, sj.ibot_head,
                                        sj.teacher_dim, sj.seed), group_mesh(group, [0], "cpu"))
        if chunk:
            attach_chunked_losses(s)
        students[chunk] = s
    sloader = BatchLoader(build_source(sj.source), sj.crops, G, sj.seed, slice(0, G),
                          students[0].backbone.patch_size)
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0, "grad_max": 0.0}
    for it in range(ITERATIONS):
        batch = sloader.get(it)
        tgt = crop_major(compute_targets(loaded.model, tloader.get(it), it, 0, tj.kind, cpu),
                         masks_from_collated(batch["collated_masks"]))
        losses, grads = {}, {}
        for chunk, s in students.items():
            cfg = dataclasses.replace(sj.loss, loss_chunk_rows=chunk)
            torch.manual_seed(100 + it)  # the same RoPE rescale draws for both
            if chunk:
                loss, _ = chunked_heads_loss(s, batch, tgt, last, sj.crops.n_local, cfg, group=group)
            else:
                out_ = s(batch["collated_global_crops"], batch["collated_local_crops"],
                         batch["mask_indices_list"])
                loss, _ = distill_loss(HEADS, out_, tgt, last, batch, sj.crops.n_local, cfg, group=group)
            loss.backward()
            losses[chunk] = float(loss.detach())
            grads[chunk] = {n: p.grad.full_tensor() for n, p in s.named_parameters()}
            with torch.no_grad():
                for p in s.parameters():
                    p -= 1e-4 * p.grad
                    p.grad = None
        worst["loss"] = max(worst["loss"], abs(losses[0] - losses[CHUNK]))
        for n, g0 in grads[0].items():
            worst["grad"] = max(worst["grad"], float((g0 - grads[CHUNK][n]).abs().max()))
            worst["grad_max"] = max(worst["grad_max"], float(g0.abs().max()))
        p0 = dict(students[0].named_parameters())
        for n, p in students[CHUNK].named_parameters():
            worst["param"] = max(worst["param"], float((p.full_tensor() - p0[n].full_tensor()).abs().max()))
    tloader.close()
    sloader.close()
    return worst


def _inline_runs(topology: str, out: str) -> None:
    """Child process: inline runs unchunked and chunked, then the direct gradient check."""
    torch.set_num_threads(1)
    try:
        import dinodist.orchestrator.runtime.inline as inline

        real = inline.student_job
        for chunk in (0, CHUNK):
            inline.student_job = _with_chunk_rows(chunk)
            inline.run_inline(topology, "tiny-vits", Path(out) / f"chunk{chunk}")
        inline.student_job = real
        worst = _grad_check(Path(topology), Path(out) / "grad")
        (Path(out) / "grad.json").write_text(json.dumps(worst))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _trajectory(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 5-rank uneven distillation (CLI) and the inline 1-rank references (forked child)."""
    base = tmp_path_factory.mktemp("uneven")
    topo = _topology(base / "uneven.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dinodist.orchestrator.cli", "distill", str(topo),
           "--out", str(base / "dist"), "--metrics-port", "0"]
    # the ranks start while the inline child computes: the machine has 2 cores, the job 5 ranks
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    child = mp.get_context("spawn").Process(target=_inline_runs, args=(str(topo), str(base / "inline")))
    child.start()
    child.join(150)
    if child.is_alive():
        child.kill()
    log, _ = proc.communicate(timeout=150)
    assert child.exitcode == 0, "inline runs failed (see the captured stderr)"
    assert proc.returncode == 0, log[-3000:]
    return base


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_chunked_losses_equal_unchunked_in_the_inline_loop(runs):
    a = _trajectory(runs / "inline" / "chunk0" / "tiny-vits" / "metrics.jsonl")
    b = _trajectory(runs / "inline" / f"chunk{CHUNK}" / "tiny-vits" / "metrics.jsonl")
    assert len(a) == len(b) == ITERATIONS
    for ra, rb in zip(a, b):
        for term in TERMS:
            # 1e-5, relative for terms above 1: AdamW's first step maps gradient rounding on elements
            # with |grad| ~ eps to ~1e-5 weight differences, which KoLeo's -log(distance) (~7.5) shows
            tol = 1e-5 * max(1.0, abs(ra[term]))
            assert abs(ra[term] - rb[term]) <= tol, (ra["iteration"], term, ra[term], rb[term])
    assert a[0]["loss"] != a[1]["loss"]  # training moved: the second iteration saw updated weights
    from dinodist.core.models.io import read_state_dict

    ea = read_state_dict(runs / "inline" / "chunk0" / "tiny-vits" / "backbone.pth")
    eb = read_state_dict(runs / "inline" / f"chunk{CHUNK}" / "tiny-vits" / "backbone.pth")
    for k in ea:
        assert torch.allclose(ea[k], eb[k], atol=1e-5), k


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_chunked_gradients_and_updates_equal_unchunked(runs):
    worst = json.loads((runs / "inline" / "grad.json").read_text())
    assert worst["loss"] <= 1e-5 and worst["param"] <= 1e-5, worst
    # gradients up to ~1e3 (the LayerScale gammas at init): compare relative to the largest
    assert worst["grad"] <= 1e-5 * max(1.0, worst["grad_max"]), worst


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_uneven_student_group_trains_every_row_once_and_follows_one_rank(runs):
    dist_dir = runs / "dist"
    shares = []
    for f in sorted((dist_dir / "logs").glob("rank-*.json")):
        info = json.loads(f.read_text())
        if info["group"] == "tiny-vits":
            a, b = info["rows"]
            assert info["images"] == (b - a) * ITERATIONS and info["iterations"] == ITERATIONS
            assert info["loss_scale"] == pytest.approx((b - a) * 3 / G)
            shares.append((a, b))
    # three ranks, rows 2/3/3, each row of the global batch owned by exactly one of them
    assert sorted(shares) == [(0, 2), (2, 5), (5, 8)]
    got = _trajectory(dist_dir / "tiny-vits" / "metrics.jsonl")
    ref = _trajectory(runs / "inline" / "chunk0" / "tiny-vits" / "metrics.jsonl")
    assert len(got) == len(ref) == ITERATIONS
    for rg, rr in zip(got, ref):
        for term in ("loss", "dino_global", "dino_local", "ibot"):
            assert abs(rg[term] - rr[term]) <= 1e-5, (rg["iteration"], term, rg[term], rr[term])
        assert rg["images"] == G
    # the 2-rank teacher ran once per global batch for the 3 uneven student ranks
    assert json.loads((dist_dir / "summary.json").read_text())["teacher_forwards"] == ITERATIONS
