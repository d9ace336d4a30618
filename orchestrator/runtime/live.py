"""One rank of a live distillation: join the world, find its group in the plan, run the teacher or a student.

Every rank creates every group's sub-group in plan order (`new_group` is a collective over the
world), wraps its own in a 1-D mesh for FSDP2, and then runs `teacher.run.run_teacher` or
`students.run.train_student` with a `P2PTargetSource` that receives its rows from the teacher ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from dinodist.core.data.agree import agree_fingerprint
from dinodist.core.data.sources import build_source
from dinodist.core.distributed import group_mesh, init_from_env, make_subgroups
from dinodist.core.errors import DinodistError
from dinodist.core.targets import HEADS, FailoverTargetSource, P2PTargetSource, recv_last_layers
from dinodist.core.train.preempt import Preempted
from dinodist.orchestrator.planfile import RunPlan
from dinodist.orchestrator.runtime.jobs import (
    data_index,
    exchange_plan,
    last_layer_shapes,
    mask_counter,
    reporting_to,
    start_control,
    student_job,
    target_dims,
    teacher_job,
    wire_dtype,
    write_rank_record,
)
from dinodist.orchestrator.runtime.replay import store_source
from dinodist.orchestrator.runtime.resume import agree_resume_point, drop_checkpoints_after
from dinodist.orchestrator.topology import Topology
from dinodist.students.run import GroupContext, train_student
from dinodist.teacher.run import run_teacher

log = logging.getLogger("dinodist.rank")

# a student following the store after the teacher died: silence this long (no progress timeout) = gone
FOLLOW_TIMEOUT_S = 600.0


def _header_group(ranks: list[int] | None):
    """Under NCCL, a gloo group of `ranks` (None: the world) for the target headers, so a receiver checks
    a header (iteration, rows, last flag) in host memory instead of reading it back from its GPU, a sync
    per transfer; gloo worlds send headers with the payloads. Collective: every rank of the world calls it.
    """
    if dist.get_backend() != "nccl":
        return None
    return dist.new_group(ranks, backend="gloo")


def run_live_rank(topo: Topology, plan: RunPlan, out_dir: Path, resume: bool = False) -> int:
    """`resume`: continue from the newest checkpoint every group holds (from scratch when there is none);
    without it a new run starts and an earlier run's checkpoints in `out_dir` are removed. Raises
    Preempted (after checkpointing) when the run was asked to stop early."""
    info = init_from_env(topo.resolved_backend(), timeout_s=topo.control.startup_timeout_s)
    if info.world_size != plan.used_devices:
        raise DinodistError(f"WORLD_SIZE is {info.world_size} but the plan of {topo.name} has "
                            f"{plan.used_devices} ranks")
    # the world (P2P targets) keeps the startup allowance: a student's first receive waits for the
    # teacher to load; each group's own collectives get the shorter collective timeout
    pgs = make_subgroups([g.ranks for g in plan.groups], timeout_s=topo.control.collective_timeout_s)
    teacher_ranks = list(plan.teacher.ranks)
    # a CPU side channel for the teacher ranks' per-iteration stop vote (teacher/run.py); new_group is
    # collective over the world, so every rank creates it
    flag_group = dist.new_group(teacher_ranks, backend="gloo") if len(teacher_ranks) > 1 else None
    header_group = _header_group(None)
    idx = next(i for i, g in enumerate(plan.groups) if info.rank in g.ranks)
    gp, pg = plan.groups[idx], pgs[idx]
    # every rank pairs rows with images by sample id: all must see the same data, or the teacher's
    # targets would silently belong to other pixels on some student rank
    data = build_source(topo.data.source, index=data_index(out_dir))
    agree_fingerprint(data.fingerprint())
    ckpt_dir = Path(out_dir) / gp.name / "ckpt" if gp.role == "student" else None
    resume_at = agree_resume_point(ckpt_dir, topo.train.iterations, info.device) if resume else 0
    if ckpt_dir is not None and info.rank == gp.ranks[0]:
        drop_checkpoints_after(ckpt_dir, resume_at)
    if resume:
        log.info("rank %d (%s): %s", info.rank, gp.name,
                 f"resuming at iteration {resume_at}" if resume_at else "no common checkpoint: from scratch")
    mesh = group_mesh(pg, gp.ranks, info.device.type)
    exchange = exchange_plan(plan)
    group_rank = gp.ranks.index(info.rank)
    control = start_control(topo, info.rank, gp.name, gp.role,
                            {"world_size": info.world_size, "group_rank": group_rank,
                             "group_size": len(gp.ranks)}, device=info.device)
    report = control.report if control is not None else None
    with reporting_to(control, info.rank, gp.name):
        if gp.role == "teacher":
            totals = run_teacher(teacher_job(topo, out_dir, plan), exchange, info.rank, pg, mesh, info.device,
                                 report, resume_at=resume_at if resume else None, flag_group=flag_group,
                                 header_group=header_group)
        else:
            job = student_job(topo, gp.name, out_dir)
            start, stop = exchange.student_rows(info.rank)
            last = None
            if job.kind == HEADS:
                last = recv_last_layers(last_layer_shapes(topo), exchange.teacher_ranks[0], info.device)
            counts = mask_counter(topo, len(data))
            source = P2PTargetSource(exchange, info.rank, target_dims(topo), range(resume_at, job.iterations),
                                     lambda it: counts(it, start, stop), info.device,
                                     depth=topo.train.prefetch_depth, wire_dtype=wire_dtype(topo),
                                     header_group=header_group)
            store = topo.target_store_path(out_dir)
            if topo.control.on_failure == "restart_group" and store is not None:
                # if the teacher dies, wait for its restart on the store it writes instead of failing
                timeout = topo.control.progress_timeout_s or FOLLOW_TIMEOUT_S
                source = FailoverTargetSource(
                    source, lambda it: store_source(topo, store, start, stop, len(data), True, timeout))
            ctx = GroupContext(pg, mesh, group_rank, len(gp.ranks), start, stop, info.device)
            totals = train_student(job, source, last, ctx, report, resume_at=resume_at)
        log.info("rank %d (%s) done: %s", info.rank, gp.name, totals)
        write_rank_record(out_dir, info.rank,
                          {"rank": info.rank, "group": gp.name, "role": gp.role, **totals})
        if "preempted_at" in totals:
            raise Preempted(f"rank {info.rank} ({gp.name}): preempted; every group checkpointed at iteration "
                            f"{totals['preempted_at']}", totals["preempted_at"])
    return 0


def run_restarted_teacher_rank(topo: Topology, plan: RunPlan, out_dir: Path) -> int:
    """A teacher rank started again after a teacher failure (`rank.py --restarted-teacher`): a world of the
    teacher ranks only (they come first in the plan, so their ranks are unchanged), which continues the
    target store the student groups follow meanwhile, and sends nothing."""
    info = init_from_env(topo.resolved_backend(), timeout_s=topo.control.startup_timeout_s)
    teacher_ranks = list(plan.teacher.ranks)
    if info.world_size != len(teacher_ranks):
        raise DinodistError(f"--restarted-teacher: WORLD_SIZE is {info.world_size} but the teacher has "
                            f"{len(teacher_ranks)} ranks")
    (pg,) = make_subgroups([teacher_ranks], timeout_s=topo.control.collective_timeout_s)
    flag_group = dist.new_group(teacher_ranks, backend="gloo") if len(teacher_ranks) > 1 else None
    header_group = _header_group(teacher_ranks) if len(teacher_ranks) > 1 else None
    mesh = group_mesh(pg, teacher_ranks, info.device.type)
    control = start_control(topo, info.rank, plan.teacher.name, "teacher",
                            {"world_size": info.world_size, "group_rank": info.rank,
                             "group_size": len(teacher_ranks)}, device=info.device)
    report = control.report if control is not None else None
    with reporting_to(control, info.rank, plan.teacher.name):
        totals = run_teacher(teacher_job(topo, out_dir, plan), exchange_plan(plan), info.rank, pg, mesh,
                             info.device, report, flag_group=flag_group, alone=True,
                             header_group=header_group)
        write_rank_record(out_dir, info.rank, {"rank": info.rank, "group": plan.teacher.name,
                                               "role": "teacher", "restarted": True, **totals})
        if "preempted_at" in totals:
            raise Preempted(f"rank {info.rank} (teacher): preempted at iteration {totals['preempted_at']}",
                            totals["preempted_at"])
    return 0
