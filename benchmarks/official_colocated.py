"""The official colocated multidistillation vs. dinodist's matched groups, through the same cost model.

Official design (the released DINOv3 multidistillation recipe): every rank of the
world runs the 7B teacher (FSDP over all ranks) on its share of the global batch, then its student
group's step; all ranks sync every iteration, so the slowest group sets the pace. Here both designs
are priced by orchestrator/cost.py on the same workload and device count, and dinodist's groups are
sized by orchestrator/allocate.py (even and uneven batches). Prints both side by side (`--json`:
one object with `official`, `dinodist_even`, `dinodist_uneven`).

    python -m benchmarks.official_colocated --official [--device h100] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from dinodist.core.errors import DinodistError
from dinodist.orchestrator.allocate import make_plan, plan_table
from dinodist.orchestrator.cost import (
    PEAK_BF16,
    device_profile,
    student_flops_per_image,
    teacher_flops_per_image,
)
from dinodist.orchestrator.topology import Topology, parse_topology

OFFICIAL_SPLIT = (("vits16", 48), ("vits16plus", 48), ("vitb16", 80), ("vitl16", 120))
OFFICIAL_GLOBAL_BATCH = 1920


def official_topology_dict(device: str = "h100", global_batch: int = OFFICIAL_GLOBAL_BATCH,
                           split: tuple[tuple[str, int], ...] = OFFICIAL_SPLIT, auto: bool = False) -> dict:
    """The released multidistillation workload as a topology: 7B teacher with paper heads,
    256/112 crops with 8 local, students with full activation checkpointing (as released)."""
    world = sum(n for _, n in split)
    # with fixed student counts the (colocated) teacher gets one spare node so the spec validates;
    # official_colocated() only reads the per-image costs from it
    nodes = math.ceil(world / 8) + (0 if auto else 1)
    return {
        "name": "official-multidist",
        "cluster": {"nodes": nodes, "devices_per_node": 8, "device": device},
        "teacher": {"arch": "vit7b16", "devices": "auto", "shard": "auto"},
        "students": [{"name": a, "arch": a, "devices": "auto" if auto else n,
                      "activation_checkpointing": True} for a, n in split],
        "data": {"global_crop_size": 256, "local_crop_size": 112, "local_crops": 8},
        "train": {"global_batch_size": global_batch, "iterations": 1},
        "control": {"secret_env": "DINODIST_SECRET"},
        "output": "runs/official",
    }


def official_colocated(topo: Topology, split: dict[str, int]) -> dict:
    """Official design: every rank of the world runs the teacher (FSDP over all ranks) on its
    ceil(G/W) images, then its student group's step on G/n images; all ranks sync every
    iteration (world all_gather of targets), so the slowest group sets the pace."""
    profile = device_profile(topo)
    g = topo.train.global_batch_size
    world = sum(split.values())
    t_img = teacher_flops_per_image(topo) / profile.flops
    t_teacher = math.ceil(g / world) * t_img
    groups = []
    for name, n in split.items():
        if g % n:
            raise DinodistError(f"official split: global batch {g} not divisible by {n} ranks of {name}")
        t = t_teacher + (g // n) * student_flops_per_image(topo, name) / profile.flops
        groups.append({"name": name, "devices": n, "batch_per_rank": g // n, "seconds_per_iteration": t})
    t_max = max(x["seconds_per_iteration"] for x in groups)
    for x in groups:
        x["wait_fraction"] = 1 - x["seconds_per_iteration"] / t_max
    busy = sum(x["devices"] * x["seconds_per_iteration"] for x in groups)
    # the job's bubble as `Plan.wait_fraction` counts it: useful device-seconds are the teacher on
    # the G images (not the W * ceil(G/W) it runs, padding included) and each student on G images
    useful = g * t_img + sum(g * student_flops_per_image(topo, n) / profile.flops for n in split)
    return {"design": "official colocated", "devices": world, "seconds_per_iteration": t_max,
            "images_per_second": g / t_max, "teacher_seconds_per_rank": t_teacher,
            "idle_fraction": 1 - busy / (world * t_max), "wait_fraction": 1 - useful / (world * t_max),
            "groups": groups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.official_colocated", description=(
        "Cost-model comparisons. --official: the released colocated multidistillation "
        "(7B teacher on all 296 ranks, students 48/48/80/120) vs. dinodist's matched groups "
        "on the same workload and device count."))
    parser.add_argument("--official", action="store_true", required=True)
    parser.add_argument("--device", default="h100", choices=sorted(PEAK_BF16))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    fixed = parse_topology(official_topology_dict(args.device))
    official = official_colocated(fixed, dict(OFFICIAL_SPLIT))
    ours = {}
    for label, even in (("even", True), ("uneven", False)):
        raw = official_topology_dict(args.device, auto=True)
        raw["train"]["even_batches"] = even
        ours[label] = make_plan(parse_topology(raw), devices=official["devices"])
    if args.json:
        print(json.dumps({"official": official, **{f"dinodist_{k}": p.to_dict() for k, p in ours.items()}},
                         indent=1))
        return 0
    print(f"workload: 7B teacher + {', '.join(a for a, _ in OFFICIAL_SPLIT)}, global batch "
          f"{OFFICIAL_GLOBAL_BATCH}, {official['devices']} x {args.device}")
    print(f"official colocated: {official['seconds_per_iteration']:.3f} s/iter, "
          f"{official['images_per_second']:.0f} img/s, job wait {100 * official['wait_fraction']:.1f} %")
    for x in official["groups"]:
        print(f"  {x['name']:<12} {x['devices']:>4} ranks  batch/rank {x['batch_per_rank']:>3}  "
              f"{x['seconds_per_iteration']:.3f} s  wait {100 * x['wait_fraction']:.1f} %")
    for label, plan in ours.items():
        print(f"\ndinodist matched groups, {label} batches: {plan.seconds_per_iteration:.3f} s/iter, "
              f"{OFFICIAL_GLOBAL_BATCH / plan.seconds_per_iteration:.0f} img/s, "
              f"speed-up x{official['seconds_per_iteration'] / plan.seconds_per_iteration:.2f}")
        print(plan_table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
