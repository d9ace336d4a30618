"""AdamW parameter groups of the official recipe and the per-iteration lr/wd update (SSL and students).

Per submodule of the trained model (backbone, dino_head, ibot_head, feature_proj) a parameter gets
  lr_mult = layerwise_decay ** (L + 1 - layer_id)  (layer_id 0: patch_embed, tokens; i+1: block i; L+1: rest)
          * patch_embed_lr_mult                     (patch_embed only)
  wd_mult = 0 for names ending in "bias" or containing "norm" / "gamma" (tokens and patch weights keep wd)
and the heads' `last_layer` weights are flagged so they can be frozen (lr 0) for the first iterations.
Parameters with equal (lr_mult, wd_mult, last_layer) share one group, keeping the foreach kernels long.

The update kernel follows the parameters' device (`adamw_kwargs`): on CUDA the fused AdamW (one
kernel per group, step counters kept on the device, so nothing is read back to the host); elsewhere
the foreach one, as before.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dinodist.core.errors import DinodistError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_LAYER0 = ("cls_token", "storage_tokens", "mask_token", "register_tokens", "patch_embed")


def layer_id(name: str, depth: int) -> int:
    """Depth index of a backbone parameter, relative name (no "backbone." prefix)."""
    if name.startswith(_LAYER0):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def multipliers(
    submodule: str, name: str, depth: int, layerwise_decay: float, patch_embed_lr_mult: float
) -> tuple[float, float, bool]:
    """(lr_mult, wd_mult, is_last_layer) for parameter `name` of submodule `submodule`."""
    lid = layer_id(name, depth) if submodule == "backbone" else depth + 1
    lr_mult = layerwise_decay ** (depth + 1 - lid)
    if submodule == "backbone" and name.startswith("patch_embed"):
        lr_mult *= patch_embed_lr_mult
    no_wd = name.endswith("bias") or "norm" in name or "gamma" in name
    return lr_mult, 0.0 if no_wd else 1.0, name.startswith("last_layer")


def param_groups(
    model: nn.Module, depth: int, layerwise_decay: float, patch_embed_lr_mult: float
) -> list[dict]:
    """Groups over the trainable parameters of `model` (children: backbone and heads or projection)."""
    buckets: dict[tuple[float, float, bool], dict] = {}
    for sub_name, sub in model.named_children():
        for name, p in sub.named_parameters():
            if not p.requires_grad:
                continue
            key = multipliers(sub_name, name, depth, layerwise_decay, patch_embed_lr_mult)
            group = buckets.setdefault(
                key,
                {"params": [], "names": [], "lr_mult": key[0], "wd_mult": key[1], "last_layer": key[2]},
            )
            group["params"].append(p)
            group["names"].append(f"{sub_name}.{name}")
    return [buckets[k] for k in sorted(buckets)]


def adamw_kwargs(device_type: str) -> dict[str, bool]:
    """The AdamW implementation for parameters on `device_type`: fused on CUDA, foreach elsewhere.

    Fused keeps its step counters on the device (foreach keeps them on the host and reads them every
    step) and updates a whole group in one kernel; on CPU foreach keeps every result as it was.
    """
    return {"fused": True} if device_type == "cuda" else {"foreach": True}


def _device_type(groups: list[dict]) -> str:
    # DTensor parameters (FSDP2) report the device of their local shards, which is what the kernels see
    return groups[0]["params"][0].device.type


def build_optimizer(
    model: nn.Module,
    depth: int,
    *,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`; lr and wd are 0 until `apply_hyperparams` sets this iteration's values.

    Build it after the model is on its device: the implementation (`adamw_kwargs`) follows the device.
    """
    groups = param_groups(model, depth, layerwise_decay, patch_embed_lr_mult)
    if not groups:
        raise DinodistError(f"{type(model).__name__} has no trainable parameters")
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, weight_decay=0.0,
                             **adamw_kwargs(_device_type(groups)))


def apply_hyperparams(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, freeze_last_layer: bool = False
) -> None:
    """Set this iteration's lr and wd on every group; last_layer groups get lr 0 while frozen."""
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if (freeze_last_layer and g["last_layer"]) else lr * g["lr_mult"]
        g["weight_decay"] = wd * g["wd_mult"]
