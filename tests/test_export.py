"""`dinodist export hf|safetensors`: HF equivalence per size family, safetensors round trip, group heads,
model card, refusals. All in-process (cli.main)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dinodist.core.checkpoint import save_checkpoint
from dinodist.core.errors import DinodistError
from dinodist.core.models import HeadSpec, build_backbone, save_backbone
from dinodist.core.models.hf import from_hf_state_dict, to_hf_state_dict
from dinodist.core.models.io import write_sidecar
from dinodist.core.targets import HEADS
from dinodist.orchestrator.cli import main
from dinodist.students.model import build_student, make_ema

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TINY = ["tiny-vits", "tiny-vitsplus", "tiny-vitb", "tiny-vitl", "tiny-vithplus", "tiny-vit7b"]
HEAD = HeadSpec(32, 16, 64)


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Away from the init's near-identity (LayerScale 1e-5, zero biases, unit norms): every weight then
    shapes the output, so a mis-mapped one fails the comparison."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("gamma"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
        elif name.endswith("bias") or "token" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        elif "norm" in name:
            p.copy_(1 + torch.randn(p.shape, generator=g) * 0.2)
        else:
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return module


def _backbone(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _perturb(build_backbone(arch, **overrides), seed).eval()


def _official_pth(tmp_path, model, name="bb.pth", sidecar: dict | None = None):
    path = tmp_path / name
    save_backbone(model, path)
    if sidecar is not None:
        write_sidecar(path, sidecar)
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item() if a.numel() else 0.0


def _hf_vs_ours(model, folder, h: int, w: int) -> dict[str, float]:
    hf = transformers.DINOv3ViTModel.from_pretrained(str(folder)).eval()
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.forward_features(x), hf(pixel_values=x)
    r = 1 + model.n_storage_tokens
    last = theirs.last_hidden_state
    assert last.shape == (2, r + (h // model.patch_size) * (w // model.patch_size), model.embed_dim)
    return {
        "cls": _maxdiff(last[:, 0], ours["x_norm_clstoken"]),
        "registers": _maxdiff(last[:, 1:r], ours["x_storage_tokens"]),
        "patches": _maxdiff(last[:, r:], ours["x_norm_patchtokens"]),
        "pooler": _maxdiff(theirs.pooler_output, ours["x_norm_clstoken"]),
        "scale": ours["x_norm_patchtokens"].abs().max().item(),
    }


# ------------------------------------------------------------------------------------------ hf


@pytest.mark.parametrize("arch,size", [(a, (64, 80)) for a in TINY] + [("vits16", (224, 224))])
def test_hf_outputs_equal_forward_features(tmp_path, capsys, arch, size):
    model = _backbone(arch)
    pth = _official_pth(tmp_path, model)
    code, out, err = _cli(capsys, "hf", str(pth), str(tmp_path / "hf"), "--arch", arch, "--no-verify")
    assert code == 0, err
    assert "model.safetensors" in out and "config.json" in out
    diffs = _hf_vs_ours(model, tmp_path / "hf", *size)
    scale = diffs.pop("scale")
    assert scale > 0.5  # outputs are not vanishing, so 1e-4 is a real bound
    assert max(diffs.values()) <= 1e-4, diffs
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "dinov3_vit" and cfg["use_gated_mlp"] == (model.spec.ffn_layer == "swiglu")
    assert cfg["key_bias"] is False and cfg["query_bias"] == model.spec.qkv_bias


def test_hf_check_catches_a_wrong_mapping(tmp_path, capsys):
    # the comparison above is not vacuous: swapping the SwiGLU gate and up projections of one layer fails it
    model = _backbone("tiny-vitsplus")
    pth = _official_pth(tmp_path, model)
    code, _, err = _cli(capsys, "hf", str(pth), str(tmp_path / "hf"), "--arch=tiny-vitsplus", "--no-verify")
    assert code == 0, err
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    sd["layer.1.mlp.gate_proj.weight"], sd["layer.1.mlp.up_proj.weight"] = (
        sd["layer.1.mlp.up_proj.weight"], sd["layer.1.mlp.gate_proj.weight"])
    save_file(sd, f, metadata={"format": "pt"})
    diffs = _hf_vs_ours(model, tmp_path / "hf", 64, 64)
    assert diffs["patches"] > 1e-2


def test_hf_export_verifies_with_transformers_and_maps_back(tmp_path, capsys):
    # a group folder (sidecar, no --arch), the built-in check on, and an unmasked K bias (key_bias true)
    model = _backbone("tiny-vitb", depth=2)
    with torch.no_grad():
        model.blocks[1].attn.qkv.bias_mask.fill_(1.0)
    group = tmp_path / "run" / "g"
    group.mkdir(parents=True)
    _official_pth(group, model, "backbone.pth", {"arch": "tiny-vitb", "overrides": {"depth": 2}})
    code, out, err = _cli(capsys, "hf", str(group), str(tmp_path / "hf"))
    assert code == 0, err
    assert "checked: DINOv3ViTModel" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["key_bias"] is True
    diffs = _hf_vs_ours(model, tmp_path / "hf", 48, 32)
    diffs.pop("scale")
    assert max(diffs.values()) <= 1e-4, diffs
    # and back: the HF weights rebuild a backbone with identical outputs (the mapping is lossless)
    back = build_backbone("tiny-vitb", depth=2).eval()
    back.load_state_dict(from_hf_state_dict(back.spec, load_file(tmp_path / "hf" / "model.safetensors")))
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.allclose(back.forward_features(x)["x_norm_patchtokens"],
                              model.forward_features(x)["x_norm_patchtokens"], atol=1e-6)


def test_hf_without_registers_and_7b_norm_note(tmp_path, capsys):
    model = _backbone("tiny-vit7b", depth=2, n_storage_tokens=0)
    side = {"arch": "tiny-vit7b", "overrides": {"depth": 2, "n_storage_tokens": 0}}
    pth = _official_pth(tmp_path, model, sidecar=side)
    code, out, err = _cli(capsys, "hf", str(pth), str(tmp_path / "hf"))
    assert code == 0, err
    assert "note: local_cls_norm left out" in out
    diffs = _hf_vs_ours(model, tmp_path / "hf", 32, 32)
    diffs.pop("scale")
    assert max(diffs.values()) <= 1e-4, diffs


@pytest.mark.parametrize("case,needle", [
    ("head_dim", "head_dim 196"),
    ("periods", "rope_embed.periods"),
    ("no_arch", "--arch is required"),
])
def test_hf_refusals_are_one_line(tmp_path, capsys, case, needle):
    if case == "head_dim":  # transformers' float arange makes 50 RoPE frequencies of a 196 head_dim, not 49
        overrides = {"embed_dim": 196, "num_heads": 1, "depth": 1}
    else:
        overrides = {"depth": 1}
    model = _backbone("tiny-vits", **overrides)
    if case == "periods":
        with torch.no_grad():
            model.rope_embed.periods.mul_(1.5)
    side = None if case == "no_arch" else {"arch": "tiny-vits", "overrides": overrides}
    pth = _official_pth(tmp_path, model, sidecar=side)
    code, out, err = _cli(capsys, "hf", str(pth), str(tmp_path / "hf"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dinodist export: error: ") and needle in err, err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf.tmp-*"))


def test_mapping_refuses_an_unmapped_weight():
    model = build_backbone("tiny-vits", depth=1)
    state = dict(model.state_dict())
    state["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(DinodistError, match="no Hugging Face equivalent for weight 'blocks.0.attn.q_norm"):
        to_hf_state_dict(model.spec, state)


# ---------------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_of_an_official_pth(tmp_path, capsys):
    model = _backbone("tiny-vitl")
    pth = _official_pth(tmp_path, model)
    out_dir = tmp_path / "st"
    code, out, err = _cli(capsys, "safetensors", str(pth), str(out_dir), "--arch", "tiny-vitl")
    assert code == 0, err
    assert "round trip" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["README.md", "backbone.safetensors", "config.json"]
    sd = load_file(out_dir / "backbone.safetensors")
    official = torch.load(pth, weights_only=True)
    assert sd.keys() == official.keys()  # the official keys, buffers included (periods, bias_mask)
    assert all(torch.equal(sd[k], official[k]) for k in official)
    fresh = build_backbone("tiny-vitl", depth=1)  # a mismatching arch does not load
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(sd, strict=True)
    fresh = build_backbone("tiny-vitl").eval()
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(x)["x_norm_patchtokens"],
                           model.forward_features(x)["x_norm_patchtokens"])
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["arch"] == "tiny-vitl" and cfg["heads"] is None
    card = (out_dir / "README.md").read_text()
    assert "k-NN top-1 | not measured" in card and f"{sum(p.numel() for p in model.parameters()):,}" in card


def test_safetensors_of_a_teacher_export_carries_its_heads(tmp_path, capsys):
    from dinodist.core.models import build_head

    torch.manual_seed(0)
    backbone = _backbone("tiny-vits", depth=2)
    heads = {n: _perturb(build_head(48, HEAD), i) for i, n in enumerate(("dino_head", "ibot_head"))}
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    for n, h in heads.items():
        state.update({f"{n}.{k}": v for k, v in h.state_dict().items()})
    pth = tmp_path / "teacher.pth"
    torch.save({"teacher": state}, pth)
    write_sidecar(pth, {"arch": "tiny-vits", "overrides": {"depth": 2}, "layout": "teacher"})
    code, out, err = _cli(capsys, "safetensors", str(pth), str(tmp_path / "st"))
    assert code == 0, err
    hs = load_file(tmp_path / "st" / "heads.safetensors")
    assert hs.keys() == {k for k in state if not k.startswith("backbone.")}
    assert all(torch.equal(hs[k], state[k]) for k in hs)
    spec = json.loads((tmp_path / "st" / "heads.json").read_text())["heads"]["dino_head"]
    assert spec == {"hidden_dim": 32, "bottleneck_dim": 16, "n_prototypes": 64, "nlayers": 3, "in_dim": 48}
    # --no-heads: the backbone alone
    assert _cli(capsys, "safetensors", str(pth), str(tmp_path / "st2"), "--no-heads")[0] == 0
    assert not (tmp_path / "st2" / "heads.safetensors").exists()


def _group_folder(tmp_path):
    """OUT/<group> as students/run.py leaves it: ckpt/<it>/ of ModuleDict {student, ema}, backbone.pth of
    the EMA backbone + sidecar, metrics.jsonl."""
    out, name = tmp_path / "run", "tiny-vits"
    group = out / name
    student = build_student("tiny-vits", {"depth": 2}, HEADS, HEAD, HEAD, 0, seed=0)
    ema = make_ema(student)
    towers = torch.nn.ModuleDict({"student": student, "ema": ema})
    for it in (2, 4):
        _perturb(ema, seed=it)  # the EMA differs from the student, and between checkpoints
        save_checkpoint(group / "ckpt", it, towers, None, meta={"group": name}, keep=None)
    (group / "ckpt" / "6").mkdir()  # a newer save that never completed: no marker, skipped
    save_backbone(ema.backbone, group / "backbone.pth")
    write_sidecar(group / "backbone.pth", {
        "format": "dinodist-student-v1", "layout": "backbone", "arch": "tiny-vits", "overrides": {"depth": 2},
        "image_size": 64, "source": {"run_dir": str(out), "group": name, "iteration": 4,
                                     "teacher": "runs/t/teacher.pth", "data": "skimage", "targets": HEADS}})
    rows = [{"iteration": 0, "loss": 9.0}, {"iteration": 1, "loss": 8.0, "knn_top1": 0.25},
            {"iteration": 2, "loss": 7.0, "knn_top1": 0.5}, {"iteration": 3, "loss": 6.0, "knn_top1": 0.375}]
    (group / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 4, "lo')
    return group, student, ema


def test_safetensors_of_a_group_folder_has_the_ema_heads_and_a_card(tmp_path, capsys):
    group, student, ema = _group_folder(tmp_path)
    out_dir = tmp_path / "st"
    code, out, err = _cli(capsys, "safetensors", str(group), str(out_dir))
    assert code == 0, err
    hs = load_file(out_dir / "heads.safetensors")
    for name in ("dino_head", "ibot_head"):
        for k, v in getattr(ema, name).state_dict().items():
            assert torch.equal(hs[f"{name}.{k}"], v), k
            assert not torch.equal(getattr(student, name).state_dict()[k], v)  # EMA, not the student
    bb = load_file(out_dir / "backbone.safetensors")
    assert all(torch.equal(bb[k], v) for k, v in ema.backbone.state_dict().items())
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["overrides"] == {"depth": 2} and cfg["heads"]["ibot_head"]["n_prototypes"] == 64
    assert cfg["source"]["heads_iteration"] == 4
    card = (out_dir / "README.md").read_text()
    assert "last 37.50% (iteration 3), best 50.00% (iteration 2)" in card
    assert "runs/t/teacher.pth" in card and "skimage" in card and "| iterations | 4 |" in card


def test_out_dir_is_refused_unless_forced_and_replaced_atomically(tmp_path, capsys):
    model = _backbone("tiny-vits")
    pth = _official_pth(tmp_path, model)
    out_dir = tmp_path / "st"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("x")
    code, out, err = _cli(capsys, "safetensors", str(pth), str(out_dir), "--arch", "tiny-vits")
    assert code == 2 and err.count("\n") == 1 and "OUT_DIR" in err and "--force" in err
    assert (out_dir / "old.txt").exists()
    assert _cli(capsys, "safetensors", str(pth), str(out_dir), "--arch", "tiny-vits", "--force")[0] == 0
    assert not (out_dir / "old.txt").exists() and (out_dir / "backbone.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb.pth", "st"]  # no staging left behind
    # the checkpoint's own folder is never an OUT_DIR, even with --force
    code, _, err = _cli(capsys, "safetensors", str(pth), str(tmp_path), "--arch", "tiny-vits", "--force")
    assert code == 2 and "holds the CHECKPOINT" in err


def test_a_train_run_and_its_teacher_export(tmp_path, capsys):
    # a `dinodist train` folder as the loop leaves it (config.yaml, ckpt/<it>/ of the SSL model), exported
    # directly and through `dinodist export-teacher`: both give the EMA teacher's backbone and heads
    import yaml

    from dinodist.core.ssl.config import load_stage_config
    from dinodist.core.ssl.loop import build_for_export

    head = {"hidden_dim": 32, "bottleneck_dim": 16, "n_prototypes": 64}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"arch": "tiny-vits", "overrides": {"depth": 2}, "dino_head": head, "ibot_head": head},
        "data": {"source": "skimage", "global_batch_size": 4}, "crops": {"global_size": 32}}))
    model = build_for_export(load_stage_config(run / "config.yaml"))
    _perturb(model.teacher, seed=3)
    save_checkpoint(run / "ckpt", 7, model, None, keep=None)
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 6, "knn_top1": 0.6}) + "\n")
    assert _cli(capsys, "safetensors", str(run), str(tmp_path / "a"))[0] == 0
    assert main(["export-teacher", str(run), str(tmp_path / "t.pth")]) == 0
    assert _cli(capsys, "safetensors", str(tmp_path / "t.pth"), str(tmp_path / "b"))[0] == 0
    want = model.teacher.state_dict()  # backbone.*, dino_head.*, ibot_head.*
    for d in ("a", "b"):
        got = {f"backbone.{k}": v for k, v in load_file(tmp_path / d / "backbone.safetensors").items()}
        got.update(load_file(tmp_path / d / "heads.safetensors"))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], v) for k, v in want.items()), d
        card = (tmp_path / d / "README.md").read_text()
        assert "| iterations | 7 |" in card and "skimage" in card and "last 60.00% (iteration 6)" in card
