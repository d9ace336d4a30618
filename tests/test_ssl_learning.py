"""SSL loss wiring (what the teacher sees, crop pairing) and the config pieces of the CPU recipe."""

from __future__ import annotations

import math

import pytest
import torch

from dinodist.core.errors import DinodistError
from dinodist.core.losses import sinkhorn_knopp
from dinodist.core.ssl.config import StageConfig, config_from_dict, load_stage_config
from dinodist.core.ssl.model import build_ssl_model
from dinodist.core.ssl.schedules import schedule_value
from dinodist.core.ssl.step import StepScalars, compute_losses, teacher_targets

HEAD = {"hidden_dim": 32, "bottleneck_dim": 16, "n_prototypes": 32}
B, N_LOCAL, G, L, P = 4, 2, 24, 16, 9  # patch 8 -> 3x3 patches per global crop


def _cfg(**model) -> StageConfig:
    return config_from_dict(
        {
            "model": {"arch": "tiny-vits", "overrides": {"depth": 2, "embed_dim": 24, "layerscale_init": 1.0},
                      "dino_head": HEAD, "ibot_head": HEAD, **model},
            "data": {"source": "folder:/nonexistent", "global_batch_size": B},
            "crops": {"global_size": G, "local_size": L, "n_local": N_LOCAL},
        }
    )


def _batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    # Crops of one image share a strong per-image colour and texture, so features identify the image.
    base = 3.0 * torch.randn(B, 3, 4, 4, generator=gen)

    def views(size: int) -> torch.Tensor:
        up = torch.nn.functional.interpolate(base, size=(size, size), mode="nearest")
        return up + 0.1 * torch.randn(B, 3, size, size, generator=gen)

    masks = torch.zeros(2 * B, P, dtype=torch.bool)
    masks[0, [0, 4]] = True
    masks[3, [1, 2, 5, 8]] = True
    masks[6, [7]] = True
    idx = masks.flatten().nonzero().flatten()
    per_crop = masks.sum(-1, keepdim=True).clamp(min=1).float()
    return {
        "collated_global_crops": torch.cat([views(G) for _ in range(2)]),
        "collated_local_crops": torch.cat([views(L) for _ in range(N_LOCAL)]),
        "collated_masks": masks,
        "mask_indices_list": idx,
        "masks_weight": (1.0 / per_crop).expand_as(masks)[masks],
    }


def _model(cfg: StageConfig, seed: int = 0):
    model = build_ssl_model(cfg.model, False, seed)
    # Teacher != student, so a target computed from the wrong tower would show.
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # A fresh head's logits vary by ~0.01 between images: targets would be near uniform and a
        # pairing error invisible. Trained heads have far larger prototype weights.
        for tower in (model.student, model.teacher):
            for head in ("dino_head", "ibot_head"):
                tower[head].last_layer.weight.mul_(10.0)
    return model


SCALARS = StepScalars(teacher_temp=0.05, local_weight=1.0, gram_weight=0.0)


def _losses(model, batch, cfg):
    torch.manual_seed(0)  # RoPE coordinate augmentation of the student draws from the global RNG
    return compute_losses(model, batch, SCALARS, cfg.loss, cfg.gram, use_gram=False)


def test_teacher_targets_use_the_teacher_on_unmasked_crops():
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch()
    dino, ibot = teacher_targets(model, batch, SCALARS.teacher_temp)
    # By hand from the teacher tower on the raw crops.
    with torch.no_grad():
        out = model.teacher.backbone(batch["collated_global_crops"], is_training=True)
        logits = model.teacher.dino_head(out["x_norm_clstoken"])
        patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
        want_ibot = sinkhorn_knopp(model.teacher.ibot_head(patches), SCALARS.teacher_temp)
    torch.testing.assert_close(dino, sinkhorn_knopp(logits, SCALARS.teacher_temp))
    torch.testing.assert_close(ibot, want_ibot)
    # Student weights and the mask content (beyond which patches are selected) must not matter.
    with torch.no_grad():
        for p in model.student.parameters():
            p.mul_(-3.0)
    dino2, _ = teacher_targets(model, batch, SCALARS.teacher_temp)
    torch.testing.assert_close(dino2, dino)
    # Rows are distributions and SK spreads mass over prototypes: no double temperature / wrong axis.
    torch.testing.assert_close(dino.sum(-1), torch.ones(2 * B))
    assert float(dino.max()) > 2.0 / HEAD["n_prototypes"]


def _permute(batch: dict, perm: torch.Tensor, locals_too: bool = True) -> dict:
    """The same batch with its images reordered (crop-major layout kept)."""
    def crop_major(x, n):
        return x.view(n, B, *x.shape[1:])[:, perm].reshape(x.shape)

    masks = crop_major(batch["collated_masks"], 2)
    idx = masks.flatten().nonzero().flatten()
    per_crop = masks.sum(-1, keepdim=True).clamp(min=1).float()
    return {
        "collated_global_crops": crop_major(batch["collated_global_crops"], 2),
        "collated_local_crops": crop_major(batch["collated_local_crops"], N_LOCAL)
        if locals_too else batch["collated_local_crops"],
        "collated_masks": masks,
        "mask_indices_list": idx,
        "masks_weight": (1.0 / per_crop).expand_as(masks)[masks],
    }


def test_losses_pair_crops_of_the_same_image():
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch()
    _, ref = _losses(model, batch, cfg)
    perm = torch.tensor([2, 0, 3, 1])
    _, same = _losses(model, _permute(batch, perm), cfg)
    # Reordering whole images changes nothing: every term pairs crops of one image (SK is
    # permutation-equivariant, KoLeo is a mean over the batch).
    for name in ("dino_global", "dino_local", "ibot", "koleo"):
        torch.testing.assert_close(same[name], ref[name], rtol=1e-5, atol=1e-6)


def test_dino_terms_by_hand_per_image():
    """Both DINO terms recomputed with explicit (image, crop) loops over the crop-major layout."""
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch()
    _, terms = _losses(model, batch, cfg)
    t_dino, _ = teacher_targets(model, batch, SCALARS.teacher_temp)
    torch.manual_seed(0)
    outs = model.student.backbone(
        [batch["collated_global_crops"], batch["collated_local_crops"]], [batch["collated_masks"], None],
        is_training=True,
    )
    temp = cfg.loss.student_temp
    with torch.no_grad():
        lg = torch.log_softmax(model.student.dino_head(outs[0]["x_norm_clstoken"]) / temp, -1)
        ll = torch.log_softmax(model.student.dino_head(outs[1]["x_norm_clstoken"]) / temp, -1)
    glob, loc = [], []
    for i in range(B):
        teacher = [t_dino[c * B + i] for c in range(2)]
        # global: student crop a learns from teacher crop b != a only
        glob += [-(teacher[1 - a] * lg[a * B + i]).sum() for a in range(2)]
        loc += [-(teacher[c] * ll[j * B + i]).sum() for j in range(N_LOCAL) for c in range(2)]
    torch.testing.assert_close(terms["dino_global"], torch.stack(glob).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["dino_local"], torch.stack(loc).mean(), rtol=1e-5, atol=1e-6)
    # Local crops paired with another image's teacher targets would give a different value.
    shifted = [-(t_dino[c * B + (i + 1) % B] * ll[j * B + i]).sum()
               for i in range(B) for j in range(N_LOCAL) for c in range(2)]
    assert abs(float(torch.stack(shifted).mean() - terms["dino_local"])) > 1e-4


def test_yaml_float_overrides_are_coerced(tmp_path):
    # PyYAML reads `1e-5` (no dot) as the string "1e-5"; the arch would get a str and torch would fail.
    p = tmp_path / "s.yaml"
    p.write_text("model:\n  arch: tiny-vits\n  overrides: {layerscale_init: 1e-5, depth: 2}\n")
    cfg = load_stage_config(p)
    assert cfg.model.overrides == {"layerscale_init": 1e-5, "depth": 2}
    assert isinstance(cfg.model.overrides["layerscale_init"], float)
    model = build_ssl_model(cfg.model, False, 0)
    assert math.isclose(float(model.student.backbone.blocks[0].ls1.gamma[0].detach()), 1e-5, rel_tol=1e-6)
    cfg = load_stage_config(p, ["model.overrides.layerscale_init=1e-1"])
    assert cfg.model.overrides["layerscale_init"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "override, needle",
    [("model.overrides.layerscal_init=0.1", "unknown arch field 'layerscal_init'"),
     ("model.overrides.depth=two", "depth: 'two'")],
)
def test_bad_overrides_name_the_field(tmp_path, override, needle):
    p = tmp_path / "s.yaml"
    p.write_text("model: {arch: tiny-vits}\n")
    with pytest.raises(DinodistError) as e:
        load_stage_config(p, [override])
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "model.overrides" in msg and needle in msg


def test_cpu_recipes_agree():
    """Gram and high-res CPU stages continue the pretraining model: same arch, overrides and heads."""
    pre = load_stage_config("configs/stages/cpu-pretrain.yaml")
    for name in ("cpu-gram", "cpu-highres"):
        other = load_stage_config(f"configs/stages/{name}.yaml")
        assert other.model == pre.model, name
        assert other.loss.student_temp == pre.loss.student_temp, name
        # The teacher temperature carries on from where the pretraining schedule ends.
        last = schedule_value(pre.loss.teacher_temp, pre.train.iterations - 1, pre.train.iterations)
        assert schedule_value(other.loss.teacher_temp, 0, other.train.iterations) == last, name
        assert (other.crops.n_local, other.crops.global_scale, other.crops.local_scale) == (
            pre.crops.n_local, pre.crops.global_scale, pre.crops.local_scale), name
    gram = load_stage_config("configs/stages/cpu-gram.yaml")
    # Gram continues the pretraining run: its ramps start where pretraining stops.
    assert gram.loss.gram_weight.begin == gram.loss.local_weight.begin == pre.train.iterations
    assert pre.train.iterations < gram.gram.refresh_from < gram.train.iterations
