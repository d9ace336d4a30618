"""Activation checkpointing changes memory, never results: whole training runs (an SSL stage, an inline
distillation) with checkpointing off, full and selective log the same losses, bit for bit on CPU.

Drop path is on in both, so the blocks draw random numbers in their forward: the recompute in the
backward must replay them (`preserve_rng_state`) and leave the RNG where the plain run leaves it, or
the next iteration's draws, and so its losses, would differ.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dinodist.core.models import block as block_mod
from dinodist.core.models import compile_blocks
from dinodist.core.ssl import model as ssl_model
from dinodist.core.ssl.config import config_from_dict
from dinodist.core.ssl.loop import train
from dinodist.core.ssl.model import SSLModel, checkpoint_and_compile

HEAD = {"hidden_dim": 32, "bottleneck_dim": 16, "n_prototypes": 64}
MODES = (False, True, "selective")
ITERATIONS = 3
# everything a metrics line carries that depends on the computation (not step_seconds)
SSL_KEYS = ("loss", "dino_global", "dino_local", "ibot", "koleo", "grad_norm")
DISTILL_KEYS = ("loss", "dino_global", "dino_local", "ibot", "koleo")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture
def checkpointed_calls(monkeypatch) -> list[str]:
    """The mode of every block forward that ran checkpointed (the recompute calls the block directly)."""
    calls: list[str] = []
    real = block_mod.run_checkpointed

    def counting(fn, mode, *args):
        calls.append(mode)
        return real(fn, mode, *args)

    monkeypatch.setattr(block_mod, "run_checkpointed", counting)
    return calls


def _ssl_config(source: str, mode: bool | str, compile_: bool = False):
    return config_from_dict({
        "model": {"arch": "tiny-vits", "overrides": {"depth": 2, "embed_dim": 24, "drop_path_rate": 0.3},
                  "dino_head": HEAD, "ibot_head": HEAD},
        "data": {"source": source, "global_batch_size": 4, "prefetch": 1},
        "crops": {"global_size": 24, "local_size": 16, "n_local": 2},
        "optim": {"lr": 2e-3, "freeze_last_layer_iters": 1},
        "train": {"iterations": ITERATIONS, "checkpoint_every": 100, "activation_checkpointing": mode,
                  "compile": compile_},
    })


def test_ssl_checkpointing_only_touches_the_student():
    cfg = _ssl_config("skimage", "selective")
    model = checkpoint_and_compile(SSLModel(cfg.model, with_gram_teacher=True), "selective")
    assert {b.checkpointing for b in model.student.backbone.blocks} == {"selective"}
    assert {b.checkpointing for b in model.teacher.backbone.blocks} == {"none"}
    assert {b.checkpointing for b in model.gram_teacher.blocks} == {"none"}
    plain = SSLModel(cfg.model, with_gram_teacher=True)
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints load either way


def test_ssl_stage_losses_identical_with_checkpointing(tmp_path, folder, checkpointed_calls):
    start = time.perf_counter()
    runs = {}
    for mode in MODES:
        checkpointed_calls.clear()
        train(_ssl_config(f"folder:{folder}", mode), tmp_path / str(mode), progress=False)
        runs[mode] = _rows(tmp_path / str(mode) / "metrics.jsonl")
        # the student's 2 blocks, once per iteration; the teachers' forwards (no grad) never checkpoint
        want = [] if mode is False else [{True: "full"}.get(mode, mode)] * (2 * ITERATIONS)
        assert checkpointed_calls == want, mode
    ref = runs[False]
    assert len(ref) == ITERATIONS and ref[0]["loss"] != ref[-1]["loss"]
    for mode in MODES[1:]:
        for r, c in zip(ref, runs[mode]):
            for key in SSL_KEYS:
                assert c[key] == r[key], (mode, r["iteration"], key, r[key], c[key])  # bit-identical
    assert time.perf_counter() - start < 30


def test_ssl_compile_after_checkpointing(tmp_path, folder, monkeypatch):
    # aot_eager: dynamo's capture and AOT autograd with eager kernels; inductor would spend about a
    # minute on this 2-core CPU and start compile workers
    pytest.importorskip("torch._dynamo")
    compiled = []

    def compile_aot_eager(backbone, **kw):
        assert {b.checkpointing for b in backbone.blocks} == {"selective"}  # checkpointing first
        compiled.append(backbone)
        return compile_blocks(backbone, backend="aot_eager", **kw)

    monkeypatch.setattr(ssl_model, "compile_blocks", compile_aot_eager)
    torch._dynamo.reset()
    try:
        train(_ssl_config(f"folder:{folder}", "selective", compile_=True), tmp_path / "c", progress=False)
    finally:
        torch._dynamo.reset()
    train(_ssl_config(f"folder:{folder}", "selective"), tmp_path / "e", progress=False)
    assert len(compiled) == 1 and all(b._compiled_call_impl is not None for b in compiled[0].blocks)
    for e, c in zip(_rows(tmp_path / "e" / "metrics.jsonl"), _rows(tmp_path / "c" / "metrics.jsonl"),
                    strict=True):
        for key in SSL_KEYS:
            assert c[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6), (e["iteration"], key)


def _topology(path: Path, mode: bool | str) -> Path:
    topo = {
        "name": "checkpointing",
        "backend": "gloo",
        "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 1, "embed_dim": 64, "num_heads": 4},
                    "checkpoint": None, "targets": "heads", "shard": "replicate", "devices": 1},
        "students": [{"name": "tiny-vits", "arch": "tiny-vits", "devices": 1,
                      "overrides": {"depth": 2, "drop_path_rate": 0.3},
                      "activation_checkpointing": mode}],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2},
        "train": {"global_batch_size": 4, "iterations": ITERATIONS, "seed": 5, "lr": 2e-3},
        "metrics": {"port": 0},
        "output": str(path.parent / "unused"),
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def test_distillation_losses_identical_with_checkpointing(tmp_path, checkpointed_calls):
    # the inline runner forms a one-rank gloo world in this process: no process is started
    import torch.distributed as dist

    from dinodist.core.models import read_state_dict
    from dinodist.orchestrator.runtime.inline import run_inline

    start = time.perf_counter()
    runs, counts = {}, {}
    try:
        for mode in MODES:
            checkpointed_calls.clear()
            run_inline(_topology(tmp_path / f"{mode}.yaml", mode), "tiny-vits", tmp_path / str(mode))
            runs[mode] = _rows(tmp_path / str(mode) / "tiny-vits" / "metrics.jsonl")
            counts[mode] = set(checkpointed_calls), len(checkpointed_calls)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # the student's 2 blocks run checkpointed once per iteration; its EMA copy keeps the mode but runs
    # without grad
    assert counts == {False: (set(), 0), True: ({"full"}, 2 * ITERATIONS),
                      "selective": ({"selective"}, 2 * ITERATIONS)}
    ref = runs[False]
    assert len(ref) == ITERATIONS and ref[0]["loss"] != ref[-1]["loss"]
    for mode in MODES[1:]:
        for r, c in zip(ref, runs[mode], strict=True):
            for key in DISTILL_KEYS:
                assert c[key] == r[key], (mode, r["iteration"], key, r[key], c[key])  # bit-identical
        # and the exported students are the same weights
        a = read_state_dict(tmp_path / "False" / "tiny-vits" / "backbone.pth")
        b = read_state_dict(tmp_path / str(mode) / "tiny-vits" / "backbone.pth")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mode
    assert time.perf_counter() - start < 15


def _fsdp_ranks(folder: str, out: str) -> None:
    for mode in MODES:
        train(_ssl_config(f"folder:{folder}", mode), Path(out) / str(mode), progress=False)


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_ssl_checkpointing_under_fsdp(tmp_path, folder):
    # 2 ranks: the student's blocks are FSDP units around the checkpointed forward, so the backward's
    # recompute runs on the weights FSDP gathers again for it; each rank's drop path still replays
    from dinodist.core.distributed import spawn_local

    spawn_local(_fsdp_ranks, 2, (str(folder), str(tmp_path)), backend="gloo", timeout_s=150)
    ref = _rows(tmp_path / "False" / "metrics.jsonl")
    assert len(ref) == ITERATIONS
    for mode in MODES[1:]:
        for r, c in zip(ref, _rows(tmp_path / str(mode) / "metrics.jsonl"), strict=True):
            for key in SSL_KEYS:
                assert c[key] == r[key], (mode, r["iteration"], key, r[key], c[key])  # bit-identical on gloo
