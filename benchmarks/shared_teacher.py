"""What sharing one teacher among K students saves, measured side by side in one run.

1. CPU cost: K students in one distill run vs K separate runs (teacher + one student each).
   Total CPU-seconds of every process (orchestrator and ranks, from getrusage of waited-for
   children), printed beside the ideal ratio (T + sum S) / (K*T + sum S), with T and S_i the
   teacher's and each student's CPU-seconds measured in the separate runs.
2. Target traffic: bytes per image per student group in our design (each rank receives only its
   rows' bottleneck vectors, masked patches only) vs the official multidistillation (world
   all-gather of crops and of all-patch targets to every rank), measured on the CPU run and
   computed at paper scale.
3. Pipelining: the shared run's iteration time vs max and sum of teacher and student compute.

    python benchmarks/shared_teacher.py [--iterations 10] [--students tiny-vits,tiny-vitb,tiny-vitl]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def topology(path: Path, students: list[str], iterations: int, batch: int, depth: int) -> Path:
    topo = {
        "name": "bench-shared-teacher",
        "backend": "gloo",
        "cluster": {"nodes": 1, "devices_per_node": 1 + len(students), "device": "cpu"},
        "teacher": {"arch": "tiny-vit7b", "checkpoint": None, "targets": "heads", "shard": "replicate",
                    "devices": 1},
        "students": [{"name": s, "arch": s, "devices": 1, "overrides": {"depth": depth} if depth else {}}
                     for s in students],
        "data": {"source": "skimage", "global_crop_size": 64, "local_crop_size": 32, "local_crops": 4},
        "train": {"global_batch_size": batch, "iterations": iterations, "seed": 0, "lr": 1e-3},
        "metrics": {"port": 0},
        # fail-stop: the default restart_group policy would make the teacher write a restart store
        "control": {"on_failure": "stop"},
        "output": str(path.parent / "out"),
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def run_distill(topo: Path, out: Path) -> dict:
    """One `dinodist distill` run; returns wall and CPU seconds of the whole process tree."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dinodist.orchestrator.cli", "distill", str(topo),
                           "--out", str(out), "--metrics-port", "0"], cwd=REPO, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"distill failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted((out / "logs").glob("rank-*.json"))]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = json.loads((out / "summary.json").read_text())
    return {"wall": wall, "cpu": cpu, "ranks": ranks, "summary": summary, "out": out}


def group_cpu(run: dict, group: str) -> float:
    return sum(r["cpu_seconds"] for r in run["ranks"] if r["group"] == group)


def metrics(out: Path, group: str) -> list[dict]:
    return [json.loads(line) for line in (out / group / "metrics.jsonl").read_text().splitlines() if line]


def paper_bytes() -> dict[str, float]:
    """Bytes received per image by one student group at paper scale (7B heads, 256/112 crops)."""
    from dinodist.core.models.arch import PAPER_DINO_HEAD, PAPER_IBOT_HEAD

    p = (256 // 16) ** 2
    masked = 0.5 * 0.3 * 2 * p  # half the crops masked, mean ratio 0.3 -> masked patches per image
    bf16, fp32 = 2, 4
    ours_fp32 = (2 * PAPER_DINO_HEAD.bottleneck_dim + masked * PAPER_IBOT_HEAD.bottleneck_dim) * fp32
    ours_bf16 = ours_fp32 / fp32 * bf16
    # official: every rank of the group receives, for every image of the global batch, the crops
    # and the all-patch iBOT + CLS DINO bottlenecks (bf16): the group receives S times that
    crops = (2 * 3 * 256 * 256 + 8 * 3 * 112 * 112) * bf16
    targets = (2 * p * PAPER_IBOT_HEAD.bottleneck_dim + 2 * PAPER_DINO_HEAD.bottleneck_dim) * bf16
    return {"ours_fp32": ours_fp32, "ours_bf16": ours_bf16, "official_per_rank": crops + targets,
            "official_targets_per_rank": targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--students", default="tiny-vits,tiny-vitb,tiny-vitl")
    ap.add_argument("--depth", type=int, default=0, help="override student depth (0: preset)")
    args = ap.parse_args()
    students = args.students.split(",")
    k = len(students)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shared = run_distill(topology(tmp / "shared.yaml", students, args.iterations, args.batch, args.depth),
                             tmp / "shared")
        separate = {s: run_distill(topology(tmp / f"{s}.yaml", [s], args.iterations, args.batch, args.depth),
                                   tmp / f"sep-{s}") for s in students}

        print(f"# shared teacher: K={k} students {students}, {args.iterations} iterations, global batch "
              f"{args.batch}, tiny-vit7b teacher (1 rank), 64/32 px crops, 4 local crops")
        print("\n## 1. CPU-seconds of all processes (orchestrator + ranks)")
        sep_cpu = sum(r["cpu"] for r in separate.values())
        t_cpu = sum(group_cpu(r, "teacher") for r in separate.values()) / k
        s_cpu = {s: group_cpu(separate[s], s) for s in students}
        ideal = (t_cpu + sum(s_cpu.values())) / (k * t_cpu + sum(s_cpu.values()))
        print(f"one run, {k} students : {shared['cpu']:8.1f} CPU-s  (wall {shared['wall']:.1f} s)")
        sep_wall = sum(r["wall"] for r in separate.values())
        print(f"{k} separate runs     : {sep_cpu:8.1f} CPU-s  (wall {sep_wall:.1f} s)")
        print(f"teacher T (mean)     : {t_cpu:8.1f} CPU-s; students S: "
              + ", ".join(f"{s} {v:.1f}" for s, v in s_cpu.items()))
        print(f"ratio one/separate   : measured {shared['cpu'] / sep_cpu:.3f}   ideal (T+sum S)/(K*T+sum S) "
              f"{ideal:.3f}")
        print(f"teacher forwards     : one run {shared['summary']['teacher_forwards']}, separate runs "
              f"{sum(r['summary']['teacher_forwards'] for r in separate.values())}")

        print("\n## 2. Target bytes received per image, per student group")
        sent = shared["summary"]["target_bytes_sent"]
        images = args.iterations * args.batch
        per_group = sent / images / k
        from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD

        p = (64 // 8) ** 2
        official_cpu = (2 * 3 * 64 * 64 + 4 * 3 * 32 * 32) * 4 + (2 * p * TINY_IBOT_HEAD.bottleneck_dim
                                                                   + 2 * TINY_DINO_HEAD.bottleneck_dim) * 4
        print(f"CPU run (fp32, 1 rank/group): ours {per_group:,.0f} B/image/group (measured); official "
              f"all-gather {official_cpu:,.0f} B/image/rank (crops + all-patch targets) -> "
              f"{official_cpu / per_group:.1f}x")
        pb = paper_bytes()
        for name, size in (("vits", 48), ("vitsp", 48), ("vitb", 80), ("vitl", 120)):
            official = pb["official_per_rank"] * size
            print(f"paper scale, group {name:<5} ({size:3d} ranks): ours {pb['ours_fp32'] / 1e3:6.1f} "
                  f"kB/image (fp32 wire; {pb['ours_bf16'] / 1e3:.1f} bf16), "
                  f"official {official / 1e6:6.1f} MB/image ({official / pb['ours_fp32']:,.0f}x)")

        print("\n## 3. Pipelining (shared run, per iteration, iterations 1.. to skip warm-up)")
        t_rows = metrics(shared["out"], "teacher")[1:]
        t_fwd = sum(r["forward_seconds"] for r in t_rows) / len(t_rows)
        comp = {}
        for s in students:
            rows = metrics(shared["out"], s)[1:]
            comp[s] = sum(r["step_seconds"] - r["wait_seconds"] for r in rows) / len(rows)
        iter_time = max(sum(r["step_seconds"] for r in metrics(shared["out"], s)[1:]) / len(t_rows)
                        for s in students)
        slowest = max(comp.values())
        print(f"teacher compute {t_fwd:.3f} s; student compute "
              + ", ".join(f"{s} {v:.3f}" for s, v in comp.items()))
        print(f"iteration time {iter_time:.3f} s   max(teacher, slowest student) "
              f"{max(t_fwd, slowest):.3f} s   sum {t_fwd + slowest:.3f} s")
        print(f"(2 cores shared by {k + 2} processes: compute times already include CPU contention)")


if __name__ == "__main__":
    main()
