"""KoLeo regulariser: spreads features by penalising small nearest-neighbour distances (official formula)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinodist.core.errors import DinodistError


def _nn_log_distance(x: torch.Tensor, candidates: torch.Tensor, self_index: torch.Tensor, eps: float):
    """-log distance from each row of x to its nearest candidate (by dot product), excluding itself."""
    with torch.no_grad():
        dots = x @ candidates.t()
        dots[torch.arange(x.shape[0], device=x.device), self_index] = -1.0
        nn_index = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(x, candidates[nn_index], p=2, eps=eps)
    return -torch.log(dist_nn + eps)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo on a batch [B, D]: L2-normalise, nearest neighbour by max dot product, -mean log distance."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        return _nn_log_distance(x, x, torch.arange(x.shape[0], device=x.device), eps).mean()


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor (works on gloo too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch], None


def koleo_loss_distributed(
    x: torch.Tensor, group=None, group_size: int | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """KoLeo whose neighbours are searched among `group_size` consecutive samples of the gathered batch.

    The features of all ranks of `group` are gathered (differentiably) in rank order; the loss group of
    this rank is the block of `group_size` samples holding its rows (default: the whole gathered batch;
    it must be a multiple of the local batch and divide the gathered batch). Returns the mean over this
    rank's rows, so the average over ranks equals `koleo_loss` on each loss group when sizes are equal.
    Unlike the official, the gather is over `group`, not the world, so it is right inside a subgroup.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return koleo_loss(x, eps)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    b = x.shape[0]
    total = world * b
    group_size = total if group_size is None else int(group_size)
    if group_size <= 0 or group_size % b or total % group_size:
        raise DinodistError(
            f"koleo group_size {group_size} must be a multiple of the local batch {b} and divide {total}"
        )
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        gathered = _AllGather.apply(x, group) if world > 1 else x
        start = (rank * b) // group_size * group_size
        candidates = gathered[start : start + group_size]
        self_index = torch.arange(rank * b - start, rank * b - start + b, device=x.device)
        # This rank's rows are read back from the gathered tensor, so all gradient flows through one path.
        own = candidates[self_index]
        return _nn_log_distance(own, candidates, self_index, eps).mean()
