"""`dinodist plan TOPOLOGY`: validate a topology and print the allocation with predicted times.

Needs no GPU: device throughput and memory come from the cost model (orchestrator/cost.py),
optionally calibrated by the step times of an earlier run.
"""

from __future__ import annotations

import argparse
import json

from orchestrator.allocate import make_plan, plan_table
from orchestrator.cost import calibrate
from orchestrator.topology import load_topology


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="allocate devices to the teacher and students and predict iteration times",
        description="Validate TOPOLOGY, choose device counts that match the groups' iteration times, "
        "and print the rank map with predicted seconds per iteration, wait and memory per rank.",
    )
    p.add_argument("topology", metavar="TOPOLOGY", help="topology YAML file")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="plan for N devices instead of cluster.nodes x cluster.devices_per_node")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibrate", metavar="RUN_DIR", default=None,
                   help="scale each group's cost by measured/predicted step time "
                   "from RUN_DIR/<group>/metrics.jsonl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a topology field, e.g. --set train.global_batch_size=512 (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    topo = load_topology(args.topology, overrides=args.set, check_paths=True)
    plan = make_plan(topo, devices=args.devices)
    if args.calibrate:
        factors = calibrate(topo, args.calibrate, {g.name: g.devices for g in plan.groups})
        plan = make_plan(topo, devices=args.devices, calibration=factors)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(plan_table(plan))
        if args.calibrate:
            cal = ", ".join(f"{g.name} x{g.calibration:.2f}" for g in plan.groups)
            print(f"calibrated from {args.calibrate}: {cal}")
    return 0
