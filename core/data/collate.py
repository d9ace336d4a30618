"""Batch layout of the official collate: crop-major crops plus the flat iBOT mask bookkeeping."""

from __future__ import annotations

import torch

from dinodist.core.errors import DinodistError


def _crop_major(x: torch.Tensor) -> torch.Tensor:
    # [B, n, ...] -> [n*B, ...]: all images' crop 0, then all images' crop 1, ... (official order)
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


def collate(crops: dict[str, torch.Tensor], masks: torch.Tensor) -> dict:
    """Official batch dict from `make_crops` output and `sample_masks` output ([B, 2, P] bool).

    Keys: `collated_global_crops [2B,3,H,W]`, `collated_local_crops [nB,3,h,w]`, `collated_masks [2B,P]`,
    `mask_indices_list` (flat indices of masked patches into 2B*P), `masks_weight` (1/#masked of the
    patch's crop, one per masked patch, so each crop's weights sum to 1), `n_masked_patches` ([1] long),
    `upperbound` (the masked-patch count; the official uses it only as a static buffer size),
    and `collated_gram_teacher_crops [2B,3,g,g]` when gram crops exist. Crops keep their dtype: float32
    normalised, or uint8 from `make_crops(..., uint8=True)`.
    """
    g = crops["global"]
    if g.dim() != 5 or g.shape[1] != 2:
        raise DinodistError(f"collate: crops['global'] must be [B,2,3,H,W], got {tuple(g.shape)}")
    b = g.shape[0]
    if masks.dim() != 3 or masks.shape[:2] != (b, 2) or masks.dtype != torch.bool:
        raise DinodistError(f"collate: masks must be bool [{b},2,P], got {masks.dtype} {tuple(masks.shape)}")
    collated_masks = _crop_major(masks)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop = collated_masks.sum(-1, keepdim=True).clamp(min=1).float()
    masks_weight = (1.0 / per_crop).expand_as(collated_masks)[collated_masks]
    n_masked = int(mask_indices_list.numel())
    out = {
        "collated_global_crops": _crop_major(g),
        "collated_local_crops": _crop_major(crops["local"]),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([n_masked], dtype=torch.long),
        "upperbound": n_masked,
    }
    if "gram" in crops:
        out["collated_gram_teacher_crops"] = _crop_major(crops["gram"])
    return out
