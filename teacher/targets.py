"""Teacher targets for a block of global-batch rows (the format is in core/targets.py).

The teacher sees the two global crops of each row, unmasked (as the official distillation), in
eval mode without autograd (bf16 autocast on GPU). `heads` targets stop at the heads' L2-normalised
bottleneck: the prototype layers (up to 262k outputs) are applied by each student group on its
own rows, so only Db + M/r * Di floats per row travel instead of K.

No device-to-host sync: which patches are masked is known on the host (the loader's masks), so the
masked patches are picked with an index computed there (`masked_patch_index`) and copied to the
device, not by boolean indexing on the device (a `nonzero` that waits for the GPU to count). The
counts `ibot_counts` stay host tensors too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dinodist.core.data.device import device_crops
from dinodist.core.targets import FEATURES, HEADS, Targets, ibot_counts, masks_from_collated


def masked_patch_index(masks: torch.Tensor) -> torch.Tensor:
    """Rows of the crop-major patch tokens [2r * P, D] holding the masked patches, in the wire order.

    `masks` [r, 2, P] (sample-major). The wire order is sample-major (row 0 crop 0's masked patches in
    increasing patch index, then row 0 crop 1, then row 1 ...) while the backbone's tokens are
    crop-major ([crop 0 of every row, then crop 1]): row i, crop c, patch p sits at (c * r + i) * P + p.
    Computed where `masks` lives: on the host, no device sync.
    """
    r, _, p = masks.shape
    row, crop, patch = masks.nonzero(as_tuple=True)  # lexicographic = sample-major
    return (crop * r + row) * p + patch


def target_tensors(backbone: nn.Module, dino_head: nn.Module | None, ibot_head: nn.Module | None,
                   crops: torch.Tensor, masks: torch.Tensor | None, kind: str) -> dict[str, torch.Tensor]:
    """crops: collated global crops [2r, 3, H, W] (crop-major); masks: [r, 2, P] bool (sample-major), or
    already `masked_patch_index(masks)` (int64 [M], what `compute_targets` passes: FSDP moves a model's
    inputs to its device, and bool masks there would need a device sync to select the patches).

    Returns sample-major float32 tensors: heads -> dino [r,2,Db], ibot [M,Di], and with bool masks
    ibot_counts [r,2] (an index does not carry them: `compute_targets` adds them from the host masks);
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
    index = masks if masks.dtype != torch.bool else masked_patch_index(masks)
    tokens = out["x_norm_patchtokens"].flatten(0, 1)  # crop-major and contiguous: a view, no copy
    ibot = ibot_head(tokens.index_select(0, index.to(tokens.device, non_blocking=True)), no_last_layer=True)
    tensors = {"dino": dino.float(), "ibot": ibot.float()}
    if masks.dtype == torch.bool:
        tensors["ibot_counts"] = ibot_counts(masks)
    return tensors


def compute_targets(model: nn.Module, batch: dict, iteration: int, start: int, kind: str,
                    device: torch.device) -> Targets:
    """Targets of the rows [start, start + r) from a collated batch of those rows (host masks: no sync)."""
    crops = device_crops(batch, "collated_global_crops", device)  # uint8 crops normalised on the device
    masks = masks_from_collated(batch["collated_masks"]) if kind == HEADS else None
    # the masked patches' rows, found on the host; moved before the call so FSDP's input move is a no-op
    index = masked_patch_index(masks).to(device, non_blocking=True) if masks is not None else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    # no_grad rather than inference_mode: FSDP2 writes unsharded parameters during forward
    with torch.no_grad(), autocast:
        tensors = model(crops, index)
    if masks is not None:
        tensors = {**tensors, "ibot_counts": ibot_counts(masks)}
    r = crops.shape[0] // 2
    return Targets(kind, iteration, start, start + r, tensors)
