"""A student's training does not depend on who else is in the run, nor on where its teacher runs.

Same student, same seed, three ways: (A) beside another student with a 2-rank FSDP teacher,
(B) alone with a 1-rank teacher, (C) with the teacher computed inline in its own process.
The loss trajectories (and every term) must agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 3
TERMS = ("loss", "dino_global", "dino_local", "ibot", "koleo")


def topology(path: Path, teacher_devices: int, shard: str, students: list[str]) -> Path:
    topo = {
        "name": "equivalence",
        "backend": "gloo",
        "cluster": {"nodes": 1, "devices_per_node": teacher_devices + len(students), "device": "cpu"},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 2, "embed_dim": 64, "num_heads": 4},
                    "checkpoint": None, "targets": "heads", "shard": shard, "devices": teacher_devices},
        "students": [{"name": s, "arch": s, "overrides": {"depth": 2}, "devices": 1} for s in students],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2},
        "train": {"global_batch_size": 4, "iterations": ITERATIONS, "seed": 5, "lr": 2e-3},
        "metrics": {"port": 0},
        "output": str(path.parent / "unused"),
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _inline(topology_path: str, out: str) -> None:
    torch.set_num_threads(1)
    from dinodist.orchestrator.runtime.inline import main

    os._exit(main([topology_path, "--student", "tiny-vits", "--out", out]))


def trajectory(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_student_trajectory_same_with_others_alone_and_inline(tmp_path):
    crowd = topology(tmp_path / "crowd.yaml", 2, "fsdp", ["tiny-vits", "tiny-vitb"])
    alone = topology(tmp_path / "alone.yaml", 1, "replicate", ["tiny-vits"])
    cli = [sys.executable, "-m", "dinodist.orchestrator.cli", "distill"]
    run([*cli, str(crowd), "--out", str(tmp_path / "a"), "--metrics-port", "0"])
    run([*cli, str(alone), "--out", str(tmp_path / "b"), "--metrics-port", "0"])
    # the inline run in a forked child: same code as `python -m dinodist.orchestrator.runtime.inline`,
    # without a re-import
    child = mp.get_context("fork").Process(target=_inline, args=(str(alone), str(tmp_path / "c")))
    child.start()
    child.join(150)
    assert child.exitcode == 0

    a = trajectory(tmp_path / "a" / "tiny-vits" / "metrics.jsonl")
    b = trajectory(tmp_path / "b" / "tiny-vits" / "metrics.jsonl")
    c = trajectory(tmp_path / "c" / "tiny-vits" / "metrics.jsonl")
    assert len(a) == len(b) == len(c) == ITERATIONS
    for ra, rb, rc in zip(a, b, c):
        for term in TERMS:
            assert abs(ra[term] - rb[term]) <= 1e-5, (ra["iteration"], term, ra[term], rb[term])
            assert abs(ra[term] - rc[term]) <= 1e-5, (ra["iteration"], term, ra[term], rc[term])
    # not vacuous: training moves the loss, and the other student of the crowd learns differently
    assert len({round(r["loss"], 6) for r in a}) == ITERATIONS
    other = trajectory(tmp_path / "a" / "tiny-vitb" / "metrics.jsonl")
    assert any(abs(x["loss"] - y["loss"]) > 1e-3 for x, y in zip(a, other))
    # one teacher forward per iteration in the crowd, though two students learned from it
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["teacher_forwards"] == ITERATIONS
    # and the inline run's exported EMA backbone equals the distributed one to float precision
    from dinodist.core.models.io import read_state_dict

    sa = read_state_dict(tmp_path / "a" / "tiny-vits" / "backbone.pth")
    sc = read_state_dict(tmp_path / "c" / "tiny-vits" / "backbone.pth")
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.allclose(sa[k], sc[k], atol=1e-5), k
