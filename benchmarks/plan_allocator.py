"""Allocator speed and optimality: binary search over candidate times vs. exhaustive search.

Prints, side by side in one run: (1) on random small instances, the time of `solve` and of a
brute force over every integer split, their ratio, and whether both found the same optimum;
(2) `make_plan` on the paper topology at 512 devices x 6 groups and on a 4096-device cluster.

    python -m benchmarks.plan_allocator
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

from orchestrator.allocate import divisors, make_plan, solve
from orchestrator.topology import load_topology

PAPER = Path(__file__).resolve().parents[1] / "configs" / "topologies" / "dinov3-paper.yaml"


def brute(work, options, total):
    best = None
    for combo in itertools.product(*options):
        if sum(combo) <= total:
            t = max(w / d for w, d in zip(work, combo))
            best = t if best is None else min(best, t)
    return best


def main() -> None:
    rng = random.Random(0)
    t_solve = t_brute = 0.0
    same = 0
    cases = 200
    for _ in range(cases):
        g = rng.choice([48, 60, 96, 120])
        total = rng.randint(8, 64)
        divs = [d for d in divisors(g) if d <= total]
        work = [rng.uniform(0.1, 10) for _ in range(4)]
        opts = [divs] * 4
        t0 = time.perf_counter()
        counts = solve(work, opts, total)
        t1 = time.perf_counter()
        best = brute(work, opts, total)
        t2 = time.perf_counter()
        t_solve += t1 - t0
        t_brute += t2 - t1
        same += abs(max(w / d for w, d in zip(work, counts)) - best) <= 1e-12 * best
    print(f"small instances (4 groups): {cases} cases, same optimum in {same}/{cases}; "
          f"solve {1e3 * t_solve / cases:.3f} ms/case, brute force {1e3 * t_brute / cases:.3f} ms/case, "
          f"ratio brute/solve x{t_brute / t_solve:.0f}")
    topo = load_topology(PAPER)
    for devices, batch in ((512, 4096), (512, 3840), (4096, 3840)):
        topo.train.global_batch_size = batch
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            plan = make_plan(topo, devices=devices)
        dt = (time.perf_counter() - t0) / reps
        print(f"make_plan paper topology, {devices} devices x 6 groups, global batch {batch} "
              f"({len(divisors(batch))} divisors): {1e3 * dt:.1f} ms, "
              f"{plan.seconds_per_iteration:.3f} s/iter")


if __name__ == "__main__":
    main()
