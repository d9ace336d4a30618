"""One optimizer update in the order both training loops use: lr/wd -> backward -> clip -> step -> EMA."""

from __future__ import annotations

import torch
from torch import nn

from dinodist.core.train.clip import clip_grad_norms
from dinodist.core.train.ema import ema_update
from dinodist.core.train.optim import apply_hyperparams


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    ema: nn.Module,
    *,
    lr: float,
    wd: float,
    clip_grad: float | None,
    momentum: float,
    freeze_last_layer: bool = False,
    loss_scale: float = 1.0,
    measure_norms: bool = True,
) -> dict[str, torch.Tensor]:
    """Backward `loss` (times `loss_scale`), clip per child of `model`, step, then move `ema` towards `model`.

    `clip_grad` None: no clipping (the norms are still measured unless `measure_norms` is false).
    Returns each child's pre-clip gradient norm (core.train.clip).
    """
    apply_hyperparams(optimizer, lr, wd, freeze_last_layer)
    optimizer.zero_grad(set_to_none=True)
    # x 1.0 is skipped rather than multiplied: a plain backward stays bit for bit what it was
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    norms = clip_grad_norms(model, clip_grad, measure=measure_norms)
    optimizer.step()
    ema_update(ema, model, momentum)
    return norms
