"""Fault tolerance on CPU: what a checkpoint costs, how fast a dead rank is found, how fast a run resumes.

One script, three measurements on the same small topology (a 1-rank teacher, two 1-rank students):

1. checkpoint cost: a run with `train.checkpoint_every: 1`; each student rank's record says how long
   its iterations took (step) and how long its checkpoints took (DCP save + backbone export);
   printed as seconds per checkpoint and as a fraction of an iteration, and amortised over
   `--every` iterations.
2. dead-rank detection and group restart (`control.on_failure: restart_group`): kill -9 one student
   rank mid-run; time until the supervisor announces the restart, until the restarted group logs
   its next iteration, and until it has caught up with the group that never stopped.
3. resume: the whole job killed after a checkpoint, then `distill --resume`: time from the command's
   start to its first new iteration, beside the same time for a fresh start.

    python benchmarks/fault_tolerance.py            # about 2 min on 2 cores
    python benchmarks/fault_tolerance.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ["tiny-vits", "tiny-vitb"]


def topology(path: Path, iterations: int, every: int | None, on_failure: str) -> Path:
    topo = {
        "name": "ft-bench", "backend": "gloo",
        "cluster": {"nodes": 1, "device": "cpu", "devices_per_node": 3},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 2, "embed_dim": 64, "num_heads": 4},
                    "checkpoint": None, "targets": "heads", "shard": "replicate", "devices": 1},
        "students": [{"name": s, "arch": s, "overrides": {"depth": 2}, "devices": 1} for s in STUDENTS],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2},
        "train": {"global_batch_size": 8, "iterations": iterations, "seed": 0, "lr": 1e-3,
                  "checkpoint_every": every},
        "metrics": {"port": 0},
        "control": {"on_failure": on_failure, "heartbeat_timeout_s": 20},
        "output": str(path.parent / "out"),
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


class Job:
    """`dinodist distill` in the background, its output lines time-stamped as they arrive."""

    def __init__(self, topo: Path, out: Path, *extra: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.started, self.wall_started = time.monotonic(), time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "dinodist.orchestrator.cli", "distill", str(topo),
                                      "--out", str(out), "--metrics-port", "0", *extra], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.out, self.seen = out, []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.seen.append((time.monotonic(), line.rstrip()))

    def when(self, pred, timeout: float = 300.0, every: float = 0.02) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return time.monotonic()
            if self.proc.poll() is not None and not pred():
                raise SystemExit(f"distill ended ({self.proc.returncode}) first:\n"
                                 + "\n".join(s for _, s in self.seen[-20:]))
            time.sleep(every)
        raise SystemExit("timed out")

    def line_time(self, text: str) -> float:
        self.when(lambda: any(text in s for _, s in self.seen))
        return next(t for t, s in self.seen if text in s)

    def metrics(self, group: str) -> int:
        return lines(self.out / group / "metrics.jsonl")

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        for pid in json.loads((self.out / "run.json").read_text())["pids"].values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def checkpoint_cost(tmp: Path, iterations: int) -> dict:
    topo = topology(tmp / "ckpt.yaml", iterations, 1, "stop")
    job = Job(topo, tmp / "ckpt")
    assert job.wait() == 0
    out = {}
    for rec in (tmp / "ckpt" / "logs").glob("rank-*.json"):
        r = json.loads(rec.read_text())
        if r["role"] == "student":
            step = r["step_seconds"] / r["iterations"]
            ckpt = r["checkpoint_seconds"] / r["iterations"]  # one checkpoint per iteration
            out[r["group"]] = {"step_seconds": step, "checkpoint_seconds": ckpt, "ratio": ckpt / step}
    return out


def detection_and_restart(tmp: Path, iterations: int) -> dict:
    topo = topology(tmp / "restart.yaml", iterations, 2, "restart_group")
    job = Job(topo, tmp / "restart")
    job.when(lambda: job.metrics("tiny-vits") >= 5)
    victim = json.loads((tmp / "restart" / "run.json").read_text())["pids"]["1"]  # tiny-vits
    before = job.metrics("tiny-vits")
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    announced = job.line_time("tiny-vits: restarting")
    # truncated back to its checkpoint, then growing again: the first iteration after `before`
    job.when(lambda: job.metrics("tiny-vits") > before)
    next_iteration = time.monotonic()
    job.when(lambda: job.metrics("tiny-vits") >= job.metrics("tiny-vitb") - 1 or job.proc.poll() is not None)
    caught_up = time.monotonic()
    assert job.wait() == 0, "\n".join(s for _, s in job.seen[-20:])
    summary = json.loads((tmp / "restart" / "summary.json").read_text())
    return {"detect_seconds": announced - killed, "next_iteration_seconds": next_iteration - killed,
            "caught_up_seconds": caught_up - killed, "restarts": summary["restarts"],
            "teacher_forwards": summary["teacher_forwards"], "iterations": summary["iterations"]}


def common_checkpoint(out: Path) -> int:
    """The iteration `--resume` will agree on: the newest complete checkpoint every group has."""
    have = [{int(d.name) for d in (out / g / "ckpt").iterdir() if (d / "COMPLETE.json").is_file()}
            for g in STUDENTS]
    return max(set.intersection(*have), default=0)


def resume(tmp: Path, iterations: int) -> dict:
    topo = topology(tmp / "resume.yaml", iterations, 2, "stop")
    out = tmp / "resume"
    fresh = Job(topo, out)
    fresh.when(lambda: fresh.metrics("tiny-vits") >= 1)
    fresh_first = time.monotonic() - fresh.started
    fresh.when(lambda: all(fresh.metrics(g) >= 6 for g in STUDENTS))
    fresh.kill()
    k = common_checkpoint(out)
    again = Job(topo, out, "--resume")

    def first_new() -> bool:
        # cut back to the checkpoint (k lines) by the resumed rank, then its first new iteration (k + 1)
        path = out / "tiny-vits" / "metrics.jsonl"
        return path.stat().st_mtime > again.wall_started and lines(path) >= k + 1

    again.when(first_new)
    resumed_first = time.monotonic() - again.started
    assert again.wait() == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_at"] == k, (summary["resumed_at"], k)
    return {"fresh_start_to_first_iteration_s": fresh_first,
            "resume_to_first_new_iteration_s": resumed_first, "resumed_at": k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--every", type=int, default=100, help="checkpoint interval to amortise over")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {"checkpoint": checkpoint_cost(tmp, args.iterations),
                  "restart_group": detection_and_restart(tmp, args.iterations),
                  "resume": resume(tmp, args.iterations)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{'group':<10} {'step s':>8} {'ckpt s':>8} {'ckpt/step':>9} {f'per it @ every {args.every}':>18}")
    for g, c in result["checkpoint"].items():
        print(f"{g:<10} {c['step_seconds']:8.3f} {c['checkpoint_seconds']:8.3f} {c['ratio']:9.2f} "
              f"{c['ratio'] / args.every:18.4f}")
    r = result["restart_group"]
    print(f"kill -9 of a tiny-vits rank: restart announced after {r['detect_seconds']:.2f} s, next iteration "
          f"after {r['next_iteration_seconds']:.2f} s, caught up after {r['caught_up_seconds']:.2f} s; "
          f"restarts {r['restarts']}, teacher forwards {r['teacher_forwards']} for {r['iterations']} "
          "iterations")
    s = result["resume"]
    print(f"first iteration: fresh start {s['fresh_start_to_first_iteration_s']:.2f} s, --resume at "
          f"{s['resumed_at']} {s['resume_to_first_new_iteration_s']:.2f} s")


if __name__ == "__main__":
    main()
