"""Activation checkpointing per block: same results, less saved memory; the cost model's activation
memory against a measurement on the meta device."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.memory_model import TOLERANCE, compare, memory_rows
from dinodist.core.errors import DinodistError
from dinodist.core.models import apply_activation_checkpointing, build_backbone, compile_blocks
from dinodist.core.models.activation_memory import SavedBytes, measure_backbone
from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD, checkpointing_mode
from dinodist.core.targets import HEADS
from dinodist.orchestrator.allocate import make_plan
from dinodist.orchestrator.cost import backbone_activation_bytes
from dinodist.orchestrator.topology import check_runnable, load_topology, parse_topology
from dinodist.students.model import build_student
from tests.gloo import run_gloo

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "topologies"
PAPER = CONFIGS / "dinov3-paper.yaml"


def _student(arch: str, mode: str, drop_path: float = 0.0):
    s = build_student(arch, {"drop_path_rate": drop_path}, HEADS, TINY_DINO_HEAD, TINY_IBOT_HEAD, 0, seed=0)
    return s.apply_activation_checkpointing(mode).train()


def _batch(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2 * n, 3, 32, 32, generator=g), torch.randn(2 * n, 3, 16, 16, generator=g),
            torch.tensor([0, 5, 17, 30, 33, 40]))


def _loss_and_grads(student, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    student.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # RoPE augmentation and stochastic depth draw the same numbers in both runs
    out = student(*batch)
    loss = out["dino"].square().mean() + out["ibot"].square().mean() + out["g_cls"].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("arch, drop_path", [("tiny-vits", 0.0), ("tiny-vitsplus", 0.25)],
                         ids=["mlp", "swiglu-droppath"])
def test_checkpointing_changes_memory_not_results(mode, arch, drop_path):
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(_student(arch, "none", drop_path), batch)
    loss, grads = _loss_and_grads(_student(arch, mode, drop_path), batch)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 40
    for name, g in grads.items():  # bit-identical: the recompute runs the same kernels on the same inputs
        assert torch.equal(g, ref_grads[name]), name


def test_checkpointing_keeps_names_and_eval():
    plain = _student("tiny-vits", "none")
    ckpt = _student("tiny-vits", "selective")
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert {b.checkpointing for b in ckpt.backbone.blocks} == {"selective"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # no graph, nothing to checkpoint: the plain forward runs
        torch.testing.assert_close(ckpt.eval().backbone(x), plain.eval().backbone(x), rtol=0, atol=0)


def test_modes_are_validated():
    modes = [checkpointing_mode(v) for v in (True, False, "selective", None)]
    assert modes == ["full", "none", "selective", "none"]
    with pytest.raises(DinodistError, match="^activation_checkpointing: 'some' is not one of true, false, "):
        apply_activation_checkpointing(build_backbone("tiny-vits"), "some")


def _forward_saved_bytes(model, xs) -> int:
    with SavedBytes([*model.parameters(), *model.buffers()]) as saved:
        model.forward_features_list(xs, [None] * len(xs))
    return saved.bytes


def test_checkpointing_reduces_saved_bytes():
    torch.manual_seed(0)
    xs = [torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16)]
    saved = {}
    for mode in ("none", "selective", "full"):
        model = apply_activation_checkpointing(build_backbone("tiny-vitb").train(), mode)
        saved[mode] = _forward_saved_bytes(model, xs)
    assert saved["none"] > 1.5 * saved["selective"] > 1.5 * 1.5 * saved["full"] > 0
    # and the same on the meta device, for a paper size at a paper batch
    meta = {m: measure_backbone("vitl16", 111, 256, 112, 8, m) for m in ("none", "selective", "full")}
    assert meta["none"].recompute == 0 < meta["selective"].recompute < meta["full"].recompute
    assert meta["none"].peak > 1.5 * meta["selective"].peak > 1.5 * 1.5 * meta["full"].peak


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_meta_measurement_is_the_real_one(mode):
    # the meta device (no data, routed to the fused attention kernel) saves what a real CPU run saves
    kw = dict(batch=2, global_size=32, local_size=16, n_local=2, mode=mode, dtype=torch.float32)
    real = measure_backbone("tiny-vitsplus", device="cpu", **kw)
    assert measure_backbone("tiny-vitsplus", device="meta", **kw) == real
    spec = build_backbone("tiny-vitsplus", device="meta").spec
    assert backbone_activation_bytes(spec, 2, [(2, 32), (2, 16)], mode, e=4) == real.peak


def test_cost_model_matches_measurement_small_and_paper():
    start = time.perf_counter()
    # a small student on CPU (fp32) and a paper-size one on H100 (bf16), at their plans' batches
    demo = load_topology(CONFIGS / "cpu-demo.yaml", {"teacher.checkpoint": None})
    small = make_plan(demo).group("tiny-vits")
    for mode in ("none", "full", "selective"):
        r = compare(demo, "tiny-vits", small.batch_per_rank, mode)
        assert r["ratio"] == pytest.approx(1, abs=TOLERANCE), (mode, r)
    (row,) = memory_rows(load_topology(PAPER), groups=["vitl16"])
    assert row["activation_checkpointing"] == "full" and row["batch_per_rank"] > 100
    for mode, r in row["modes"].items():
        assert r["ratio"] == pytest.approx(1, abs=TOLERANCE), (mode, r)
        assert r["heads_measured_bytes"] > 0
    assert time.perf_counter() - start < 60


def test_topology_accepts_selective_and_runs_it(tmp_path):
    raw = yaml.safe_load(PAPER.read_text())
    raw["students"][0]["activation_checkpointing"] = "selective"
    raw["students"][1]["activation_checkpointing"] = False
    topo = parse_topology(raw)
    check_runnable(topo)  # no longer refused: the runtime applies it
    plan = make_plan(topo)
    assert plan.group("vits16").devices >= 4  # selective keeps more than full: at least as many ranks
    raw["students"][0]["activation_checkpointing"] = "sometimes"
    with pytest.raises(DinodistError, match=r"^students\[0\]\.activation_checkpointing: must be true, "
                                            r"false or selective, got 'sometimes'$"):
        parse_topology(raw)


def test_plan_refuses_a_group_that_does_not_fit():
    raw = yaml.safe_load(PAPER.read_text())
    raw["students"][0].update(devices=1, activation_checkpointing=False)
    with pytest.raises(DinodistError, match=r"^students\[0\]: vits16 \(fsdp\) needs [\d.]+ GiB per rank on 1 "
                                            r"devices \(batch 4096 per rank\) but a h100 rank has [\d.]+ GiB "
                                            r"usable; try activation_checkpointing: true$"):
        make_plan(parse_topology(raw))


def test_compile_blocks_keeps_results():
    pytest.importorskip("torch._dynamo")
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(_student("tiny-vits", "selective"), batch)
    student = _student("tiny-vits", "selective")
    compile_blocks(student.backbone, backend="aot_eager", dynamic=False)
    loss, grads = _loss_and_grads(student, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _fsdp_rank(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from dinodist.students.model import shard_student

    batch = _batch(n=2, seed=7)
    ref_loss, ref_grads = _loss_and_grads(_student("tiny-vits", "none"), batch)
    mesh = init_device_mesh("cpu", (2,))
    for mode in ("full", "selective"):
        student = shard_student(_student("tiny-vits", mode), mesh)
        loss, grads = _loss_and_grads(student, batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            # FSDP averages the two ranks' identical gradients; each rank holds its shard
            torch.testing.assert_close(g.full_tensor(), ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.multiproc
def test_checkpointing_under_fsdp(tmp_path):
    # checkpointing first, then shard_student: the blocks' FSDP units wrap the checkpointed forward,
    # so the backward's recompute runs on the weights FSDP gathers again for it
    run_gloo(_fsdp_rank, 2, tmp_path, timeout_s=120)
