"""A student group trained from a target store (`dinodist add-student`), and the store check before it.

The store is just another target source: the group's ranks run the same `train_student` loop as
in a live run, with a `StoreTargetSource` where a live student has a `P2PTargetSource`, in a world
of only the new group's ranks. `check_store` is what the driver runs (as `rank.py --check`, before
it starts any rank): the store must match the topology (teacher hash, data fingerprint, crop and
masking config, batch size, seed: one line naming the first field that differs) and, for a plain
replay, hold every iteration the run needs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dinodist.core.control.client import CONTROL_RANK_ENV
from dinodist.core.data.sampler import global_batch
from dinodist.core.data.sources import build_source
from dinodist.core.distributed import group_mesh, init_from_env, make_subgroups
from dinodist.core.errors import DinodistError
from dinodist.core.target_store import StoreReader, check_compatible
from dinodist.core.targets import HEADS, ExchangePlan, StoreStopped, StoreTargetSource
from dinodist.core.train.preempt import Preempted
from dinodist.orchestrator.planfile import RunPlan
from dinodist.orchestrator.runtime.jobs import (
    data_index,
    reporting_to,
    start_control,
    student_job,
    teacher_job,
    write_rank_record,
)
from dinodist.orchestrator.runtime.resume import agree_resume_point, drop_checkpoints_after
from dinodist.orchestrator.topology import Topology
from dinodist.students.run import GroupContext, train_student
from dinodist.teacher.run import NOT_COMPARED, store_identity, store_manifest

log = logging.getLogger("dinodist.replay")


def expected_manifest(topo: Topology) -> dict:
    """What the store's manifest must say for this topology's student to train on it."""
    tjob = teacher_job(topo, topo.output)
    m = store_manifest(tjob, store_identity(tjob), build_source(topo.data.source).fingerprint(),
                       topo.teacher_spec().patch_size)
    for key in NOT_COMPARED:
        m.pop(key)
    return m


def check_store(reader: StoreReader, topo: Topology, follow: bool) -> None:
    """Refuse a store this run cannot use; each error is one line."""
    try:
        check_compatible(reader.manifest, expected_manifest(topo))
    except DinodistError as exc:
        raise DinodistError(f"{reader.path}: {exc}") from None
    need = topo.train.iterations
    written = reader.manifest.get("iterations")
    if isinstance(written, int) and need > written:
        raise DinodistError(f"train.iterations: {need} exceeds the {written} iterations of the run that "
                            f"wrote {reader.path}")
    its = reader.iterations()
    if its and its[0] > 0:
        raise DinodistError(f"{reader.path}: iterations before {its[0]} were deleted (store retention); a "
                            "new student starts at iteration 0 (use retain: all, or join within the window)")
    if follow:
        return
    if topo.teacher.targets == HEADS:
        reader.last_layers()
    have = next((i for i, it in enumerate(its) if it != i), len(its))  # contiguous from 0
    if have < need:
        last = f"0..{have - 1}" if have else "none"
        why = ("the store ends early (truncated or torn shard?)" if reader.closed()
               else "the store is still being written: add --follow to train as it grows")
        raise DinodistError(f"{reader.path}: complete records cover iterations {last} but this run needs "
                            f"0..{need - 1}; {why}" + (f" (or --iterations {have})" if have else ""))


def check_store_path(topo: Topology, store: str | Path, follow: bool, follow_timeout: float) -> None:
    """`check_store` on the store at `store` (the driver's preflight, `rank.py --check`)."""
    reader = StoreReader(store, follow=follow, timeout_s=follow_timeout if follow else None)
    check_store(reader, topo, follow)


def store_source(topo: Topology, store: str | Path, start: int, stop: int, num_samples: int, follow: bool,
                 follow_timeout: float | None) -> StoreTargetSource:
    """Rows [start, stop) of every record of `store`, each checked against this run's sampler (so
    targets can never be paired with other images), tailing a store still being written with `follow`."""
    g, seed = topo.train.global_batch_size, topo.train.seed
    timeout = follow_timeout if follow else None
    reader = StoreReader(store, follow=follow, poll_s=0.1, timeout_s=timeout)

    def sampler(it: int):
        return global_batch(it, g, num_samples, seed)

    return StoreTargetSource(reader, start, stop, topo.teacher.targets, follow=follow, timeout_s=timeout,
                             sampler=sampler)


def run_replay_rank(topo: Topology, plan: RunPlan, out_dir: Path, store: str, name: str | None,
                    follow: bool, follow_timeout: float, resume: bool = False) -> int:
    """One rank of a group trained from a store (`rank.py ... --replay STORE --student NAME`): a group
    added later (`add-student`), or a group of a live run that failed and was restarted (`--resume`:
    from its newest checkpoint; it then follows the store the live teacher keeps writing).

    The world is the group's ranks only; to the supervisor each rank is the global rank the plan gives
    it, so a restarted rank takes the place of the one that died."""
    if not name:
        raise DinodistError("--replay needs --student NAME")
    topo.student(name)  # a clear error for a name the topology lacks
    n = plan.group(name).devices
    info = init_from_env(topo.resolved_backend(), timeout_s=topo.control.startup_timeout_s)
    if info.world_size != n:
        raise DinodistError(f"WORLD_SIZE is {info.world_size} but student {name!r} has {n} devices")
    ranks = list(range(n))
    (pg,) = make_subgroups([ranks], timeout_s=topo.control.collective_timeout_s)
    ckpt_dir = Path(out_dir) / name / "ckpt"
    resume_at = agree_resume_point(ckpt_dir, topo.train.iterations, info.device) if resume else 0
    if info.rank == 0:
        drop_checkpoints_after(ckpt_dir, resume_at)
    mesh = group_mesh(pg, ranks, info.device.type)
    g = topo.train.global_batch_size
    # rows as in a live run: the students' split does not depend on the teacher (rank n is a stand-in)
    start, stop = ExchangePlan(g, [n], {name: ranks},
                               even_batches=topo.train.even_batches).student_rows(info.rank)
    job = student_job(topo, name, out_dir)
    num_samples = len(build_source(topo.data.source, index=data_index(out_dir)))
    source = store_source(topo, store, start, stop, num_samples, follow, follow_timeout)
    last = source.reader.last_layers() if job.kind == HEADS else None
    newest_at_start = source.newest()
    global_rank = int(os.environ.get(CONTROL_RANK_ENV, info.rank))
    control = start_control(topo, global_rank, name, "student",
                            {"world_size": n, "group_rank": info.rank, "group_size": n}, device=info.device)
    report = control.report if control is not None else None
    ctx = GroupContext(pg, mesh, info.rank, n, start, stop, info.device)
    record = {"rank": global_rank, "group": name, "role": "student", "replay": str(store), "follow": follow,
              "teacher_forwards": 0, "store_newest_at_start": newest_at_start, "resumed_at": resume_at}
    with reporting_to(control, global_rank, name):
        try:
            totals = train_student(job, source, last, ctx, report, resume_at=resume_at)
        except StoreStopped as exc:
            raise DinodistError(f"stopped after iteration {exc.last_iteration}, the last complete record: "
                                f"{exc}") from None
        finally:
            # also when it stops early: how far it read is what the summary reports
            record.update(caught_up_at=source.caught_up_at, store_bytes_read=source.bytes_read)
            write_rank_record(out_dir, global_rank, record)
        record.update(totals)
        write_rank_record(out_dir, global_rank, record)
        log.info("replay rank %d (%s) done: %s", global_rank, name, totals)
        if "preempted_at" in totals:
            raise Preempted(f"rank {global_rank} ({name}): preempted; checkpointed at iteration "
                            f"{totals['preempted_at']}", totals["preempted_at"])
    return 0
