"""`dinodist distill` end to end on CPU: a 2-rank FSDP teacher and 3 students, /metrics, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from dinodist.core.eval.backbone import load_eval_backbone
from dinodist.core.models.io import load_backbone

REPO = Path(__file__).resolve().parent.parent


def write_topology(path: Path, *, teacher_devices: int, shard: str, students: list[str], iterations: int,
                   batch: int = 4, out: Path | None = None, devices: dict | None = None,
                   on_failure: str = "restart_group") -> Path:
    """A CPU topology small enough for tests (2-block models, 32 px crops)."""
    small = {"depth": 2}
    devices = devices or {}
    topo = {
        "name": "test",
        "backend": "gloo",
        "cluster": {"nodes": 1, "device": "cpu",
                    "devices_per_node": teacher_devices + sum(devices.get(s, 1) for s in students)},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 2, "embed_dim": 64, "num_heads": 4},
                    "checkpoint": None, "targets": "heads", "shard": shard, "devices": teacher_devices},
        "students": [{"name": s, "arch": s, "overrides": small, "devices": devices.get(s, 1)}
                     for s in students],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2,
                 "flips": False},
        "train": {"global_batch_size": batch, "iterations": iterations, "seed": 3, "lr": 1e-3,
                  "checkpoint_every": 2},
        "metrics": {"port": 0},
        "control": {"bind": "127.0.0.1", "port": 0, "heartbeat_timeout_s": 20, "on_failure": on_failure},
        "output": str(out or path.parent / "out"),
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def distill_cmd(topology: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dinodist.orchestrator.cli", "distill", str(topology), "--out", str(out),
            "--metrics-port", "0", *extra]


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    return e


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(every)
    return pred()


def metrics_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_distill_five_ranks_metrics_summary_and_exports(tmp_path):
    # 3 students, one of them on 2 ranks (FSDP2 and Sinkhorn-Knopp over its own sub-group);
    # the 2-rank FSDP teacher is exercised by tests/test_distill_equivalence.py
    students = ["tiny-vits", "tiny-vitb", "tiny-vitl"]
    iterations = 4
    topo = write_topology(tmp_path / "t.yaml", teacher_devices=1, shard="replicate", students=students,
                          iterations=iterations, devices={"tiny-vits": 2})
    out = tmp_path / "run"
    proc = subprocess.Popen(distill_cmd(topo, out), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # scrape /metrics while the job runs, until a student has reported training images
        def scrape() -> str | None:
            run = out / "run.json"
            if not run.exists():
                return None
            try:
                url = json.loads(run.read_text())["metrics_url"]
                text = urllib.request.urlopen(url, timeout=2).read().decode()
            except (OSError, ValueError):
                return None
            key = 'dinodist_images_total{group="tiny-vits"} '
            values = [float(line[len(key):]) for line in text.splitlines() if line.startswith(key)]
            return text if values and values[0] > 0 else None

        scraped = wait_for(scrape, 120, proc)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    assert scraped, "no /metrics scrape with student images during the run:\n" + stdout
    for name in ("dinodist_iteration_seconds_bucket", "dinodist_wait_seconds_total", "dinodist_rank_up"):
        assert name in scraped
    assert 'dinodist_loss{group="tiny-vits",term="ibot"}' in scraped

    summary = json.loads((out / "summary.json").read_text())
    # the teacher runs once per global batch, however many students learn from it
    assert summary["iterations"] == iterations
    assert summary["teacher_forwards"] == iterations
    for name in students:
        g = summary["groups"][name]
        assert g["iterations"] == iterations and g["images"] == 4 * iterations
        rows = metrics_lines(out / name / "metrics.jsonl")
        assert [r["iteration"] for r in rows] == list(range(iterations))
        for r in rows:
            for key in ("loss", "dino_global", "dino_local", "ibot", "koleo", "step_seconds", "wait_seconds",
                        "teacher_agreement", "teacher_cosine"):
                assert key in r and r[key] == r[key]  # present and not NaN
            assert "knn_top1" not in r  # no eval: section, no k-NN
            assert 0 <= r["wait_seconds"] <= r["step_seconds"]
        # the exported EMA backbone loads strictly into the official layout of its arch
        model = load_backbone(out / name / "backbone.pth", name, depth=2)
        assert sum(p.numel() for p in model.parameters()) > 0
        # ... and the group folder alone is enough: its sidecar names the arch and the overrides
        again, _, desc = load_eval_backbone(str(out / name), None)
        assert name in desc and len(again.blocks) == 2
        for k, v in model.state_dict().items():
            assert torch.equal(v, again.state_dict()[k]), k
        side = json.loads((out / name / "backbone.pth.json").read_text())
        assert side["source"]["group"] == name and side["source"]["iteration"] == iterations
        ckpts = sorted((out / name / "ckpt").iterdir(), key=lambda p: int(p.name))
        assert [p.name for p in ckpts] == ["2", "4"] and all((p / "meta.json").is_file() for p in ckpts)
    resolved = yaml.safe_load((out / "topology.yaml").read_text())
    assert resolved["students"][0]["devices"] == 2 and resolved["train"]["iterations"] == iterations
    # the teacher sent each student rank only its rows: bytes scale with groups, not with pixels
    assert summary["target_bytes_sent"] > 0
    assert f"teacher forwards: {iterations} for {iterations} iterations" in stdout
    # what each student learned, printed for a newcomer: agreement and cosine, first -> last iteration
    for name in students:
        g = summary["groups"][name]
        assert g["teacher_agreement"]["first_iteration"] == 0
        assert g["teacher_agreement"]["last_iteration"] == iterations - 1 and "knn_top1" not in g
        lines = [line for line in stdout.splitlines() if line.startswith(f"{name:<14} agreement ")]
        assert len(lines) == 1 and "cosine" in lines[0], stdout


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_killing_one_rank_stops_the_job_with_a_clear_message(tmp_path):
    topo = write_topology(tmp_path / "t.yaml", teacher_devices=1, shard="replicate",
                          students=["tiny-vits", "tiny-vitb"], iterations=500, on_failure="stop")
    out = tmp_path / "run"
    proc = subprocess.Popen(distill_cmd(topo, out), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        started = wait_for(lambda: len(metrics_lines(out / "tiny-vitb" / "metrics.jsonl")) >= 2, 90, proc)
        assert started, proc.communicate(timeout=30)
        pid = json.loads((out / "run.json").read_text())["pids"]["2"]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert elapsed < 15, elapsed
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("dinodist distill: error: rank 2 (group tiny-vitb)"), stderr
    assert "signal 9" in last
    # every other rank is gone too (a zombie awaiting its reaper counts as gone)
    for other in json.loads((out / "run.json").read_text())["pids"].values():
        assert not alive(other), other


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_distill_cli_errors_are_one_line(tmp_path, capsys):
    from dinodist.orchestrator.cli import main

    assert main(["distill", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dinodist distill: error: {tmp_path / 'nope.yaml'}: topology file not found"]
    topo = write_topology(tmp_path / "t.yaml", teacher_devices=1, shard="replicate", students=["tiny-vits"],
                          iterations=2)
    assert main(["distill", str(topo), "--iterations", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinodist distill: error: train.iterations"), err


def _tiny_teacher(tmp_path: Path):
    from dinodist.core.models import build_backbone, build_head
    from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD

    torch.manual_seed(11)
    backbone = build_backbone("tiny-vit7b", depth=1)
    dino, ibot = build_head(256, TINY_DINO_HEAD), build_head(256, TINY_IBOT_HEAD)
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({f"dino_head.{k}": v for k, v in dino.state_dict().items()})
    sd.update({f"ibot_head.{k}": v for k, v in ibot.state_dict().items()})
    path = tmp_path / "teacher.pth"
    torch.save({"teacher": sd}, path)
    return path, backbone, dino, ibot


def test_teacher_export_loads_and_computes_the_same_targets(tmp_path):
    from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD, arch_dict, get_arch
    from dinodist.teacher.model import load_teacher
    from dinodist.teacher.targets import target_tensors

    path, backbone, dino, ibot = _tiny_teacher(tmp_path)
    # the sidecar carries the real arch (depth 1), although the topology says the preset
    sidecar = {"format": "dinodist-teacher-v1", "arch": "tiny-vit7b", "overrides": {"depth": 1},
               "arch_spec": arch_dict(get_arch("tiny-vit7b", depth=1))}
    (tmp_path / "teacher.pth.json").write_text(json.dumps(sidecar))
    loaded = load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    assert loaded.spec.depth == 1 and len(loaded.identity) == 64
    crops = torch.randn(6, 3, 32, 32)
    masks = torch.rand(3, 2, 16) < 0.4
    got = loaded.model(crops, masks)
    with torch.no_grad():
        want = target_tensors(backbone.eval(), dino, ibot, crops, masks, "heads")
    for k in ("dino", "ibot", "ibot_counts"):
        assert torch.equal(got[k], want[k]), k
    assert got["ibot"].shape == (int(masks.sum()), TINY_IBOT_HEAD.bottleneck_dim)
    # sample-major: row 1's crop-0 CLS is the second crop-major CLS (image 1 of crop 0)
    with torch.no_grad():
        cls = backbone.forward_features(crops)["x_norm_clstoken"]
        assert torch.allclose(got["dino"][1, 0], dino(cls[1:2], no_last_layer=True)[0], atol=1e-5)
        assert torch.allclose(got["dino"][1, 1], dino(cls[4:5], no_last_layer=True)[0], atol=1e-5)


def test_teacher_checkpoint_errors(tmp_path):
    from dinodist.core.errors import DinodistError
    from dinodist.core.models import save_backbone
    from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD
    from dinodist.teacher.model import load_teacher

    _, backbone, _, _ = _tiny_teacher(tmp_path)
    flat = tmp_path / "backbone.pth"
    save_backbone(backbone, flat)
    with pytest.raises(DinodistError, match="backbone-only checkpoint has no DINO/iBOT heads"):
        load_teacher("tiny-vit7b", {"depth": 1}, str(flat), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    feats = load_teacher("tiny-vit7b", {"depth": 1}, str(flat), "features", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    out = feats.model(torch.randn(4, 3, 32, 32), None)
    assert out["cls"].shape == (2, 2, 256) and out["patch"].shape == (2, 2, 16, 256)
    with pytest.raises(DinodistError, match="no such file"):
        load_teacher("tiny-vit7b", {}, str(tmp_path / "x.pth"), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    wrong = tmp_path / "wrong.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, wrong)
    with pytest.raises(DinodistError, match="no 'dino_head.\\*' keys"):
        load_teacher("tiny-vit7b", {"depth": 1}, str(wrong), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)


def test_student_loss_composition_and_features_path():
    from dinodist.core.losses import dino_loss
    from dinodist.students.loss import LossConfig, dino_scales, features_loss, heads_loss, teacher_probs

    assert dino_scales(8) == (2 / 18, 16 / 18) and dino_scales(0) == (1.0, 0.0)
    torch.manual_seed(0)
    b, n_local, k, p = 3, 2, 16, 4
    masks = torch.zeros(2 * b, p, dtype=torch.bool)
    masks[0, :2] = masks[4, 1] = True
    weight = torch.cat([torch.full((int(m.sum()),), 1.0 / int(m.sum())) for m in masks if m.any()])
    targets = {"dino": torch.nn.functional.normalize(torch.randn(2 * b, 8), dim=-1),
               "ibot": torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)}
    last = {"dino_last_layer.weight": torch.randn(k, 8), "ibot_last_layer.weight": torch.randn(k, 8)}
    probs = teacher_probs(targets, last, 0.07)
    assert probs["dino"].shape == (2, b, k) and torch.allclose(probs["dino"].sum(-1), torch.ones(2, b))
    out = {"dino": torch.randn((2 + n_local) * b, k), "ibot": torch.randn(3, k),
           "g_cls": torch.randn(2 * b, 8)}
    from dinodist.orchestrator.topology import Train

    # the topology's defaults (the one place that states them); the expected total below uses them
    cfg = LossConfig(**{k: Train.model_fields[k].default for k in
                        ("teacher_temp", "student_temp", "ibot_weight", "koleo_weight", "loss_chunk_rows",
                         "loss_precision")})
    total, terms = heads_loss(out, probs, {"collated_masks": masks, "masks_weight": weight}, n_local, cfg)
    g, loc = dino_scales(n_local)
    want = g * terms["dino_global"] + loc * terms["dino_local"] + terms["ibot"] + 0.1 * 2 * terms["koleo"]
    assert abs(float(total) - want) < 1e-5
    direct = dino_loss(out["dino"][: 2 * b].view(2, b, k), probs["dino"], ignore_diagonal=True)
    assert abs(terms["dino_global"] - float(direct)) < 1e-6
    # features targets: a perfect projection gives zero cosine and smooth-L1 terms
    feats = {"cls": torch.randn(2 * b, 8), "patch": torch.randn(2 * b, p, 8)}
    out = {"proj_cls": feats["cls"], "proj_patch": feats["patch"], "g_cls": torch.randn(2 * b, 8)}
    _, fterms = features_loss(out, feats, cfg)
    assert abs(fterms["cls_cosine"]) < 1e-6 and fterms["patch_smooth_l1"] == 0.0
