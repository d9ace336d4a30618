"""Teacher targets for a block of global-batch rows (the format is in core/targets.py).

The teacher sees the two global crops of each row, unmasked (as the official distillation), in
eval mode without autograd (bf16 autocast on GPU). `heads` targets stop at the heads' L2-normalised
bottleneck: the prototype layers (up to 262k outputs) are applied by each student group on its
own rows, so only Db + M/r * Di floats per row travel instead of K.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dinodist.core.targets import FEATURES, HEADS, Targets, ibot_counts, masks_from_collated


def target_tensors(backbone: nn.Module, dino_head: nn.Module | None, ibot_head: nn.Module | None,
                   crops: torch.Tensor, masks: torch.Tensor | None, kind: str) -> dict[str, torch.Tensor]:
    """crops: collated global crops [2r, 3, H, W] (crop-major); masks: [r, 2, P] (sample-major).

    Returns sample-major float32 tensors: heads -> dino [r,2,Db], ibot [M,Di], ibot_counts [r,2];
    features -> cls [r,2,D], patch [r,2,P,D].
    """
    r = crops.shape[0] // 2
    out = backbone.forward_features(crops)
    cls = out["x_norm_clstoken"].view(2, r, -1).transpose(0, 1)  # [r, 2, D]
    patches = out["x_norm_patchtokens"]
    patches = patches.view(2, r, *patches.shape[1:]).transpose(0, 1)  # [r, 2, P, D]
    if kind == FEATURES:
        return {"cls": cls.float().contiguous(), "patch": patches.float().contiguous()}
    assert masks is not None and dino_head is not None and ibot_head is not None
    dino = dino_head(cls.reshape(2 * r, -1), no_last_layer=True).view(r, 2, -1)
    # boolean indexing of [r,2,P,D] by [r,2,P] enumerates masked patches sample-major (the wire order)
    ibot = ibot_head(patches[masks.to(patches.device)], no_last_layer=True)
    return {"dino": dino.float(), "ibot": ibot.float(), "ibot_counts": ibot_counts(masks)}


def compute_targets(model: nn.Module, batch: dict, iteration: int, start: int, kind: str,
                    device: torch.device) -> Targets:
    """Targets of the rows [start, start + r) from a collated batch of those rows."""
    crops = batch["collated_global_crops"].to(device, non_blocking=True)
    masks = masks_from_collated(batch["collated_masks"]) if kind == HEADS else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    # no_grad rather than inference_mode: FSDP2 writes unsharded parameters during forward
    with torch.no_grad(), autocast:
        tensors = model(crops, masks)
    r = crops.shape[0] // 2
    return Targets(kind, iteration, start, start + r, tensors)
