"""`dinodist add-student`: train a new student group from a target store, with no teacher.

The store is just another target source: the group's ranks run the same `train_student` loop as
in a live run, with a `StoreTargetSource` where a live student has a `P2PTargetSource`. The job is
launched and supervised by the same machinery as `dinodist distill` (control plane, /metrics,
failure policy), with a world of only the new group's ranks.

Before any rank starts, this process checks the store against the topology (teacher hash, data
fingerprint, crop and masking config, batch size, seed: one-line error naming the first field that
differs) and, for a plain replay, that the store holds every iteration the run needs. With
`follow=True` the ranks tail a store that a live run is still writing: they catch up, then train
as records arrive; if the writer closes the store early or stops writing for `follow_timeout`
seconds (killed), they stop after the last complete record and the command fails naming it.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

from dinodist.core.data.sampler import global_batch
from dinodist.core.data.sources import build_source
from dinodist.core.distributed import destroy, group_mesh, init_from_env, make_subgroups
from dinodist.core.errors import DinodistError
from dinodist.core.target_store import StoreReader, check_compatible
from dinodist.core.targets import HEADS, ExchangePlan, StoreStopped, StoreTargetSource
from dinodist.orchestrator.distill import launch_and_supervise
from dinodist.orchestrator.rank import start_control, student_job, teacher_job
from dinodist.orchestrator.topology import Topology, load_topology, parse_topology
from dinodist.students.run import GroupContext, train_student
from dinodist.teacher.run import NOT_COMPARED, store_identity, store_manifest

log = logging.getLogger("dinodist.replay")


def replay_topology(topo: Topology, student: str, arch: str | None, devices: int | None) -> Topology:
    """The topology of the replay job: its only student group is the one to train.

    A student missing from the topology is added from `arch` (default heads, no overrides). The
    cluster is widened if needed: the new group runs on devices of its own, beside the live job.
    """
    raw = topo.model_dump(mode="json")
    names = [s["name"] for s in raw["students"]]
    if student in names:
        entry = raw["students"][names.index(student)]
        if arch:
            entry["arch"] = arch
    elif arch:
        entry = {"name": student, "arch": arch}
    else:
        raise DinodistError(f"--student: {student!r} is not a student of topology {topo.name!r} "
                            f"(known: {', '.join(names)}); give --arch to add it")
    if devices is not None:
        entry["devices"] = devices
    elif not isinstance(entry.get("devices"), int):
        entry["devices"] = 1
    raw["students"] = [entry]
    teacher = raw["teacher"]["devices"] if isinstance(raw["teacher"]["devices"], int) else 1
    cluster = raw["cluster"]
    need = math.ceil((teacher + entry["devices"]) / cluster["nodes"])
    cluster["devices_per_node"] = max(cluster["devices_per_node"], need)
    return parse_topology(raw, check_paths=False)


def expected_manifest(topo: Topology) -> dict:
    """What the store's manifest must say for this topology's student to train on it."""
    tjob = teacher_job(topo, topo.output)
    m = store_manifest(tjob, store_identity(tjob), build_source(topo.data.source).fingerprint(),
                       topo.teacher_spec().patch_size)
    for key in NOT_COMPARED:
        m.pop(key)
    return m


def check_store(reader: StoreReader, topo: Topology, follow: bool) -> None:
    """Refuse a store this run cannot use, before any rank starts; each error is one line."""
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


def run_replay(topology: str | Path, student: str, store: str | None = None, arch: str | None = None,
               out: str | None = None, devices: int | None = None, iterations: int | None = None,
               follow: bool = False, follow_timeout: float = 60.0, metrics_port: int | None = None,
               grace_s: float = 5.0, progress_every_s: float = 5.0, echo=print) -> dict:
    """Train `student` from a target store; returns the summary (also `<out>/summary.json`)."""
    overrides: dict = {}
    if iterations is not None:
        overrides["train.iterations"] = iterations
    base = load_topology(topology, overrides)
    # never the live run's own output folder: its topology.yaml, run.json, logs and summary would be
    # overwritten by the replay's
    default = Path(base.output) / f"add-student-{student}"
    out_dir = Path(out).expanduser().resolve() if out is not None else default
    base.output = str(out_dir)
    topo = replay_topology(base, student, arch, devices)
    if store is None:
        if topo.store is None:
            raise DinodistError("--store: required (the topology has no store:)")
        store = topo.store.path
    store_path = Path(store).expanduser().resolve()
    if not follow and not (store_path / "manifest.json").is_file():
        raise DinodistError(f"--store: {store_path} is not a target store (no manifest.json)")
    reader = StoreReader(store_path, follow=follow, timeout_s=follow_timeout if follow else None)
    check_store(reader, topo, follow)

    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = out_dir / "topology.yaml"
    resolved.write_text(topo.to_yaml())
    group = topo.students[0]
    n = group.devices
    args = [str(resolved), "--out", str(out_dir), "--replay", str(store_path), "--student", student]
    if follow:
        args += ["--follow", "--follow-timeout", str(follow_timeout)]
    title = (f"dinodist add-student: {student} ({group.arch}) on {n} rank{'s' if n > 1 else ''}, "
             f"{'following' if follow else 'replaying'} {store_path}")
    started = time.monotonic()
    error = None
    try:
        launch_and_supervise(topo, {r: student for r in range(n)}, args, out_dir, title,
                             metrics_port=metrics_port, grace_s=grace_s, progress_every_s=progress_every_s,
                             echo=echo)
    except DinodistError as exc:
        error = str(exc)
        raise
    finally:
        summary = summarize_replay(out_dir, student, store_path, follow, error)
        summary["wall_seconds"] = time.monotonic() - started
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    g = summary["groups"][student]
    echo(f"{student:<14} {g['iterations']} iterations, {g['images']} images, "
         f"{g['mean_step_seconds'] or 0:.3f} s/it, wait {g['mean_wait_seconds'] or 0:.3f} s/it")
    echo(f"teacher forwards: {summary['teacher_forwards']} (replayed {summary['iterations']} iterations from "
         f"{store_path}); summary {out_dir / 'summary.json'}")
    return summary


def summarize_replay(out_dir: Path, student: str, store: Path, follow: bool, error: str | None) -> dict:
    path = out_dir / student / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    logs = [json.loads(p.read_text()) for p in sorted((out_dir / "logs").glob("rank-*.json"))]
    n = len(rows)
    summary = {
        "iterations": n,
        # counted by the ranks, which never build a teacher: the point of a replay
        "teacher_forwards": sum(x.get("teacher_forwards", 0) for x in logs),
        "store": str(store),
        "follow": follow,
        "store_bytes_read": sum(x.get("store_bytes_read", 0) for x in logs),
        "groups": {student: {
            "iterations": n,
            "images": sum(r.get("images", 0) for r in rows),
            "mean_step_seconds": sum(r["step_seconds"] for r in rows) / n if n else None,
            "mean_wait_seconds": sum(r["wait_seconds"] for r in rows) / n if n else None,
        }},
    }
    if logs and "store_newest_at_start" in logs[0]:
        summary["store_newest_at_start"] = logs[0]["store_newest_at_start"]
        summary["caught_up_at"] = logs[0].get("caught_up_at")
    if error is not None:
        summary["error"] = error
    return summary


# ------------------------------------------------------------------------------- one replay rank


def run_replay_rank(topo: Topology, out_dir: Path, store: str, name: str | None, follow: bool,
                    follow_timeout: float) -> int:
    """One rank of the new group (`python -m dinodist.orchestrator.rank ... --replay STORE --student NAME`)."""
    if not name:
        raise DinodistError("--replay needs --student NAME")
    group_spec = topo.student(name)
    n = group_spec.devices
    info = init_from_env(topo.resolved_backend(), timeout_s=120)
    if info.world_size != n:
        raise DinodistError(f"WORLD_SIZE is {info.world_size} but student {name!r} has {n} devices")
    ranks = list(range(n))
    (pg,) = make_subgroups([ranks])
    mesh = group_mesh(pg, ranks, info.device.type)
    g = topo.train.global_batch_size
    # rows as in a live run: the students' split does not depend on the teacher (rank n is a stand-in)
    start, stop = ExchangePlan(g, [n], {name: ranks},
                               even_batches=topo.train.even_batches).student_rows(info.rank)
    job = student_job(topo, name, out_dir)
    reader = StoreReader(store, follow=follow, poll_s=0.1, timeout_s=follow_timeout if follow else None)
    last = reader.last_layers() if job.kind == HEADS else None
    num_samples = len(build_source(topo.data.source))
    seed = topo.train.seed

    def sampler(it: int):
        return global_batch(it, g, num_samples, seed)

    source = StoreTargetSource(reader, start, stop, job.kind, follow=follow,
                               timeout_s=follow_timeout if follow else None, sampler=sampler)
    newest_at_start = source.newest()
    control = start_control(topo, info.rank, name, "student",
                            {"world_size": n, "group_rank": info.rank, "group_size": n})
    report = control.report if control is not None else None
    ctx = GroupContext(pg, mesh, info.rank, n, start, stop, info.device)
    record = {"rank": info.rank, "group": name, "role": "student", "replay": str(store), "follow": follow,
              "teacher_forwards": 0, "store_newest_at_start": newest_at_start}
    try:
        try:
            totals = train_student(job, source, last, ctx, report)
        finally:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            record.update(caught_up_at=source.caught_up_at, store_bytes_read=source.bytes_read,
                          cpu_seconds=usage.ru_utime + usage.ru_stime)
            logs = out_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"rank-{info.rank}.json").write_text(json.dumps(record))
        record.update(totals)
        (out_dir / "logs" / f"rank-{info.rank}.json").write_text(json.dumps(record))
        log.info("replay rank %d (%s) done: %s", info.rank, name, totals)
    except StoreStopped as exc:
        message = (f"rank {info.rank} ({name}): stopped after iteration {exc.last_iteration}, the last "
                   f"complete record: {exc}")
        if control is not None:
            control.close("error", message)
        raise DinodistError(message) from None
    except BaseException as exc:
        if control is not None:
            control.close("error", f"rank {info.rank} ({name}): {exc}")
        raise
    if control is not None:
        control.close("done")
    destroy()
    return 0
