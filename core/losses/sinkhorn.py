"""Sinkhorn-Knopp centering of teacher logits (official algorithm), all-reduced over a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _distributed(group):
        dist.all_reduce(x, group=group)
    return x


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor,
    temperature: float,
    n_iterations: int = 3,
    group=None,
    n_samples: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher probabilities [B, K] from logits [B, K] with equipartition over prototypes.

    Q = exp(logits / temperature) is alternately normalised so that, over all rows of the group, each
    prototype gets mass 1/K and each row 1/B_total; the result is scaled so every row sums to 1.
    Prototype sums are all-reduced over `group` (the world when None and torch.distributed is up);
    row sums are local. `B_total` is `n_samples` when given (iBOT: the masked-patch count over the
    group), else the all-reduced sum of local rows. Float32 math, no max-subtraction (as the official).
    """
    q = torch.exp(logits.float() / temperature).t()  # [K, B_local]
    k = q.shape[0]
    # Filled on the device, not copied from the host: a blocking host-to-device copy waits for the stream.
    if n_samples is None:
        total = _all_reduce(torch.full((), float(q.shape[1]), device=q.device), group)
    elif torch.is_tensor(n_samples):
        total = n_samples.to(device=q.device, dtype=torch.float32)
    else:
        total = torch.full((), float(n_samples), device=q.device)
    q /= _all_reduce(q.sum(), group)
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True), group)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= total
    q *= total
    return q.t()
