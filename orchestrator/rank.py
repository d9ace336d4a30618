"""Entry point of one rank: `python -m dinodist.orchestrator.rank TOPOLOGY [--out DIR] [--iterations N]`.

Run by `dinodist distill` (orchestrator/launch.py) and by the files `dinodist deploy` writes for
an external torchrun: both set the env:// variables. The rank reads the topology, makes the same
plan as every other rank (rank order: teacher ranks first, then the students as listed), finds
its group from its rank, joins the world, creates every group's sub-group in plan order, and
runs the teacher loop or a student loop. The orchestrator's control address, when there is one,
is in $DINODIST_CONTROL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import resource
import sys
import threading
import traceback
from pathlib import Path

import torch

from dinodist.core.data.augment import CropConfig
from dinodist.core.distributed import destroy, group_mesh, init_from_env, make_subgroups
from dinodist.core.errors import DinodistError
from dinodist.core.targets import (
    HEADS,
    ExchangePlan,
    P2PTargetSource,
    TargetDims,
    ibot_counts,
    recv_last_layers,
)
from dinodist.orchestrator.allocate import Plan, make_plan
from dinodist.orchestrator.topology import Topology, load_topology
from dinodist.students.loss import LossConfig
from dinodist.students.model import StudentOptim
from dinodist.students.run import GroupContext, StudentJob, train_student
from dinodist.teacher.run import TeacherJob, run_teacher

CONTROL_ENV = "DINODIST_CONTROL"
log = logging.getLogger("dinodist.rank")


def crop_config(topo: Topology) -> CropConfig:
    d = topo.data
    return CropConfig(global_size=d.global_crop_size, local_size=d.local_crop_size, n_local=d.local_crops,
                      flips=d.flips)


def teacher_job(topo: Topology, out_dir: str | Path) -> TeacherJob:
    t, tr = topo.teacher, topo.train
    return TeacherJob(
        arch=t.arch, kind=t.targets, source=topo.data.source, crops=crop_config(topo),
        global_batch=tr.global_batch_size, iterations=tr.iterations, out_dir=Path(out_dir),
        overrides=dict(t.overrides), checkpoint=t.checkpoint, shard=t.shard,
        dino_head=topo.dino_head(), ibot_head=topo.ibot_head(), seed=tr.seed,
        mask_prob=topo.data.mask_probability, mask_ratio=tuple(topo.data.mask_ratio),
        prefetch_depth=tr.prefetch_depth, store=store_settings(topo), topology=topo.name,
    )


def store_settings(topo: Topology) -> dict | None:
    """The topology's `store:` as the teacher's StoreWriter takes it (retain "all" -> None)."""
    if topo.store is None:
        return None
    retain = topo.store.retain
    return {"path": topo.store.path, "dtype": topo.store.dtype, "retain": None if retain == "all" else retain}


def student_job(topo: Topology, name: str, out_dir: str | Path) -> StudentJob:
    s = topo.student(name)
    tr = topo.student_train(name)
    dino, ibot = topo.student_heads(name)
    optim = StudentOptim(lr=tr["lr"], weight_decay=tr["weight_decay"],
                         warmup_iterations=tr["warmup_iterations"], layerwise_decay=tr["layerwise_decay"],
                         clip_grad=tr["clip_grad"], ema=tr["ema"])
    loss = LossConfig(teacher_temp=tr["teacher_temp"], student_temp=tr["student_temp"],
                      ibot_weight=tr["ibot_weight"], koleo_weight=tr["koleo_weight"],
                      loss_chunk_rows=topo.train.loss_chunk_rows)
    return StudentJob(
        name=name, arch=s.arch, kind=topo.teacher.targets, source=topo.data.source, crops=crop_config(topo),
        global_batch=topo.train.global_batch_size, iterations=topo.train.iterations, out_dir=Path(out_dir),
        overrides=dict(s.overrides), dino_head=dino, ibot_head=ibot,
        teacher_dim=topo.teacher_spec().embed_dim, seed=topo.train.seed,
        mask_prob=topo.data.mask_probability, mask_ratio=tuple(topo.data.mask_ratio), optim=optim, loss=loss,
        checkpoint_every=topo.train.checkpoint_every,
    )


def target_dims(topo: Topology, name: str) -> TargetDims:
    spec = topo.teacher_spec()
    if topo.teacher.targets == HEADS:
        return TargetDims(HEADS, dino_dim=topo.dino_head().bottleneck_dim,
                          ibot_dim=topo.ibot_head().bottleneck_dim)
    grid = topo.data.global_crop_size // spec.patch_size
    return TargetDims("features", feat_dim=spec.embed_dim, n_patches=grid * grid)


def last_layer_shapes(topo: Topology) -> dict[str, tuple[int, int]]:
    d, i = topo.dino_head(), topo.ibot_head()
    return {"dino_last_layer.weight": (d.n_prototypes, d.bottleneck_dim),
            "ibot_last_layer.weight": (i.n_prototypes, i.bottleneck_dim)}


def mask_counts_fn(topo: Topology, start: int, stop: int):
    """iBOT counts [r, 2] of rows [start, stop) of any iteration, from (sample id, seed) alone."""
    from dinodist.core.data.masking import sample_masks
    from dinodist.core.data.sampler import global_batch
    from dinodist.core.data.sources import build_source

    n = len(build_source(topo.data.source))
    grid = topo.data.global_crop_size // topo.teacher_spec().patch_size
    tr, d = topo.train, topo.data

    def counts(it: int) -> torch.Tensor:
        ids, seeds = global_batch(it, tr.global_batch_size, n, tr.seed)
        masks = sample_masks(ids[start:stop], seeds[start:stop], (grid, grid), d.mask_probability,
                             tuple(d.mask_ratio))
        return ibot_counts(masks)

    return counts


def exchange_plan(plan: Plan) -> ExchangePlan:
    teacher = [g for g in plan.groups if g.role == "teacher"][0]
    return ExchangePlan(plan.global_batch_size, list(teacher.ranks),
                        {g.name: list(g.ranks) for g in plan.groups if g.role == "student"})


class ControlThread:
    """Owns the rank's ControlClient in a thread of its own.

    The training loop can block for long (a collective, a receive from a slow teacher, loading
    a checkpoint); heartbeats from this thread keep saying "the process is alive" meanwhile. Stats
    travel through a queue, and commands come back through `report()`'s return value.
    """

    def __init__(self, addr: str, rank: int, group: str, role: str, secret: str | None,
                 register_kw: dict) -> None:
        self._stats: queue.SimpleQueue = queue.SimpleQueue()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._final: tuple[str, str] | None = None
        self._args = (addr, rank, group, role, secret, register_kw)
        self._thread = threading.Thread(target=self._loop, name="dinodist-control-client", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from dinodist.core.control.client import ControlClient

        addr, rank, group, role, secret, register_kw = self._args
        client = ControlClient(addr, rank, group, role=role, secret=secret, heartbeat_interval_s=0.5)
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
        self._stats.put(stats)
        return None if self._commands.empty() else self._commands.get()

    def close(self, kind: str = "done", message: str = "") -> None:
        self._final = (kind, message)
        self._stop.set()
        self._thread.join(timeout=5)


def start_control(topo: Topology, rank: int, group: str, role: str, world: dict) -> ControlThread | None:
    """The rank's control-plane thread when an orchestrator started it ($DINODIST_CONTROL), else None."""
    addr = os.environ.get(CONTROL_ENV)
    if not addr:
        return None
    secret = os.environ.get(topo.control.secret_env) if topo.control.secret_env else None
    return ControlThread(addr, rank, group, role, secret, world)


def run_rank(topo: Topology, out_dir: Path) -> int:
    plan = make_plan(topo)
    info = init_from_env(topo.resolved_backend(), timeout_s=120)
    if info.world_size != plan.used_devices:
        raise DinodistError(f"WORLD_SIZE is {info.world_size} but the plan of {topo.name} has "
                            f"{plan.used_devices} ranks")
    pgs = make_subgroups([g.ranks for g in plan.groups])
    idx = next(i for i, g in enumerate(plan.groups) if info.rank in g.ranks)
    gp, pg = plan.groups[idx], pgs[idx]
    mesh = group_mesh(pg, gp.ranks, info.device.type)
    exchange = exchange_plan(plan)
    control = start_control(topo, info.rank, gp.name, gp.role,
                            {"world_size": info.world_size, "group_rank": gp.ranks.index(info.rank),
                             "group_size": len(gp.ranks)})
    report = control.report if control is not None else None
    try:
        if gp.role == "teacher":
            totals = run_teacher(teacher_job(topo, out_dir), exchange, info.rank, pg, mesh, info.device,
                                 report)
        else:
            job = student_job(topo, gp.name, out_dir)
            start, stop = exchange.student_rows(info.rank)
            last = None
            if job.kind == HEADS:
                last = recv_last_layers(last_layer_shapes(topo), exchange.teacher_ranks[0], info.device)
            source = P2PTargetSource(exchange, info.rank, target_dims(topo, gp.name), range(job.iterations),
                                     mask_counts_fn(topo, start, stop), info.device,
                                     depth=topo.train.prefetch_depth)
            ctx = GroupContext(pg, mesh, gp.ranks.index(info.rank), len(gp.ranks), start, stop, info.device)
            totals = train_student(job, source, last, ctx, report)
        log.info("rank %d (%s) done: %s", info.rank, gp.name, totals)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        logs = out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"rank-{info.rank}.json").write_text(json.dumps(
            {"rank": info.rank, "group": gp.name, "role": gp.role,
             "cpu_seconds": usage.ru_utime + usage.ru_stime, **totals}))
    except BaseException as exc:
        if control is not None:
            control.close("error", f"rank {info.rank} ({gp.name}): {exc}")
        raise
    if control is not None:
        control.close("done")
    destroy()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinodist.orchestrator.rank",
                                     description="One rank of a dinodist distillation (env:// variables).")
    parser.add_argument("topology", help="topology YAML")
    parser.add_argument("--out", help="output folder (default: the topology's output)")
    parser.add_argument("--iterations", type=int, help="override train.iterations")
    parser.add_argument("--replay", metavar="STORE", help="train --student from this target store "
                        "(a world of that group's ranks only; see orchestrator/replay.py)")
    parser.add_argument("--student", help="with --replay: the student group to train")
    parser.add_argument("--follow", action="store_true",
                        help="with --replay: tail a store that a live run is still writing")
    parser.add_argument("--follow-timeout", type=float, default=60.0,
                        help="with --follow: seconds without a new record before the writer counts as dead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "?")
                        + " %(levelname)s %(message)s")
    overrides = {"train.iterations": args.iterations} if args.iterations else None
    try:
        topo = load_topology(args.topology, overrides)
        out = Path(args.out) if args.out else Path(topo.output)
        if args.replay:
            from dinodist.orchestrator.replay import run_replay_rank

            return run_replay_rank(topo, out, args.replay, args.student, args.follow, args.follow_timeout)
        return run_rank(topo, out)
    except DinodistError as exc:
        print(f"dinodist rank {os.environ.get('RANK', '?')}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
