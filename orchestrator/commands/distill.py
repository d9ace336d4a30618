"""`dinodist distill TOPOLOGY`: one frozen teacher, many students, one run."""

from __future__ import annotations

import argparse
import logging


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinodist.orchestrator.distill import run_distill

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_distill(args.topology, out=args.out, iterations=args.iterations, metrics_port=args.metrics_port,
                echo=lambda line: print(line, flush=True))
    return 0
