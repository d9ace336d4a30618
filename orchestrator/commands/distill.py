"""`dinodist distill TOPOLOGY`: one frozen teacher, many students, one run."""

from __future__ import annotations

import argparse
import logging
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distill the topology's teacher into all its students at once",
        description="Plan the topology, start every rank (teacher group + student groups) on this machine, "
        "serve the control plane and Prometheus /metrics, and print one progress line per group. "
        "Writes <out>/<group>/metrics.jsonl, checkpoints, <out>/<group>/backbone.pth, "
        "<out>/summary.json and the resolved <out>/topology.yaml.",
    )
    p.add_argument("topology", help="topology YAML (see configs/topologies/)")
    p.add_argument("--out", help="output folder (default: the topology's `output`)")
    p.add_argument("--iterations", type=int, help="override train.iterations")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default: metrics.port; 0 = any free)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from the newest checkpoint every group holds (student "
                   "weights, EMA, optimizer, RNG; teacher and target store from that iteration); from "
                   "scratch when there is none")
    p.epilog = ("SIGTERM or SIGUSR1 makes every group checkpoint at the same iteration and exits with code "
                "75; --resume continues from there.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinodist.orchestrator.distill import run_distill

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from dinodist.core.train.preempt import PREEMPTED_EXIT, Preempted

    try:
        run_distill(args.topology, out=args.out, iterations=args.iterations, metrics_port=args.metrics_port,
                    echo=lambda line: print(line, flush=True), resume=args.resume)
    except Preempted as exc:
        print(f"dinodist distill: {exc}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    return 0
