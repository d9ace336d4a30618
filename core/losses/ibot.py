"""iBOT loss: per-sample mean cross-entropy on masked patches (official formula)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ibot_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
    masks_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy at the M masked patches, averaged within each crop, summed, divided by N.

    `student_logits`, `teacher_probs` [M, K] hold the masked patches in `masks.flatten().nonzero()`
    order; `masks` [N, P] bool (N = 2B global crops). `masks_weight` [M] defaults to 1/#masked of the
    patch's crop, so a crop without masked patches contributes 0 but still counts in N.
    """
    if masks_weight is None:
        per_crop = masks.sum(-1, keepdim=True).clamp(min=1).float()
        masks_weight = (1.0 / per_crop).expand_as(masks)[masks]
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    ce = torch.sum(teacher_probs.float() * log_p, dim=-1)
    return -(ce * masks_weight.float()).sum() / masks.shape[0]
