"""`dinodist supervise TOPOLOGY`: control plane, /metrics, failure policy and summary for ranks launched
elsewhere (torchrun, SLURM, Kubernetes)."""

from __future__ import annotations

import argparse
import logging


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "supervise",
        help="supervise the ranks of a deployed job (control plane, /metrics, failure policy, summary)",
        description="Serve the control plane every rank reports to ($DINODIST_CONTROL) and Prometheus "
        "/metrics for a job whose ranks are started by a launcher (the files `dinodist deploy` writes start "
        "it on node 0). Prints one progress line per group; on a failure tells every rank to stop and exits "
        "1 naming the rank and its group; at the end writes <out>/summary.json. Starts no rank.",
    )
    p.add_argument("topology", help="the topology the ranks run")
    p.add_argument("--plan", help="the plan the ranks read (default: plan.json beside TOPOLOGY)")
    p.add_argument("--out", help="the job's output folder (default: the topology's `output`)")
    p.add_argument("--bind", help="control-plane interface (default: control.bind; 0.0.0.0 across nodes, "
                   "which needs control.secret_env)")
    p.add_argument("--port", type=int, help="control-plane port (default: control.port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default: metrics.port; 0 = any free)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinodist.orchestrator.supervise import run_supervisor

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_supervisor(args.topology, plan_path=args.plan, out=args.out, bind=args.bind, port=args.port,
                          metrics_port=args.metrics_port, echo=lambda line: print(line, flush=True))
