"""`dinodist add-student`: train a new student group from a target store, with no teacher.

The driver side (no torch, nothing of the rank runtime): build the replay job's topology (its only
student group is the new one), plan it, check the store, then launch and supervise the group's
ranks with the same machinery as `dinodist distill` (control plane, /metrics, failure policy), in a
world of only the new group's ranks. The ranks run orchestrator/runtime/replay.py: the same
`train_student` loop as a live student, with a `StoreTargetSource`.

Before any rank starts, the store is checked against the topology (teacher hash, data fingerprint,
crop and masking config, batch size, seed: one-line error naming the first field that differs)
and, for a plain replay, for every iteration the run needs. With `follow=True` the ranks tail a
store that a live run is still writing: they catch up, then train as records arrive; if the writer
closes the store early or stops writing for `follow_timeout` seconds (killed), they stop after the
last complete record and the command fails naming it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dinodist.core.errors import DinodistError
from dinodist.orchestrator.allocate import make_plan
from dinodist.orchestrator.distill import launch_and_supervise
from dinodist.orchestrator.launch import run_rank_check
from dinodist.orchestrator.planfile import write_plan
from dinodist.orchestrator.topology import Topology, check_runnable, load_topology, parse_topology

PREFLIGHT_TIMEOUT_S = 120.0  # a rank program that loads torch, the data source and the store manifest
FOLLOW_TIMEOUT_S = 60.0  # --follow: silence (no new record, no CLOSED) after which the writer counts as dead


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


def run_add_student(topology: str | Path, student: str, store: str | None = None, arch: str | None = None,
                    out: str | None = None, devices: int | None = None, iterations: int | None = None,
                    follow: bool = False, follow_timeout: float = FOLLOW_TIMEOUT_S,
                    metrics_port: int | None = None, progress_every_s: float = 5.0, echo=print) -> dict:
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
    check_runnable(topo)
    if store is None:
        if topo.store is None:
            raise DinodistError("--store: required (the topology has no store:)")
        store = topo.store.path
    store_path = Path(store).expanduser().resolve()
    if not follow and not (store_path / "manifest.json").is_file():
        raise DinodistError(f"--store: {store_path} is not a target store (no manifest.json)")
    plan = make_plan(topo)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = out_dir / "topology.yaml"
    resolved.write_text(topo.to_yaml())
    write_plan(out_dir, plan.to_dict())
    group = topo.students[0]
    n = plan.group(student).devices
    args = [str(resolved), "--out", str(out_dir), "--replay", str(store_path), "--student", student]
    if follow:
        args += ["--follow", "--follow-timeout", str(follow_timeout)]
    # the store must match the topology before any rank starts; the rank program checks it (it owns
    # the topology -> teacher job mapping the manifest is made from), as a short preflight process
    run_rank_check([*args, "--check"], timeout_s=PREFLIGHT_TIMEOUT_S + (follow_timeout if follow else 0))
    title = (f"dinodist add-student: {student} ({group.arch}) on {n} rank{'s' if n > 1 else ''}, "
             f"{'following' if follow else 'replaying'} {store_path}")
    started = time.monotonic()
    error = None
    try:
        launch_and_supervise(topo, {r: student for r in range(n)}, args, out_dir, title,
                             metrics_port=metrics_port, progress_every_s=progress_every_s, echo=echo)
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
