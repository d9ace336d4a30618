"""Gradient clipping per submodule, as the official recipe: backbone and each head get their own norm."""

from __future__ import annotations

import torch
from torch import nn


def clip_grad_norms(model: nn.Module, max_norm: float | None,
                    measure: bool = True) -> dict[str, torch.Tensor]:
    """Clip the gradients of each child of `model` to `max_norm` separately; None only measures.

    Returns each child's pre-clip total L2 norm (children without gradients are left out). Under FSDP2
    the norm of sharded gradients is a partial DTensor; it is made whole first (a collective) so every
    rank scales its shards by the same factor. `max_norm=None, measure=False` does nothing at all.
    """
    norms: dict[str, torch.Tensor] = {}
    if max_norm is None and not measure:
        return norms
    for name, sub in model.named_children():
        params = [p for p in sub.parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        norms[name] = norm
    return norms
