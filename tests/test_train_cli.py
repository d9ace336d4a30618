"""`dinodist train`, `export-teacher` and `eval`: outputs, export layout, resume, one-line errors."""

from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch
import yaml

from dinodist.core import distributed
from dinodist.core.errors import DinodistError
from dinodist.core.models import build_backbone
from dinodist.core.models.io import load_backbone
from dinodist.orchestrator.cli import main

HEAD = {"hidden_dim": 32, "bottleneck_dim": 16, "n_prototypes": 64}


def write_idx(path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """A tiny Fashion-MNIST look-alike (idx files): class 0 bright top half, class 1 bright bottom half."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 24), ("t10k", 12)):
        labels = np.arange(n) % 2
        imgs = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            imgs[i, :14] += 200 * (c == 0)
            imgs[i, 14:] += 200 * (c == 1)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs.clip(0, 255))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory, fmnist):
    cfg = {
        "model": {"arch": "tiny-vits", "overrides": {"depth": 2, "embed_dim": 24}, "dino_head": HEAD,
                  "ibot_head": HEAD},
        "data": {"source": f"fashion-mnist:{fmnist}:train", "global_batch_size": 4},
        "crops": {"global_size": 24, "local_size": 16, "n_local": 2},
        "optim": {"lr": 1e-3},
        "train": {"iterations": 2, "checkpoint_every": 100, "log_every": 1},
    }
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"dinodist {argv[0]}: error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_train_export_eval_roundtrip(tmp_path, config, fmnist, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("loss", "dino_global", "dino_local", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp",
                "step_seconds", "images"):
        assert key in rows[0]
    assert (out / "ckpt" / "2" / "meta.json").is_file() and (out / "config.yaml").is_file()
    # --resume with more iterations continues from the checkpoint
    assert main(["train", str(config), "--out", str(out), "--iterations", "3", "--resume", "--quiet"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]

    full = tmp_path / "teacher.pth"
    assert main(["export-teacher", str(out), str(full)]) == 0
    state = torch.load(full, weights_only=True)
    assert set(state) == {"teacher"}
    prefixes = {k.split(".")[0] for k in state["teacher"]}
    assert prefixes == {"backbone", "dino_head", "ibot_head"}
    side = json.loads((tmp_path / "teacher.pth.json").read_text())
    assert side["arch"] == "tiny-vits" and side["dino_head"]["n_prototypes"] == 64
    assert side["arch_spec"]["embed_dim"] == 24
    ref = build_backbone("tiny-vits", depth=2, embed_dim=24).state_dict()
    assert {k[len("backbone."):] for k in state["teacher"] if k.startswith("backbone.")} == set(ref)
    assert {k for k in state["teacher"] if k.startswith("dino_head.")} == {
        "dino_head.mlp.0.weight", "dino_head.mlp.0.bias", "dino_head.mlp.2.weight", "dino_head.mlp.2.bias",
        "dino_head.mlp.4.weight", "dino_head.mlp.4.bias", "dino_head.last_layer.weight"}

    flat = tmp_path / "backbone.pth"
    assert main(["export-teacher", str(out), str(flat), "--backbone-only"]) == 0
    bb = load_backbone(flat, "tiny-vits", depth=2, embed_dim=24)  # the official hub layout, strict
    for k, v in bb.state_dict().items():
        assert torch.equal(v, state["teacher"][f"backbone.{k}"]), k
    capsys.readouterr()

    data = [f"--train=fashion-mnist:{fmnist}:train", f"--test=fashion-mnist:{fmnist}:test"]
    assert main(["eval", "knn", "--checkpoint", str(full), *data, "--image-size", "24", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_train"] == 24 and res["n_test"] == 12 and 0.0 <= res["accuracy"] <= 1.0
    # the run dir and the export describe the same EMA teacher: same features, same accuracy
    assert main(["eval", "knn", "--checkpoint", str(out), *data, "--image-size", "24", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == res["accuracy"]
    assert main(["eval", "linear", "--arch", "tiny-vits", *data, "--image-size", "16", "--epochs", "2"]) == 0


def test_cli_errors_are_one_line(tmp_path, config, fmnist, capsys):
    one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml", "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lrr: 1}\n")
    one_line_error(capsys, ["train", str(bad)], "bad.yaml", "optim: unknown key 'lrr'")
    bad.write_text("train: {iterations: many}\n")
    one_line_error(capsys, ["train", str(bad)], "train.iterations")
    one_line_error(capsys, ["train", str(config), "--iterations", "0"], "--iterations")
    one_line_error(capsys, ["train", str(config), "--set", "train.iterations=-3"], "train.iterations")
    one_line_error(capsys, ["train", str(config), "--set", "data.source=folder:/no/such/dir",
                            "--out", str(tmp_path / "x")], "/no/such/dir")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["train", str(config), "--set", f"data.source=folder:{tmp_path / 'empty'}",
                            "--out", str(tmp_path / "y")], "empty")
    one_line_error(capsys, ["train", str(config), "--out", str(tmp_path / "fresh"), "--resume"], "--resume")
    bad.write_text("stage: gram\n")
    one_line_error(capsys, ["train", str(bad)], "gram.checkpoint")
    one_line_error(capsys, ["export-teacher", str(tmp_path / "norun"), str(tmp_path / "t.pth")], "norun")
    one_line_error(capsys, ["eval", "knn", "--train", "skimage", "--test", "skimage"], "--arch")
    one_line_error(capsys, ["eval", "knn", "--arch", "tiny-vits", "--train", "fashion-mnist:/nowhere:train",
                            "--test", f"fashion-mnist:{fmnist}:test"], "/nowhere")
    for cmd in ("train", "export-teacher", "eval"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_nproc_backend_and_device_per_rank(monkeypatch):
    # no GPU here: CUDA is mocked, so this checks the choices the spawned ranks make, not NCCL itself
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.choose_backend(2) == "gloo" and distributed.choose_backend(2, "gloo") == "gloo"
    with pytest.raises(DinodistError, match="--backend nccl: CUDA is not available"):
        distributed.choose_backend(2, "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.choose_backend(2) == "nccl" and distributed.choose_backend(1, "nccl") == "nccl"
    assert distributed.choose_backend(2, "gloo") == "gloo"
    with pytest.raises(DinodistError, match="--nproc 3: only 2 CUDA device"):
        distributed.choose_backend(3)
    with pytest.raises(DinodistError, match="--backend: unknown backend 'mpi'"):
        distributed.choose_backend(2, "mpi")

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    class Errors(list):
        put = list.append

    errors = Errors()
    distributed._spawned(1, 2, 29500, "nccl", errors, lambda: calls.append("train"), (), 30.0)
    assert [c[0] if isinstance(c, tuple) else c for c in calls] == ["set_device", "init", "train"]
    assert calls[0] == ("set_device", 1) and calls[1][1] == "nccl"  # the GPU is chosen before the group
    kw = calls[1][2]
    assert kw["device_id"] == torch.device("cuda", 1) and kw["rank"] == 1 and kw["world_size"] == 2
    assert kw["init_method"] == "tcp://127.0.0.1:29500" and not errors
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert distributed.DistInfo(1, 2, 1, "nccl").device == torch.device("cuda", 1)

    calls.clear()
    info = distributed.init_local_rank(0, 2, 29500, "gloo", 30.0)
    assert [c[:2] for c in calls] == [("init", "gloo")] and "device_id" not in calls[0][2]
    assert info.device == torch.device("cpu") and os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_nproc_backend_errors_are_one_line(config, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(capsys, ["train", str(config), "--out", str(tmp_path / "a"), "--nproc", "2", "--backend",
                            "nccl"], "--backend nccl", "CUDA is not available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_line_error(capsys, ["train", str(config), "--out", str(tmp_path / "b"), "--nproc", "2"],
                   "--nproc 2: only 1 CUDA device")


@pytest.mark.multiproc
def test_train_nproc_2_on_cpu(tmp_path, config):
    out = tmp_path / "two"
    assert main(["train", str(config), "--out", str(out), "--nproc", "2", "--quiet"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and all(r["images"] == 4 for r in rows)
    assert (out / "ckpt" / "2" / "meta.json").is_file()
