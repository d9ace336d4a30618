"""DINO loss: cross-entropy between student and teacher crops over all crop pairs (official formula)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy over all (student crop s, teacher crop t) pairs.

    `student_logits` [S, B, K], `teacher_probs` [T, B, K] (rows sum to 1). The summed CE is divided by
    B * S * T, or, with `ignore_diagonal` (global crops: a crop does not learn from itself), the pairs
    s == t are dropped and the divisor is B * (S * T - min(S, T)).
    """
    s, b, _ = student_logits.shape
    t = teacher_probs.shape[0]
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    pair_ce = -torch.einsum("sbk,tbk->st", log_p, teacher_probs.float())
    if ignore_diagonal:
        m = min(s, t)
        pair_ce = pair_ce * (1.0 - torch.eye(s, t, device=pair_ce.device, dtype=pair_ce.dtype))
        return pair_ce.sum() / (b * (s * t - m))
    return pair_ce.sum() / (b * s * t)
