"""The SSL stages' AdamW from their `optim:` config; groups and lr/wd update: core/train/optim.py."""

from __future__ import annotations

import torch
from torch import nn

from dinodist.core.ssl.config import OptimConfig
from dinodist.core.train.optim import build_optimizer as _build


def build_optimizer(student: nn.Module, depth: int, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the official parameter groups over `student` (backbone, dino_head, ibot_head)."""
    return _build(student, depth, layerwise_decay=cfg.layerwise_decay,
                  patch_embed_lr_mult=cfg.patch_embed_lr_mult, betas=cfg.betas, eps=cfg.eps)
