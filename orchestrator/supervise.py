"""`dinodist supervise`: the supervision `distill` does locally, for ranks that others launch.

On a cluster the ranks are started by torchrun, SLURM or Kubernetes; this process runs beside them
(the generated launch files start it on node 0, or as its own pod) and gives the job what `distill`
gives a local run: the control server every rank reports to ($DINODIST_CONTROL), Prometheus
`/metrics`, one progress line per group, the failure policy, and `summary.json` at the end. It
starts no rank and never touches a tensor (no torch).

Failure policy: with `control.on_failure: stop`, a dead rank (missed heartbeats; no progress for
`control.progress_timeout_s`; an `error` message) makes the supervisor send `stop` to every rank and
exit non-zero naming the rank and its group; the launch files then restart nothing. With
`restart_group` the launcher restarts the ranks (torchrun restarts every rank of a node, which resume
from the common checkpoint, `--resume`); the supervisor forgets the failed group's ranks and waits for
them to register again, at most `control.max_restarts` times per group. Per-group restarts that keep
the other groups running need a supervisor that starts ranks itself (`distill`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from dinodist.core.errors import DinodistError
from dinodist.core.train.preempt import PREEMPTED_EXIT
from dinodist.orchestrator.control import ControlServer, server_from_config, supervise
from dinodist.orchestrator.distill import root_cause, summarize
from dinodist.orchestrator.metrics import MetricsExporter, progress_line
from dinodist.orchestrator.planfile import PLAN_FILE, check_plan_matches, read_plan
from dinodist.orchestrator.topology import load_topology

log = logging.getLogger("dinodist.supervise")


def run_supervisor(topology: str | Path, plan_path: str | Path | None = None, out: str | None = None,
                   bind: str | None = None, port: int | None = None, metrics_port: int | None = None,
                   progress_every_s: float = 5.0, echo=print) -> int:
    """Supervise the job's ranks until they finish; returns the exit code (0, PREEMPTED_EXIT, or 1 after
    a failure, whose line names the rank and its group)."""
    overrides = {"output": out} if out is not None else {}
    topo = load_topology(topology, overrides)
    plan_path = Path(plan_path) if plan_path else Path(topology).parent / PLAN_FILE
    plan = read_plan(plan_path)
    check_plan_matches(plan, topo, str(plan_path))
    out_dir = Path(topo.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = {r: g.name for g in plan.groups for r in g.ranks}
    cfg = topo.control
    changes = {}
    if bind is not None:
        changes["bind"] = bind
    if port is not None:
        changes["port"] = port
    cfg = cfg.model_copy(update=changes)
    exporter = MetricsExporter(port=topo.metrics.port if metrics_port is None else metrics_port,
                               bind=cfg.bind)
    # restart_group: the launcher restarts the ranks (torchrun restarts every rank of its node, which
    # then resume); the supervisor forgets a failed group's ranks and waits for them to register again
    names = [g.name for g in plan.groups]
    restartable = names if cfg.on_failure == "restart_group" else ()
    restarts: dict[str, int] = {}
    try:
        server = server_from_config(cfg, expected, on_message=exporter.observe_message,
                                    on_event=exporter.observe_event, restartable=restartable)
    except BaseException:
        exporter.close()
        raise
    exporter.track_rejections(server.rejected_counts)
    started = time.monotonic()
    run_info = {"metrics_url": exporter.url, "control": server.address, "world_size": len(expected),
                "groups": {g.name: list(g.ranks) for g in plan.groups}}
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=1))
    echo(f"dinodist supervise: {topo.name}: {len(expected)} ranks "
         + ", ".join(f"{g.name} {len(g.ranks)}" for g in plan.groups)
         + f"; control {server.address}; metrics {exporter.url}")
    try:
        outcome = supervise(server, {}, grace_s=cfg.grace_s,
                            progress=lambda st: echo(progress_line(st)), progress_every_s=progress_every_s,
                            restart=(lambda group: {}) if restartable else None,
                            max_restarts=cfg.max_restarts, restarts=restarts)
        if outcome.exit_code != 0:
            # long enough for a rank that died silently (on another node) to be declared dead: the
            # failure line should name it, not the peers whose collectives broke with it
            _deliver_stop(server, max(cfg.grace_s, cfg.heartbeat_timeout_s + 1.0))
    finally:
        server.close()
        exporter.close()
    if outcome.exit_code != 0:
        raise DinodistError(root_cause(server.ranks(), outcome))
    summary = summarize(out_dir, plan)
    summary["wall_seconds"] = time.monotonic() - started
    summary["restarts"] = restarts
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if "preempted_at" in summary:
        # remote exit codes are invisible here: the teacher's stats say the run was preempted
        at = summary["preempted_at"]
        echo(f"dinodist supervise: preempted; every group checkpointed at iteration {at}")
        return PREEMPTED_EXIT
    echo(f"teacher forwards: {summary['teacher_forwards']} for {summary['iterations']} iterations; "
         f"summary {out_dir / 'summary.json'}")
    return 0


def _deliver_stop(server: ControlServer, grace_s: float) -> None:
    """After a failure: keep serving for `grace_s` so every rank receives its `stop` and says `done`."""
    deadline = time.monotonic() + max(grace_s, 1.0)
    while time.monotonic() < deadline:
        server.poll(0.1)
        if all(st.status in ("done", "dead", "error") for st in server.ranks().values()):
            return
