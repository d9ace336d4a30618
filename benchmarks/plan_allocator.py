"""Allocator speed and optimality, and the paper topology's bubble with even vs. uneven batches.

Prints, side by side in one run: (1) on random small instances (even and uneven shares), the time
of `solve` + `hand_out_spares` and of a brute force over every integer split, their ratio, and
whether both found the same optimum; (2) the paper topology at 256 and 512 devices with even and
uneven per-rank batches: s/iter, images/s and the job's device-weighted wait; (3) `make_plan` time;
(4) the paper topology at 128 / 256 / 296 / 512 / 1024 devices with the teacher as written (fsdp)
and with `teacher.shard: auto`: teacher layout, its all-gathers, the job's wait and the share of it
that is communication, and whether any small group straddles two nodes.

    python -m benchmarks.plan_allocator [--layouts-only]
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from pathlib import Path

from dinodist.orchestrator.allocate import candidate_counts, group_seconds, hand_out_spares, make_plan, solve
from dinodist.orchestrator.topology import load_topology

PAPER = Path(__file__).resolve().parents[1] / "configs" / "topologies" / "dinov3-paper.yaml"


def brute(work, options, total, g_batch):
    best = None
    for combo in itertools.product(*options):
        if sum(combo) <= total:
            t = max(group_seconds(w, d, g_batch) for w, d in zip(work, combo))
            best = t if best is None else min(best, t)
    return best


def small_instances(even: bool, cases: int = 100) -> None:
    rng = random.Random(0)
    t_solve = t_brute = 0.0
    same = 0
    for _ in range(cases):
        g = rng.choice([48, 60, 96, 120] if even else [37, 50, 64, 101])
        total = rng.randint(8, 64 if even else 20)
        split = None if even else g
        opts = [candidate_counts(g, total, even)] * 4
        work = [rng.uniform(0.1, 10) for _ in range(4)]
        t0 = time.perf_counter()
        counts = hand_out_spares(work, opts, solve(work, opts, total, split), total, split)
        t1 = time.perf_counter()
        best = brute(work, opts, total, split)
        t2 = time.perf_counter()
        t_solve += t1 - t0
        t_brute += t2 - t1
        same += abs(max(group_seconds(w, d, split) for w, d in zip(work, counts)) - best) <= 1e-12 * best
    label = "even" if even else "uneven"
    print(f"small instances, {label} shares (4 groups): {cases} cases, same optimum in {same}/{cases}; "
          f"solve+hand-out {1e3 * t_solve / cases:.3f} ms/case, brute force {1e3 * t_brute / cases:.3f} "
          f"ms/case, ratio brute/solve x{t_brute / t_solve:.0f}")


def teacher_layouts(sizes: tuple[int, ...] = (128, 256, 296, 512, 1024)) -> None:
    """Task table: the teacher's layout and its communication, as written (fsdp) and chosen (auto)."""
    print("| devices | teacher.shard | layout (ranks) | all-gathers s/iter | all-gathers / iteration "
          "| exposed s/iter | s/iter | img/s | job wait | exposed share of device time | teacher GiB/rank "
          "| small groups split | plan ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for devices in sizes:
        for shard in ("fsdp", "auto"):
            topo = load_topology(PAPER, {"teacher.shard": shard})
            t0 = time.perf_counter()
            plan = make_plan(topo, devices=devices)
            dt = time.perf_counter() - t0
            t = plan.teacher_layout
            shape = {"fsdp": f"{t.devices}", "hsdp": f"{t.replicas} x {t.shard_size}",
                     "replicate": f"{t.devices} copies"}[t.layout]
            print(f"| {devices} | {shard} | {t.layout} ({shape}) | {t.communication_seconds:.3f} "
                  f"| {100 * t.communication_seconds / plan.seconds_per_iteration:.0f} % "
                  f"| {t.exposed_communication_seconds:.4f} | {plan.seconds_per_iteration:.3f} "
                  f"| {plan.global_batch_size / plan.seconds_per_iteration:.0f} "
                  f"| {100 * plan.wait_fraction:.1f} % | {100 * plan.communication_fraction:.2f} % "
                  f"| {t.memory_per_rank_bytes / 2**30:.2f} | {', '.join(plan.split_groups) or 'none'} "
                  f"| {1e3 * dt:.0f} |")


def main() -> None:
    if "--layouts-only" in sys.argv[1:]:
        teacher_layouts()
        return
    small_instances(True)
    small_instances(False)
    for devices in (256, 512):
        row = []
        for even in (True, False):
            topo = load_topology(PAPER, {"train.even_batches": even})
            plan = make_plan(topo, devices=devices)
            row.append(plan)
            label = "even  " if even else "uneven"
            print(f"paper topology, {devices} devices, {label} batches: "
                  f"{plan.seconds_per_iteration:.3f} s/iter, "
                  f"{plan.global_batch_size / plan.seconds_per_iteration:.0f} img/s, job wait "
                  f"{100 * plan.wait_fraction:.1f} %, groups "
                  + ", ".join(f"{g.name} {g.devices}" for g in plan.groups))
        speedup = row[0].seconds_per_iteration / row[1].seconds_per_iteration
        print(f"  uneven / even throughput at {devices}: x{speedup:.2f}")
    for devices, even in ((512, True), (512, False), (4096, False)):
        topo = load_topology(PAPER, {"train.even_batches": even})
        reps = 3
        t0 = time.perf_counter()
        for _ in range(reps):
            plan = make_plan(topo, devices=devices)
        dt = (time.perf_counter() - t0) / reps
        print(f"make_plan paper topology, {devices} devices x 6 groups, even_batches {even}: "
              f"{1e3 * dt:.1f} ms ({plan.seconds_per_iteration:.4f} s/iter)")
    teacher_layouts()


if __name__ == "__main__":
    main()
