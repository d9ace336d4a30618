"""The losses of one SSL iteration (official formulas), for pretrain, Gram anchoring and high-res adaptation.

Order of the data: the EMA teacher sees the unmasked global crops -> DINO head on CLS, iBOT head on the
patches the student will see masked -> Sinkhorn-Knopp over the data-parallel group. The student sees the
iBOT-masked global crops and the local crops in one list forward -> DINO head on every CLS (one call),
iBOT head on the masked patches. Then

  L = w_dino * (s_local * w_local(it) * DINO_local + s_global * DINO_global)
      + w_koleo * n_global * mean_c KoLeo(student CLS of global crop c) + w_ibot * iBOT + w_gram(it) * Gram

with s_global = 2 / (2 + 2 n_local), s_local = 2 n_local / (2 + 2 n_local) (2/18 and 16/18 for 8 local crops):
the global DINO term ignores the diagonal (student crop a vs teacher crop b != a), so it has 2 pairs, and
the local term has 2 n_local pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dinodist.core.losses import (
    dino_loss,
    gram_loss,
    ibot_loss,
    koleo_loss,
    koleo_loss_distributed,
    resize_gram_teacher,
    sinkhorn_knopp,
)
from dinodist.core.ssl.config import GramConfig, LossConfig
from dinodist.core.ssl.model import SSLModel

N_GLOBAL = 2


@dataclass(frozen=True)
class StepScalars:
    """The scheduled values a step needs (pure functions of the iteration)."""

    teacher_temp: float
    local_weight: float
    gram_weight: float


def loss_scales(n_local: int) -> tuple[float, float]:
    """(global_scale, local_scale) of the DINO terms for 2 global and `n_local` local crops."""
    n_global_pairs = N_GLOBAL * (N_GLOBAL - 1)
    n_local_pairs = N_GLOBAL * n_local
    total = n_global_pairs + n_local_pairs
    return n_global_pairs / total, n_local_pairs / total


@torch.no_grad()
def teacher_targets(
    model: SSLModel, batch: dict, teacher_temp: float, group=None
) -> tuple[Tensor, Tensor]:
    """(DINO probs [2B,K], iBOT probs [M,K]) of the EMA teacher on the unmasked global crops."""
    # Through __call__ (forward), not forward_features: FSDP2 unshards a module in its forward hooks.
    out = model.teacher.backbone(batch["collated_global_crops"], is_training=True)
    dino_logits = model.teacher.dino_head(out["x_norm_clstoken"])
    patches = out["x_norm_patchtokens"].flatten(0, 1)
    ibot_logits = model.teacher.ibot_head(patches.index_select(0, batch["mask_indices_list"]))
    dino = sinkhorn_knopp(dino_logits, teacher_temp, group=group)
    ibot = sinkhorn_knopp(ibot_logits, teacher_temp, group=group)
    return dino, ibot


@torch.no_grad()
def gram_targets(model: SSLModel, batch: dict, student_hw: tuple[int, int]) -> Tensor:
    """Gram-teacher patch features [2B,P,D] on the gram crops, resized to the student's patch grid."""
    crops = batch.get("collated_gram_teacher_crops")
    if crops is None:
        crops = batch["collated_global_crops"]
    feats = model.gram_teacher(crops, is_training=True)["x_norm_patchtokens"]
    p = model.gram_teacher.patch_size
    src_hw = (crops.shape[-2] // p, crops.shape[-1] // p)
    if src_hw != tuple(student_hw):
        feats = resize_gram_teacher(feats, src_hw, tuple(student_hw))
    return feats


def compute_losses(
    model: SSLModel,
    batch: dict,
    scalars: StepScalars,
    loss_cfg: LossConfig,
    gram_cfg: GramConfig,
    use_gram: bool,
    group=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss (with grad) and the detached terms, all per this rank's rows."""
    g = batch["collated_global_crops"]
    loc = batch["collated_local_crops"]
    two_b = g.shape[0]
    b = two_b // N_GLOBAL
    n_local = loc.shape[0] // b if loc.numel() else 0
    t_dino, t_ibot = teacher_targets(model, batch, scalars.teacher_temp, group)

    bb = model.student.backbone
    xs, ms = [g], [batch["collated_masks"]]
    if n_local:
        xs.append(loc)
        ms.append(None)
    outs = bb(xs, ms, is_training=True)
    cls_g = outs[0]["x_norm_clstoken"]
    cls_all = torch.cat([cls_g] + ([outs[1]["x_norm_clstoken"]] if n_local else []))
    # One head call for every CLS: under FSDP2 each module runs forward once per iteration.
    s_dino = model.student.dino_head(cls_all)
    patches_g = outs[0]["x_norm_patchtokens"]
    s_ibot = model.student.ibot_head(patches_g.flatten(0, 1).index_select(0, batch["mask_indices_list"]))

    k = s_dino.shape[-1]
    t_dino = t_dino.view(N_GLOBAL, b, k)
    temp = loss_cfg.student_temp
    terms: dict[str, Tensor] = {}
    terms["dino_global"] = dino_loss(s_dino[:two_b].view(N_GLOBAL, b, k), t_dino, temp, ignore_diagonal=True)
    if n_local:
        terms["dino_local"] = dino_loss(s_dino[two_b:].view(n_local, b, k), t_dino, temp)
    terms["ibot"] = ibot_loss(
        s_ibot, t_ibot, batch["collated_masks"], student_temp=temp, masks_weight=batch["masks_weight"]
    )
    koleo = []
    for c in range(N_GLOBAL):
        x = cls_g[c * b : (c + 1) * b]
        if loss_cfg.koleo_distributed:
            koleo.append(koleo_loss_distributed(x, group=group, group_size=loss_cfg.koleo_group_size))
        else:
            koleo.append(koleo_loss(x))
    terms["koleo"] = torch.stack(koleo).mean()
    if use_gram:
        grid = g.shape[-2] // bb.patch_size, g.shape[-1] // bb.patch_size
        teacher_feats = gram_targets(model, batch, grid)
        terms["gram"] = gram_loss(
            patches_g, teacher_feats, img_level=gram_cfg.img_level, remove_neg=gram_cfg.remove_neg
        )

    s_global, s_local = loss_scales(n_local)
    total = loss_cfg.dino_weight * s_global * terms["dino_global"]
    if n_local:
        total = total + loss_cfg.dino_weight * s_local * scalars.local_weight * terms["dino_local"]
    total = total + loss_cfg.ibot_weight * terms["ibot"]
    total = total + loss_cfg.koleo_weight * N_GLOBAL * terms["koleo"]
    if use_gram:
        total = total + scalars.gram_weight * terms["gram"]
    return total, {name: v.detach() for name, v in terms.items()}
