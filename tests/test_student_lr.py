"""Students' lr schedule (`train.lr_schedule`, `train.lr_end`, per-student `optim:`): warmup, then constant
or a cosine to lr_end; the topology refuses a cosine that would rise; the runtime applies it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import yaml

from dinodist.core.errors import DinodistError
from dinodist.orchestrator.runtime.jobs import student_job
from dinodist.orchestrator.topology import parse_topology
from dinodist.students.model import StudentOptim, lr_at

REPO = Path(__file__).resolve().parent.parent
SMALL = REPO / "configs" / "topologies" / "cpu-small.yaml"


def _optim(**kw) -> StudentOptim:
    base = dict(lr=1e-3, weight_decay=0.04, warmup_iterations=10, layerwise_decay=1.0, clip_grad=3.0,
                ema=0.99)
    return StudentOptim(**{**base, **kw})


def test_warmup_then_constant_or_cosine_to_lr_end():
    const, cos = _optim(), _optim(lr_schedule="cosine", lr_end=1e-5)
    n = 111  # the cosine spans iterations 10..110, so its midpoint is iteration 60
    for opt in (const, cos):
        assert [lr_at(i, opt, n) for i in range(11)] == pytest.approx([1e-4 * i for i in range(11)])
    assert all(lr_at(i, const, n) == 1e-3 for i in range(10, n))
    curve = [lr_at(i, cos, n) for i in range(10, n)]
    assert curve[0] == pytest.approx(1e-3) and curve[-1] == pytest.approx(1e-5, abs=1e-15)
    assert all(a > b for a, b in zip(curve, curve[1:]))  # strictly decreasing after warmup
    assert lr_at(60, cos, n) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(n + 5, cos, n) == pytest.approx(1e-5)  # past the last iteration: lr_end
    with pytest.raises(ValueError, match="lr_schedule must be constant or cosine, got 'step'"):
        lr_at(20, _optim(lr_schedule="step"), n)


def _raw() -> dict:
    return yaml.safe_load(SMALL.read_text())


def test_the_schedule_reaches_each_students_job_and_a_rising_cosine_is_refused(tmp_path):
    raw = _raw()
    names = [s["name"] for s in raw["students"]]
    raw["train"].update(lr_schedule="cosine", lr_end=1e-6)
    raw["students"][1]["optim"] = {"lr_schedule": "constant"}
    topo = parse_topology(raw)
    first, second = (student_job(topo, n, tmp_path).optim for n in names[:2])
    assert (first.lr_schedule, first.lr_end) == ("cosine", 1e-6)
    assert second.lr_schedule == "constant"
    assert parse_topology(_raw()).train.lr_schedule == "constant"  # the official distilled recipe's shape

    raw = _raw()
    raw["train"].update(lr_schedule="cosine", lr=1e-4)
    raw["students"][0]["optim"] = {"lr_end": 1e-3}
    with pytest.raises(DinodistError, match=r"^students\[0\]\.optim\.lr_end: 0\.001 exceeds the lr 0\.0001"):
        parse_topology(raw)
    raw["students"][0]["optim"] = {}
    raw["train"]["lr_end"] = 1e-3
    with pytest.raises(DinodistError, match=r"^train\.lr_end: 0\.001 exceeds the lr 0\.0001"):
        parse_topology(raw)
    raw["train"]["lr_schedule"] = "linear"
    with pytest.raises(Exception, match="lr_schedule"):
        parse_topology(raw)


def _two_runs(constant: str, cosine: str, out: str) -> None:
    from dinodist.orchestrator.runtime.inline import run_inline

    run_inline(constant, "tiny-vits", Path(out) / "constant")
    run_inline(cosine, "tiny-vits", Path(out) / "cosine")


def _topology(path: Path, schedule: str) -> str:
    topo = {
        "name": "lr", "backend": "gloo", "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "teacher": {"arch": "tiny-vits", "overrides": {"depth": 1, "layerscale_init": 1.0},
                    "checkpoint": None, "targets": "heads", "shard": "replicate", "devices": 1},
        "students": [{"name": "tiny-vits", "arch": "tiny-vits", "overrides": {"depth": 1}, "devices": 1}],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 0},
        "train": {"global_batch_size": 4, "iterations": 5, "seed": 3, "lr": 5e-3, "warmup_iterations": 1,
                  "lr_schedule": schedule, "lr_end": 0.0},
        "metrics": {"port": 0}, "output": str(path.parent / "unused"),
    }
    path.write_text(yaml.safe_dump(topo))
    return str(path)


@pytest.mark.multiproc
def test_the_runtime_applies_the_schedule(tmp_path):
    """Same seed, two schedules: the losses agree while the lrs do (iterations 0-2: warmup from 0, then the
    cosine's start), and part once the cosine has lowered the lr of iteration 2's update."""
    a, b = _topology(tmp_path / "c.yaml", "constant"), _topology(tmp_path / "k.yaml", "cosine")
    # spawned, not forked: a fork after earlier tests started threads can deadlock the child
    child = mp.get_context("spawn").Process(target=_two_runs, args=(a, b, str(tmp_path)))
    child.start()
    child.join(150)
    assert child.exitcode == 0
    rows = {k: [json.loads(line) for line in (tmp_path / k / "tiny-vits" / "metrics.jsonl").open()]
            for k in ("constant", "cosine")}
    const, cos = rows["constant"], rows["cosine"]
    assert [r["lr"] for r in const] == pytest.approx([0.0, 5e-3, 5e-3, 5e-3, 5e-3])
    assert [r["lr"] for r in cos] == pytest.approx([0.0, 5e-3, 3.75e-3, 1.25e-3, 0.0], abs=1e-12)
    for i in range(3):
        assert cos[i]["loss"] == const[i]["loss"]
    assert abs(cos[3]["loss"] - const[3]["loss"]) > 1e-6
