"""Target store in a live run: what writing it costs the live job, and how fast a replay trains.

Side by side in one run, rounds interleaved (A B A B ...):
  - live without store vs live with a store (bf16, async writer), same topology otherwise:
    mean seconds per iteration of the student (its step includes its wait for the teacher, so it
    is the job's iteration time) and of the teacher, and the teacher's time on the store path
    (gather + queueing a record) per iteration;
  - `dinodist add-student` replaying that store vs the same student in the live run.
The first `--warmup` iterations of every run are left out (start-up, allocator warm-up).

    python benchmarks/store_replay.py --quick
    python benchmarks/store_replay.py --rounds 2 --iterations 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STUDENT = "tiny-vits"


def topology(path: Path, store: Path | None, iterations: int, batch: int, crop: int,
             teacher_ranks: int) -> Path:
    topo = {
        "name": "store-bench",
        "backend": "gloo",
        "cluster": {"nodes": 1, "device": "cpu", "devices_per_node": teacher_ranks + 1},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 4, "embed_dim": 128, "num_heads": 4},
                    "checkpoint": None, "targets": "heads", "shard": "replicate", "devices": teacher_ranks},
        "students": [{"name": STUDENT, "arch": STUDENT, "overrides": {"depth": 4}, "devices": 1}],
        "data": {"source": "skimage", "global_crop_size": crop, "local_crop_size": crop // 2,
                 "local_crops": 2},
        "train": {"global_batch_size": batch, "iterations": iterations, "seed": 1, "lr": 1e-3},
        "metrics": {"port": 0},
        # fail-stop: the default restart_group policy would make the teacher write a restart store
        "control": {"on_failure": "stop"},
        "output": str(path.parent / "unused"),
    }
    if store is not None:
        topo["store"] = {"path": str(store), "dtype": "bf16"}
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def run(cmd: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dinodist.orchestrator.cli", *cmd, "--metrics-port", "0"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return time.perf_counter() - t0


def rows(path: Path, warmup: int) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines[warmup:]


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def step_mean(path: Path, warmup: int) -> float:
    return mean([x["step_seconds"] for x in rows(path, warmup)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--teacher-ranks", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 round of 16 iterations")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.iterations, args.warmup = 1, 16, 3
    root = Path(tempfile.mkdtemp(prefix="store-bench-"))
    res: dict[str, list[float]] = {k: [] for k in (
        "plain_student", "store_student", "plain_teacher", "store_teacher", "store_path", "replay_student",
        "live_wall", "replay_wall", "store_bytes")}
    for r in range(args.rounds):
        for with_store in (False, True) if r % 2 == 0 else (True, False):
            tag = f"{'store' if with_store else 'plain'}-{r}"
            store = root / f"store-{r}" if with_store else None
            topo = topology(root / f"{tag}.yaml", store, args.iterations, args.batch, args.crop,
                            args.teacher_ranks)
            out = root / tag
            wall = run(["distill", str(topo), "--out", str(out)])
            key = "store" if with_store else "plain"
            res[f"{key}_student"].append(step_mean(out / STUDENT / "metrics.jsonl", args.warmup))
            teacher = rows(out / "teacher" / "metrics.jsonl", args.warmup)
            res[f"{key}_teacher"].append(mean([x["step_seconds"] for x in teacher]))
            if with_store:
                res["store_path"].append(mean([x["store_seconds"] for x in teacher]))
                res["live_wall"].append(wall)
                stats = json.loads((out / "teacher" / "stats.json").read_text())["store"]
                res["store_bytes"].append(stats["bytes"] / stats["records"] / args.batch)
                replay = root / f"replay-{r}"
                res["replay_wall"].append(run(["add-student", str(topo), "--student", STUDENT, "--out",
                                               str(replay)]))
                res["replay_student"].append(step_mean(replay / STUDENT / "metrics.jsonl", args.warmup))
    m = {k: mean(v) for k, v in res.items()}
    print(f"# store_replay: {args.rounds} round(s), {args.iterations} iterations (first {args.warmup} left "
          f"out), batch {args.batch}, {args.crop}px crops, teacher tiny-vit7b depth 4 on "
          f"{args.teacher_ranks} rank(s), student {STUDENT} depth 4, store bf16")
    print("\n## live run: without vs with target store (mean s/iteration)")
    print("| | without store | with store | ratio |")
    print("|---|---|---|---|")
    print(f"| student step (= job iteration) | {m['plain_student']:.4f} | {m['store_student']:.4f} | "
          f"{m['store_student'] / m['plain_student']:.3f} |")
    print(f"| teacher step | {m['plain_teacher']:.4f} | {m['store_teacher']:.4f} | "
          f"{m['store_teacher'] / m['plain_teacher']:.3f} |")
    print(f"| teacher store path (gather + queue) | - | {m['store_path']:.5f} | "
          f"{m['store_path'] / m['plain_teacher']:.3f} of a teacher step |")
    print(f"\nstore bytes per image on disk: {m['store_bytes']:.0f}")
    print("\n## replay vs live (same student, same store)")
    print("| | live (with store) | add-student replay | replay / live |")
    print("|---|---|---|---|")
    print(f"| student s/iteration | {m['store_student']:.4f} | {m['replay_student']:.4f} | "
          f"{m['replay_student'] / m['store_student']:.3f} |")
    print(f"| command wall s (incl. start-up) | {m['live_wall']:.1f} | {m['replay_wall']:.1f} | "
          f"{m['replay_wall'] / m['live_wall']:.3f} |")
    print("\nper-round values:", json.dumps({k: [round(x, 5) for x in v] for k, v in res.items()}))


if __name__ == "__main__":
    main()
