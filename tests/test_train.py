"""core.train: per-submodule clipping, the EMA update, one optimizer step, metrics.jsonl on resume."""

from __future__ import annotations

import json

import pytest
import torch

from dinodist.core.errors import DinodistError
from dinodist.core.train.clip import clip_grad_norms
from dinodist.core.train.ema import ema_update
from dinodist.core.train.metrics import open_metrics, write_record
from dinodist.core.train.optim import build_optimizer
from dinodist.core.train.update import optimizer_step


def _two_heads() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"backbone": torch.nn.Linear(4, 4), "dino_head": torch.nn.Linear(4, 2),
                                "frozen": torch.nn.Linear(2, 2).requires_grad_(False)})


def test_clip_grad_norms_clips_each_child_on_its_own():
    model = _two_heads()
    x = torch.randn(8, 4)
    (model["dino_head"](model["backbone"](x)) * 100).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want = {c: torch.linalg.vector_norm(torch.cat([g.flatten() for n, g in grads.items() if n.startswith(c)]))
            for c in ("backbone", "dino_head")}
    norms = clip_grad_norms(model, None)  # None: measure only
    assert norms.keys() == want.keys()  # "frozen" has no gradients and no norm
    assert all(torch.allclose(norms[c], want[c]) for c in want)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    norms = clip_grad_norms(model, 1.0)
    assert all(torch.allclose(norms[c], want[c]) for c in want)  # pre-clip norms
    for c in want:
        after = torch.cat([p.grad.flatten() for p in model[c].parameters()])
        assert float(want[c]) > 1 and torch.linalg.vector_norm(after) == pytest.approx(1.0, rel=1e-5)


def test_ema_update_is_mul_then_add():
    ema, model = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    e0 = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, before, m in zip(ema.parameters(), e0, model.parameters()):
        assert torch.equal(e, torch.add(before * 0.9, m.detach(), alpha=1 - 0.9))


def test_optimizer_step_scales_clips_steps_and_moves_the_ema():
    model = _two_heads()
    ema = _two_heads()
    opt = build_optimizer(model, 0, layerwise_decay=1.0, patch_embed_lr_mult=1.0, betas=(0.9, 0.999))
    loss = model["dino_head"](model["backbone"](torch.randn(8, 4))).sum()
    before = [p.detach().clone() for p in model.parameters()]
    norms = optimizer_step(loss, opt, model, ema, lr=0.1, wd=0.0, clip_grad=None, momentum=0.5,
                           loss_scale=2.0)
    assert set(norms) == {"backbone", "dino_head"}
    assert all(g["lr"] == pytest.approx(0.1) for g in opt.param_groups)
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert moved == [True, True, True, True, False, False]  # the frozen child keeps its weights
    with pytest.raises(DinodistError, match="no trainable parameters"):
        build_optimizer(torch.nn.Linear(2, 2).requires_grad_(False), 0, layerwise_decay=1.0,
                        patch_embed_lr_mult=1.0, betas=(0.9, 0.999))


def test_open_metrics_drops_records_past_the_resumed_iteration(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open_metrics(path) as f:
        for it in range(4):
            write_record(f, {"iteration": it, "loss": float(it)})
    with open(path, "a") as f:
        f.write('{"iteration": 4, "lo')  # a run killed mid-line
    with open_metrics(path, start=2) as f:
        write_record(f, {"iteration": 2, "loss": -1.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["iteration"], r["loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, -1.0)]
    with open_metrics(path) as f:  # a new run starts a new file
        pass
    assert path.read_text() == ""
