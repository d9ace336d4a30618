"""The `dinodist distill` orchestrator: plan -> control plane + /metrics -> launch -> watch -> summary.

It never touches a tensor (nor imports torch or the rank runtime). It plans once and writes the
resolved topology (`<out>/topology.yaml`: every `auto` replaced by the plan's device counts) and
the plan (`<out>/plan.json`), which is what every rank then reads, so all ranks agree on the
groups without planning again. It serves the control plane and Prometheus metrics, starts the
ranks, prints one progress line per group, and applies the failure policy: the first rank that
dies or fails stops the whole job (stop command, then SIGKILL after `control.grace_s`) and the
command exits non-zero with a message naming the rank and its group.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from dinodist.core.errors import DinodistError
from dinodist.orchestrator.allocate import Plan, make_plan
from dinodist.orchestrator.control import server_from_config, supervise
from dinodist.orchestrator.launch import launch_ranks
from dinodist.orchestrator.metrics import MetricsExporter, progress_line
from dinodist.orchestrator.planfile import write_plan
from dinodist.orchestrator.topology import Topology, check_runnable, load_topology

log = logging.getLogger("dinodist.distill")


def resolved_topology(topo: Topology, plan: Plan) -> dict:
    """The topology with every `auto` replaced by the plan's device counts."""
    raw = topo.model_dump(mode="json")
    raw["teacher"]["devices"] = plan.group("teacher").devices
    for s in raw["students"]:
        s["devices"] = plan.group(s["name"]).devices
    return raw


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
    stats_path = out_dir / "teacher" / "stats.json"
    teacher = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return {
        "iterations": iterations or 0,
        "teacher_forwards": teacher.get("teacher_forwards", 0),
        "target_bytes_sent": teacher.get("target_bytes_sent_all_ranks", 0),
        "groups": groups,
    }


def run_distill(topology: str | Path, out: str | None = None, iterations: int | None = None,
                metrics_port: int | None = None, progress_every_s: float = 5.0, echo=print) -> dict:
    """Run a whole distillation job; returns the summary, raises DinodistError on failure."""
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
    resolved = out_dir / "topology.yaml"
    resolved.write_text(yaml.safe_dump(resolved_topology(topo, plan), sort_keys=False))
    write_plan(out_dir, plan.to_dict())
    world = plan.used_devices
    expected = {r: g.name for g in plan.groups for r in g.ranks}
    started = time.monotonic()
    title = (f"dinodist distill: {topo.name}: {world} ranks "
             + ", ".join(f"{g.name} {g.devices}" for g in plan.groups))
    launch_and_supervise(topo, expected, [str(resolved), "--out", str(out_dir)], out_dir, title,
                         metrics_port=metrics_port, progress_every_s=progress_every_s, echo=echo)
    summary = summarize(out_dir, plan)
    summary["wall_seconds"] = time.monotonic() - started
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, g in summary["groups"].items():
        echo(f"{name:<14} {g['iterations']} iterations, {g['images']} images, "
             f"{g['mean_step_seconds'] or 0:.3f} s/it, wait {g['mean_wait_seconds'] or 0:.3f} s/it")
    echo(f"teacher forwards: {summary['teacher_forwards']} for {summary['iterations']} iterations; "
         f"summary {out_dir / 'summary.json'}")
    return summary


def launch_and_supervise(topo: Topology, expected: dict[int, str], rank_args: list[str], out_dir: Path,
                         title: str, metrics_port: int | None = None, progress_every_s: float = 5.0,
                         echo=print) -> None:
    """Serve control + /metrics, start one rank program (launch.RANK_MODULE RANK_ARGS) per entry of
    `expected` (rank -> group), watch them; raises DinodistError naming the failed rank. Shared by
    `distill` and `add-student` (orchestrator/add_student.py), whose world is the new group's ranks
    only."""
    world = len(expected)
    grace_s = topo.control.grace_s
    port = topo.metrics.port if metrics_port is None else metrics_port
    exporter = MetricsExporter(port=port)
    server = server_from_config(topo.control, expected, on_message=exporter.observe_message,
                                on_event=exporter.observe_event)
    run_info = {"metrics_url": exporter.url, "control": server.address, "world_size": world,
                "groups": {name: [r for r, g in expected.items() if g == name]
                           for name in dict.fromkeys(expected.values())}}
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=1))
    echo(f"{title}; metrics {exporter.url}; logs {out_dir / 'logs'}")
    launcher = None
    try:
        launcher = launch_ranks(world, rank_args, out_dir / "logs", control_addr=server.address)
        procs = {r.rank: r.proc for r in launcher.ranks}
        run_info["pids"] = {str(r): p.pid for r, p in procs.items()}
        (out_dir / "run.json").write_text(json.dumps(run_info, indent=1))

        def kill(ranks: list[int]) -> None:
            for r in ranks:
                launcher.kill(r)

        outcome = supervise(server, procs, grace_s=grace_s, kill=kill,
                            progress=lambda st: echo(progress_line(st)), progress_every_s=progress_every_s)
    finally:
        if launcher is not None:
            launcher.stop(grace_s=1.0)
        server.close()
        exporter.close()
    if outcome.exit_code != 0:
        message = root_cause(server.ranks(), outcome)
        failed = _first_failed_rank(message)
        where = launcher.ranks[failed].log_path if failed is not None else out_dir / "logs"
        hint = f" (see {where})"
        raise DinodistError(message + hint)


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
    return outcome.message


def _first_failed_rank(message: str) -> int | None:
    words = message.split()
    for a, b in zip(words, words[1:]):
        if a == "rank" and b.isdigit():
            return int(b)
    return None
