"""The `dinodist distill` orchestrator: plan -> control plane + /metrics -> launch -> watch -> summary.

It never touches a tensor (nor imports torch or the rank runtime). It plans once and writes the
resolved topology (`<out>/topology.yaml`: every `auto` replaced by the plan's device counts) and
the plan (`<out>/plan.json`), which is what every rank then reads, so all ranks agree on the
groups without planning again. It serves the control plane and Prometheus metrics, starts the
ranks, prints one progress line per group, and applies the failure policy: the first rank that
dies or fails stops the whole job (stop command, then SIGKILL after `control.grace_s`) and the
command exits non-zero with a message naming the rank and its group.

`--resume` continues a run in the same output folder from the newest checkpoint every group holds
(the ranks agree on it; from scratch when there is none). SIGTERM or SIGUSR1 to the driver asks the
ranks to preempt (control command `preempt`): every group checkpoints at the same iteration and the
command exits with core.train.preempt.PREEMPTED_EXIT (75); `--resume` continues it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import yaml

from dinodist.core.data.index import write_index
from dinodist.core.errors import DinodistError
from dinodist.core.train.metrics import knn_last_best
from dinodist.core.train.preempt import PREEMPTED_EXIT, Preempted
from dinodist.orchestrator.allocate import Plan, make_plan
from dinodist.orchestrator.control import server_from_config, supervise
from dinodist.orchestrator.launch import launch_ranks
from dinodist.orchestrator.metrics import MetricsExporter, progress_line
from dinodist.orchestrator.planfile import DATA_INDEX_FILE, PLAN_FILE, read_plan, write_plan
from dinodist.orchestrator.topology import Topology, check_runnable, eval_indexes, load_topology

log = logging.getLogger("dinodist.distill")

# a restarted group follows the store; with no progress timeout, silence this long means the teacher died
RESTART_FOLLOW_TIMEOUT_S = 600.0


def resolved_topology(topo: Topology, plan: Plan) -> dict:
    """The topology with every `auto` replaced by the plan's device counts."""
    raw = topo.model_dump(mode="json")
    raw["teacher"]["devices"] = plan.group("teacher").devices
    for s in raw["students"]:
        s["devices"] = plan.group(s["name"]).devices
    return raw


BEST_BACKBONE = "backbone-best.pth"  # students/run.py writes it at each new best k-NN


QUALITY_WINDOW = 5  # iterations averaged at each end: one iteration's 2 x batch crops is a noisy sample


def _first_last(rows: list[dict], key: str) -> dict | None:
    """Mean of `key` over the first and over the last `window` rows that have it, and their iterations."""
    have = [r for r in rows if r.get(key) is not None]
    if not have:
        return None
    w = max(1, min(QUALITY_WINDOW, len(have) // 2))
    head, tail = have[:w], have[-w:]
    return {"first": sum(r[key] for r in head) / w, "first_iteration": head[0]["iteration"],
            "last": sum(r[key] for r in tail) / w, "last_iteration": tail[-1]["iteration"], "window": w}


def _knn_summary(rows: list[dict], group_dir: Path) -> dict | None:
    """Last and best k-NN of a group's metrics rows, and the backbone of the best, when it is that one.

    `backbone-best.pth` is trusted only while its sidecar names the best row's iteration (it counts
    iterations done: the row's + 1): after a resume, a file written on an abandoned timeline past the
    resume point is not reported as the best."""
    knn = knn_last_best(rows)
    if knn is None:
        return None
    backbone = None
    side = group_dir / (BEST_BACKBONE + ".json")
    try:
        if json.loads(side.read_text())["source"]["iteration"] == knn["best_iteration"] + 1:
            backbone = str(group_dir / BEST_BACKBONE)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seconds = [r.get("knn_seconds", 0.0) for r in rows if isinstance(r.get("knn_top1"), int | float)]
    return {**knn, "best_backbone": backbone, "mean_seconds": sum(seconds) / len(seconds)}


def summarize(out_dir: Path, plan: Plan) -> dict:
    """`summary.json` from the groups' metrics.jsonl and the teacher's stats.json."""
    groups = {}
    iterations = None
    for g in plan.groups:
        path = out_dir / g.name / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = [json.loads(line) for line in lines if line.strip()]
        n = len(rows)
        groups[g.name] = {
            "iterations": n,
            "images": sum(r.get("images", 0) for r in rows),
            "mean_step_seconds": sum(r["step_seconds"] for r in rows) / n if n else None,
            "mean_wait_seconds": sum(r["wait_seconds"] for r in rows) / n if n else None,
        }
        if g.role == "student":
            iterations = n if iterations is None else min(iterations, n)
            for key in ("teacher_agreement", "teacher_cosine"):
                measured = _first_last(rows, key)
                if measured is not None:
                    groups[g.name][key] = measured
            knn = _knn_summary(rows, out_dir / g.name)
            if knn is not None:
                groups[g.name]["knn_top1"] = knn
    stats_path = out_dir / "teacher" / "stats.json"
    teacher = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    if "teacher" in groups and teacher.get("knn_top1") is not None:
        groups["teacher"]["knn_top1"] = {"last": teacher["knn_top1"],
                                         "mean_seconds": teacher.get("knn_seconds")}
    out = {
        "iterations": iterations or 0,
        # forwards of the run's iterations: those before the resume point were run (once) by the run
        # that wrote its checkpoint, the rest by this one
        "teacher_forwards": teacher.get("start_iteration", 0) + teacher.get("teacher_forwards", 0),
        "teacher_forwards_this_run": teacher.get("teacher_forwards", 0),
        # where the last teacher process started: a resume point, or where a restarted teacher picked up
        # the target store (the iterations the failed one had computed but not stored are recomputed)
        ("teacher_restarted_at" if teacher.get("restarted") else "resumed_at"):
            teacher.get("start_iteration", 0),
        "target_bytes_sent": teacher.get("target_bytes_sent_all_ranks", 0),
        "groups": groups,
    }
    if "preempted_at" in teacher:
        out["preempted_at"] = teacher["preempted_at"]
    return out


def quality_line(group: dict) -> str:
    """What a group learned, from its summary: teacher agreement and cosine (first -> last iteration) and
    k-NN top-1 when measured; "" when nothing was."""
    parts = []
    for key, label in (("teacher_agreement", "agreement"), ("teacher_cosine", "cosine")):
        q = group.get(key)
        if q is not None:
            w, a, b = q.get("window", 1), q["first_iteration"], q["last_iteration"]
            first = a if w == 1 else f"{a}-{a + w - 1}"
            last = b if w == 1 else f"{b - w + 1}-{b}"
            parts.append(f"{label} {q['first']:.3f} (it {first}) -> {q['last']:.3f} (it {last})")
    knn = group.get("knn_top1")
    if knn is not None:
        text = f"k-NN top-1 {knn['last']:.3f}"
        if "best" in knn:
            text += (f" (it {knn['last_iteration']}; best {knn['best']:.3f} at it {knn['best_iteration']}"
                     + (f", {Path(knn['best_backbone']).name}" if knn.get("best_backbone") else "") + ")")
        parts.append(text)
    return ", ".join(parts)


def _check_resumable(out_dir: Path, plan: Plan) -> None:
    """--resume in a folder of another plan would load checkpoints into other groups: refuse."""
    old_path = out_dir / PLAN_FILE
    if not old_path.is_file():
        return
    old = {g.name: (g.arch, list(g.ranks)) for g in read_plan(old_path).groups}
    new = {g.name: (g.arch, list(g.ranks)) for g in plan.groups}
    if old != new:
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise DinodistError(f"--resume: {old_path} was planned for other groups (differs in "
                            f"{', '.join(changed)}); resume with that run's topology or use another --out")


def run_distill(topology: str | Path, out: str | None = None, iterations: int | None = None,
                metrics_port: int | None = None, progress_every_s: float = 5.0, echo=print,
                resume: bool = False) -> dict:
    """Run a whole distillation job; returns the summary, raises DinodistError on failure and Preempted
    (after writing the summary) when it was asked to stop early."""
    overrides: dict = {}
    if iterations is not None:
        overrides["train.iterations"] = iterations
    if out is not None:
        overrides["output"] = out
    topo = load_topology(topology, overrides)
    check_runnable(topo)
    plan = make_plan(topo)
    out_dir = Path(topo.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_resumable(out_dir, plan)
    resolved = out_dir / "topology.yaml"
    resolved.write_text(yaml.safe_dump(resolved_topology(topo, plan), sort_keys=False))
    write_plan(out_dir, plan.to_dict())
    # listed once here rather than walked by every rank; a rank refuses data that no longer matches it
    write_index(topo.data.source, out_dir / DATA_INDEX_FILE)
    eval_indexes(topo, out_dir)  # the same for eval.knn's sources, which must have labels
    world = plan.used_devices
    expected = {r: g.name for g in plan.groups for r in g.ranks}
    started = time.monotonic()
    title = (f"dinodist distill: {topo.name}: {world} ranks "
             + ", ".join(f"{g.name} {g.devices}" for g in plan.groups))
    rank_args = [str(resolved), "--out", str(out_dir)] + (["--resume"] if resume else [])
    store = topo.target_store_path(out_dir)

    def restart_args(group: str) -> list[str]:
        if group == "teacher":
            # the teacher ranks' own world, continuing the store the students follow meanwhile
            return [str(resolved), "--out", str(out_dir), "--restarted-teacher"]
        # the group's own world, following the store the live teacher keeps writing, from its checkpoint
        return [str(resolved), "--out", str(out_dir), "--replay", str(store), "--student", group, "--follow",
                "--follow-timeout", f"{topo.control.progress_timeout_s or RESTART_FOLLOW_TIMEOUT_S:g}",
                "--resume"]

    preempted = None
    restarts: dict[str, int] = {}
    try:
        launch_and_supervise(topo, expected, rank_args, out_dir, title, metrics_port=metrics_port,
                             progress_every_s=progress_every_s, echo=echo,
                             restarts=restarts, restart_args=restart_args if store is not None and
                             topo.control.on_failure == "restart_group" else None)
    except Preempted as exc:
        preempted = exc
    summary = summarize(out_dir, plan)
    summary["restarts"] = restarts
    summary["wall_seconds"] = time.monotonic() - started
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if preempted is not None:
        at = summary.get("preempted_at")
        raise Preempted(f"preempted: every group checkpointed at iteration {at}; continue with --resume "
                        f"(summary {out_dir / 'summary.json'})", at or 0)
    for name, g in summary["groups"].items():
        echo(f"{name:<14} {g['iterations']} iterations, {g['images']} images, "
             f"{g['mean_step_seconds'] or 0:.3f} s/it, wait {g['mean_wait_seconds'] or 0:.3f} s/it")
    for name, g in summary["groups"].items():
        line = quality_line(g)
        if line:
            echo(f"{name:<14} {line}")
    echo(f"teacher forwards: {summary['teacher_forwards']} for {summary['iterations']} iterations; "
         f"summary {out_dir / 'summary.json'}")
    return summary


def launch_and_supervise(topo: Topology, expected: dict[int, str], rank_args: list[str], out_dir: Path,
                         title: str, metrics_port: int | None = None, progress_every_s: float = 5.0,
                         echo=print, restart_args=None, restarts: dict[str, int] | None = None) -> None:
    """Serve control + /metrics, start one rank program (launch.RANK_MODULE RANK_ARGS) per entry of
    `expected` (rank -> group), watch them; raises DinodistError naming the failed rank. Shared by
    `distill` and `add-student` (orchestrator/add_student.py), whose world is the new group's ranks
    only.

    `restart_args(group)` (restart_group policy): the rank arguments a failed student group is started
    again with, as a world of its own; `restarts` counts them per group. `<out>/run.json` lists every
    group's ranks and each rank's current pid, rewritten after every restart."""
    world = len(expected)
    grace_s = topo.control.grace_s
    port = topo.metrics.port if metrics_port is None else metrics_port
    exporter = MetricsExporter(port=port)
    names = list(dict.fromkeys(expected.values()))
    students = [name for name in names if name != "teacher"]
    server = server_from_config(topo.control, expected, on_message=exporter.observe_message,
                                on_event=exporter.observe_event,
                                restartable=names if restart_args is not None else ())
    exporter.track_rejections(server.rejected_counts)
    # ranks get their own control key (env_of), never the job secret
    secret_vars = [topo.control.secret_env] if topo.control.secret_env else []
    restarts = restarts if restarts is not None else {}
    for name in students:
        exporter.set_attached(name, True)
    run_info = {"metrics_url": exporter.url, "control": server.address, "world_size": world,
                "groups": {name: [r for r, g in expected.items() if g == name]
                           for name in dict.fromkeys(expected.values())}}
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=1))
    echo(f"{title}; metrics {exporter.url}; logs {out_dir / 'logs'}")
    launcher = None
    launchers = []  # every launcher started: the first, then one per group restart
    current: dict[int, object] = {}  # rank -> its current RankProcess

    def write_run_info() -> None:
        run_info["pids"] = {str(r): p.proc.pid for r, p in sorted(current.items())}
        run_info["restarts"] = dict(restarts)
        tmp = out_dir / "run.json.tmp"
        tmp.write_text(json.dumps(run_info, indent=1))
        tmp.replace(out_dir / "run.json")

    def restart(group: str) -> dict:
        ranks = sorted(r for r, g in expected.items() if g == group)
        n = restarts.get(group, 0)  # supervise counted this restart already
        what = ("continuing the target store, which the students follow meanwhile" if group == "teacher"
                else "from the group's checkpoint; the other groups go on")
        echo(f"{group}: restarting its {len(ranks)} rank(s), {what} (restart {n} of at most "
             f"{topo.control.max_restarts})")
        new = launch_ranks(len(ranks), restart_args(group), out_dir / "logs", control_addr=server.address,
                           names=ranks, log_suffix=f".restart{n}", env_of=server.rank_env,
                           drop_env=secret_vars)
        launchers.append(new)
        current.update({r.rank: r for r in new.ranks})
        write_run_info()
        exporter.record_restart(group)
        exporter.set_attached(group, True)
        return {r.rank: r.proc for r in new.ranks}

    try:
        launcher = launch_ranks(world, rank_args, out_dir / "logs", control_addr=server.address,
                                env_of=server.rank_env, drop_env=secret_vars)
        launchers.append(launcher)
        current.update({r.rank: r for r in launcher.ranks})
        write_run_info()

        def kill(ranks: list[int]) -> None:
            for r in ranks:
                proc = current[r].proc
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass

        def failed_group(group: str) -> None:
            exporter.set_attached(group, False)

        with _preempt_signals(echo) as asked:
            outcome = supervise(server, {r: p.proc for r, p in current.items()}, grace_s=grace_s, kill=kill,
                                progress=lambda st: echo(progress_line(st)),
                                progress_every_s=progress_every_s, preempt=asked,
                                restart=restart if restart_args is not None else None,
                                max_restarts=topo.control.max_restarts, restarts=restarts,
                                on_group_failure=failed_group)
    finally:
        for ln in launchers:
            ln.stop(grace_s=1.0)
        server.close()
        exporter.close()
    if outcome.exit_code == PREEMPTED_EXIT:
        raise Preempted(outcome.message, 0)
    if outcome.exit_code != 0:
        message = root_cause(server.ranks(), outcome)
        failed = _first_failed_rank(message)
        where = current[failed].log_path if failed in current else out_dir / "logs"
        hint = f" (see {where})"
        raise DinodistError(message + hint)


class _preempt_signals:
    """While supervising: SIGTERM / SIGUSR1 to the driver become a `preempt` request to the ranks (the
    scheduler's notice reaches the ranks through the supervisor); `asked()` says whether one came."""

    def __init__(self, echo) -> None:
        self.echo, self.flag, self.old = echo, False, {}

    def __enter__(self):
        def handler(signum, _frame) -> None:
            if not self.flag:
                self.echo(f"{signal.Signals(signum).name}: asking every group to checkpoint and stop")
            self.flag = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.old[sig] = signal.signal(sig, handler)
        return lambda: self.flag

    def __exit__(self, *exc) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)


def root_cause(states: dict, outcome) -> str:
    """The failure to report: a rank killed from outside beats the errors it caused in its peers.

    When a rank dies, its peers fail too (gloo: "connection closed by peer") and one of them may
    report first; the user needs the rank that died, not the first to notice.
    """
    killed_outside = [st for st in states.values()
                      if st.exit_code is not None and st.exit_code < 0 and st.rank not in outcome.killed]
    if killed_outside:
        st = min(killed_outside, key=lambda s: s.rank)
        return f"rank {st.rank} (group {st.group}) was killed by signal {-st.exit_code}"
    # on another node exit codes are unseen: a rank that fell silent is what its peers' errors are about
    silent = [st for st in states.values() if st.status == "dead" and st.reason
              and ("missed heartbeats" in st.reason or "is gone" in st.reason)]
    if silent:
        return min(silent, key=lambda s: s.rank).reason
    return outcome.message


def _first_failed_rank(message: str) -> int | None:
    words = message.split()
    for a, b in zip(words, words[1:]):
        if a == "rank" and b.isdigit():
            return int(b)
    return None
