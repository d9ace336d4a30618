"""The EMA update of a teacher (SSL) or of a student's EMA copy, and plain weight copies between towers.

Under FSDP2 both modules are sharded alike, so each rank updates its own local shards: the update is
elementwise and needs no communication.
"""

from __future__ import annotations

import torch
from torch import nn


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (the tensor itself when unsharded)."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """ema = m * ema + (1 - m) * model over every parameter, as the official DINOv3 update (mul, then add)."""
    e = [local_tensor(p) for p in ema.parameters()]
    m = [local_tensor(p.detach()) for p in model.parameters()]
    torch._foreach_mul_(e, momentum)
    torch._foreach_add_(e, m, alpha=1.0 - momentum)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst <- src, parameters and buffers (identical architecture and sharding)."""
    for a, b in zip(dst.parameters(), src.parameters()):
        local_tensor(a).copy_(local_tensor(b))
    for a, b in zip(dst.buffers(), src.buffers()):
        a.copy_(b)
