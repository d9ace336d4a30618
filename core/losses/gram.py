"""Gram anchoring loss: match the patch-similarity structure of a Gram teacher (official formula)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinodist.core.errors import DinodistError


def gram_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
) -> torch.Tensor:
    """MSE between the Gram matrices of L2-normalised student and teacher patch features [B, P, D].

    `img_level`: one [P, P] Gram per image; else one [B*P, B*P] Gram over the batch, which also takes the
    batch already flattened to [B*P, D] (as the official loss does). `remove_neg`
    clamps negative similarities to 0 in both; `remove_only_teacher_neg` zeroes the teacher's negatives
    and the student's where both are negative. The teacher is treated as a constant.
    """
    want = (3,) if img_level else (2, 3)
    if student.dim() not in want or teacher.dim() not in want:
        shapes = f"{list(student.shape)} and {list(teacher.shape)}"
        per = "[B, P, D]" if img_level else "[B, P, D] or [B*P, D]"
        raise DinodistError(f"gram_loss(img_level={img_level}): features must be {per}, got {shapes}")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    if not img_level:
        s, t = s.flatten(0, -2), t.flatten(0, -2)
    s_gram = s @ s.transpose(-1, -2)
    t_gram = t @ t.transpose(-1, -2)
    if remove_neg:
        s_gram = s_gram.clamp(min=0.0)
        t_gram = t_gram.clamp(min=0.0)
    elif remove_only_teacher_neg:
        both_neg = (s_gram < 0) & (t_gram < 0)
        t_gram = t_gram.clamp(min=0.0)
        s_gram = torch.where(both_neg, torch.zeros_like(s_gram), s_gram)
    return F.mse_loss(s_gram, t_gram)


def resize_gram_teacher(
    feats: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]
) -> torch.Tensor:
    """Resize teacher patch features [B, h*w, D] on their grid to [B, H*W, D] (bicubic, no antialias)."""
    b, p, d = feats.shape
    h, w = src_hw
    if p != h * w:
        raise DinodistError(f"resize_gram_teacher: {p} patches do not form a {h}x{w} grid")
    if tuple(src_hw) == tuple(dst_hw):
        return feats
    grid = feats.float().transpose(1, 2).reshape(b, d, h, w)
    out = F.interpolate(grid, size=tuple(dst_hw), mode="bicubic", align_corners=False, antialias=False)
    return out.flatten(2).transpose(1, 2).to(feats.dtype)
