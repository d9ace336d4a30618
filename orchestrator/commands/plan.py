"""`dinodist plan TOPOLOGY`: validate a topology and print the allocation with predicted times.

Needs no GPU: device throughput, memory and the teacher's all-gathers come from the cost model
(orchestrator/cost.py), optionally calibrated by the step times of an earlier run. Besides the
groups it prints the teacher's layout (`teacher.shard`, or the one `auto` picks, with its
communication time and the layouts it was weighed against) and where each group's ranks sit.
`--json` has the same under "teacher_layout" and each group's "placement".

Target store cost: when the topology has a `store:` (or with `--store-cost`), the plan adds the
store's bytes per image, per iteration, per 10^6 iterations, for the whole run and what its
retention keeps on disk (core.target_store.bytes_per_image: the expected size of a record from
the teacher's head widths, the crop grid and the mean masked fraction). `--json` adds the same
under "store_cost". `--store-cost` also lists every storage dtype.
"""

from __future__ import annotations

import argparse
import json

from dinodist.core.errors import DinodistError
from dinodist.core.target_store import bytes_per_image, bytes_per_million_iterations
from dinodist.orchestrator.allocate import make_plan, plan_table
from dinodist.orchestrator.cost import calibrate
from dinodist.orchestrator.topology import Topology, check_runnable, load_topology

STORE_DTYPES = ("fp32", "bf16", "int8")
_COLUMNS = ("bytes_per_image", "bytes_per_iteration", "bytes_per_million_iterations", "bytes_for_run",
            "bytes_retained")


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
    p.add_argument("--store-cost", action="store_true",
                   help="add the target store's size (per image, per iteration, per 10^6 iterations, "
                   "retained) for every storage dtype, even without a `store:` in the topology")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a topology field, e.g. --set train.global_batch_size=512 (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    topo = load_topology(args.topology, overrides=args.set, check_paths=True)
    plan = make_plan(topo, devices=args.devices)
    if args.calibrate:
        factors = calibrate(topo, args.calibrate, {g.name: g.devices for g in plan.groups})
        plan = make_plan(topo, devices=args.devices, calibration=factors)
    cost = store_cost(topo, all_dtypes=args.store_cost) if (topo.store or args.store_cost) else None
    refused = runtime_refusal(topo)
    if args.json:
        out = plan.to_dict()
        if cost is not None:
            out["store_cost"] = cost
        out["runtime_refuses"] = refused
        c = topo.control
        out["timeouts"] = {"heartbeat_s": c.heartbeat_timeout_s, "progress_s": c.progress_timeout_s,
                           "collective_s": c.collective_timeout_s, "startup_s": c.startup_timeout_s}
        print(json.dumps(out, indent=1))
    else:
        print(plan_table(plan))
        print(topo.control.timeouts_line())
        if args.calibrate:
            cal = ", ".join(f"{g.name} x{g.calibration:.2f}" for g in plan.groups)
            print(f"calibrated from {args.calibrate}: {cal}")
        if cost is not None:
            print("\n" + store_cost_table(cost))
        if refused is not None:
            print(f"\nnote: planned as written, but distill, add-student and deploy refuse it for now: "
                  f"{refused}")
    return 0


def runtime_refusal(topo: Topology) -> str | None:
    """Why the runtime would refuse this topology (a setting it does not apply yet), or None."""
    try:
        check_runnable(topo)
    except DinodistError as exc:
        return str(exc)
    return None


def _cost(topo: Topology, dtype: str, retain: int | str) -> dict:
    spec = topo.teacher_spec()
    d, tr = topo.data, topo.train
    kw = {"targets": topo.teacher.targets, "dino_dim": topo.dino_head().bottleneck_dim,
          "ibot_dim": topo.ibot_head().bottleneck_dim,
          "patches_per_crop": (d.global_crop_size // spec.patch_size) ** 2,
          # masks: a sample is masked with mask_probability, at a ratio uniform in mask_ratio
          "masked_fraction": d.mask_probability * sum(d.mask_ratio) / 2, "dtype": dtype,
          "feature_dim": spec.embed_dim}
    per_million = bytes_per_million_iterations(tr.global_batch_size, **kw)
    per_iteration = per_million / 1e6
    kept = tr.iterations if retain == "all" else min(int(retain), tr.iterations)
    return {"dtype": dtype, "retain": retain, "bytes_per_image": bytes_per_image(**kw),
            "bytes_per_iteration": per_iteration, "bytes_per_million_iterations": per_million,
            "bytes_for_run": per_iteration * tr.iterations, "bytes_retained": per_iteration * kept}


def store_cost(topo: Topology, all_dtypes: bool = False) -> dict:
    """Expected target-store size for the topology's store (bf16, keep all, when it has none)."""
    dtype = topo.store.dtype if topo.store else "bf16"
    retain = topo.store.retain if topo.store else "all"
    cost = {"configured": topo.store is not None, "path": topo.store.path if topo.store else None,
            **_cost(topo, dtype, retain)}
    if all_dtypes:
        cost["by_dtype"] = {dt: _cost(topo, dt, retain) for dt in STORE_DTYPES}
    return cost


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def store_cost_table(cost: dict) -> str:
    where = cost["path"] if cost["configured"] else "not configured (topology has no store:)"
    retain = "all" if cost["retain"] == "all" else f"last {cost['retain']} iterations"
    lines = [f"target store: {where}; retain {retain}",
             "dtype  bytes/image  bytes/iter  per 1e6 iters  whole run  retained"]
    rows = cost.get("by_dtype") or {cost["dtype"]: cost}
    for dt, c in rows.items():
        mark = "*" if cost["configured"] and dt == cost["dtype"] else " "
        cells = [_bytes(c[k]) for k in _COLUMNS]
        widths = (11, 10, 13, 9, 8)
        lines.append(f"{dt + mark:<6} " + "  ".join(f"{x:>{w}}" for x, w in zip(cells, widths)))
    return "\n".join(lines)
