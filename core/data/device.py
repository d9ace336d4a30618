"""Getting a loader batch onto the training device: pinned host memory, non-blocking copies, uint8 crops.

The loader (CPU, background threads or worker processes) pins a batch when its consumer trains on
CUDA; the training loop then calls `prepare_batch(batch, device)`, which copies every tensor with
`non_blocking=True` when it is pinned (the copy overlaps whatever the GPU is still running) and turns
uint8 crops (`BatchLoader(uint8=True)`) into normalised float crops on the device, where the division
costs nothing next to the forward pass and the host-to-device traffic is a quarter of float32's.

On CPU, `normalize_crops` of a uint8 batch computes `normalize(x.float().div_(255))` with the same ops
in the same order as `core.data.augment`, so it equals the float path bit for bit whenever the uint8
crop holds the float crop exactly (crops without photometric distortions, e.g. Gram crops). Distorted
crops were rounded to uint8 after the distortions, which moves a pixel by at most 0.5/255 before
normalisation: `UINT8_ATOL` after it (see docs/data.md).
"""

from __future__ import annotations

import torch

from dinodist.core.data.augment import IMAGENET_STD
from dinodist.core.errors import DinodistError

CROP_KEYS = ("collated_global_crops", "collated_local_crops", "collated_gram_teacher_crops")
# Rounding to the nearest uint8 step is at most half a step; dividing by the smallest std amplifies it
# most. The 1e-6 covers the float32 rounding of the two normalisations being compared.
UINT8_ATOL = 0.5 / (255.0 * min(IMAGENET_STD)) + 1e-6


def wants_pinned(device: torch.device | str | None) -> bool:
    """Whether batches bound for `device` should be pinned: only CUDA copies gain from it."""
    return device is not None and torch.device(device).type == "cuda"


def pin_batch(batch: dict) -> dict:
    """The batch with every CPU tensor in page-locked memory (a copy; other values as they are)."""
    return {k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v
            for k, v in batch.items()}


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Every tensor of the batch on `device`; pinned tensors go to CUDA with `non_blocking=True`.

    A non-blocking copy from pageable memory would silently be synchronous, and one to the CPU could
    hand out the tensor before its bytes arrive, so only pinned-to-CUDA copies are non-blocking.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=cuda and v.is_pinned())
        out[k] = v
    return out


def normalize_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 crops [N,3,H,W] -> `(x/255 - mean)/std` computed in float32 on x's device, returned as `dtype`.

    bf16 is a cast of the float32 result, never bf16 arithmetic: the normalised values then differ
    from float32 by bf16's rounding alone (8 significant bits).
    """
    if x.dtype != torch.uint8:
        raise DinodistError(f"normalize_uint8: crops must be uint8, got {x.dtype}")
    m = mean.to(x.device, torch.float32).view(1, 3, 1, 1)
    s = std.to(x.device, torch.float32).view(1, 3, 1, 1)
    y = x.float().div_(255.0).sub_(m).div_(s)
    return y if dtype == torch.float32 else y.to(dtype)


def normalize_crops(batch: dict, dtype: torch.dtype = torch.float32) -> dict:
    """The batch with its uint8 crops normalised (on whatever device they are) and float crops as `dtype`.

    A uint8 batch carries its normalisation constants as `crop_mean` and `crop_std` ([3] float32).
    """
    out = dict(batch)
    for key in CROP_KEYS:
        x = out.get(key)
        if x is None:
            continue
        if x.dtype == torch.uint8:
            if "crop_mean" not in out or "crop_std" not in out:
                raise DinodistError(f"batch[{key!r}] is uint8 but the batch has no crop_mean/crop_std")
            out[key] = normalize_uint8(x, out["crop_mean"], out["crop_std"], dtype)
        elif x.dtype != dtype:
            out[key] = x.to(dtype)
    return out


def device_crops(batch: dict, key: str, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One crop tensor of the batch on `device`, normalised if uint8, without copying the rest."""
    part = {k: batch[k] for k in (key, "crop_mean", "crop_std") if k in batch}
    return normalize_crops(to_device(part, device), dtype)[key]


def prepare_batch(batch: dict, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """What a training loop calls on each loader batch: `to_device`, then `normalize_crops` there."""
    return normalize_crops(to_device(batch, device), dtype)
