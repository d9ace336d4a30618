"""Pre-norm transformer block with the DINOv3 list forward and sample-subset stochastic depth."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinodist.core.models.checkpointing import run_checkpointed
from dinodist.core.models.layers import LayerScale, SelfAttention, build_ffn, pack, unpack

Rope = tuple[Tensor, Tensor] | None


def subset_size(batch: int, drop_rate: float) -> int:
    """Samples that keep a branch under sample-subset stochastic depth (at least one)."""
    return max(int(batch * (1.0 - drop_rate)), 1)


class Block(nn.Module):
    """x = x + ls1(attn(norm1(x))); x = x + ls2(ffn(norm2(x))).

    `drop_path` is the per-branch drop rate: the official backbone uses the same rate in every block
    (no linear schedule over depth), and so does `DinoVisionTransformer`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_layer: str,
        ffn_hidden: int,
        qkv_bias: bool,
        layerscale_init: float,
        norm_eps: float,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = build_ffn(ffn_layer, dim, ffn_hidden)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path = drop_path
        # "none" | "full" | "selective": set by core.models.checkpointing.apply_activation_checkpointing
        self.checkpointing = "none"

    def forward(self, x: Tensor | list[Tensor], rope: Rope | list[Rope] = None) -> Tensor | list[Tensor]:
        if isinstance(x, Tensor):
            return self.forward_list([x], [rope])[0]
        ropes = rope if rope is not None else [None] * len(x)
        return self.forward_list(x, ropes)

    def forward_list(self, xs: list[Tensor], ropes: list[Rope]) -> list[Tensor]:
        if self.checkpointing != "none" and torch.is_grad_enabled():
            return run_checkpointed(self._forward_list, self.checkpointing, xs, ropes)
        return self._forward_list(xs, ropes)

    def _forward_list(self, xs: list[Tensor], ropes: list[Rope]) -> list[Tensor]:
        if self.training and self.drop_path > 0.0:
            return self._forward_packed(xs, ropes)
        out = []
        for x, rope in zip(xs, ropes):
            x = x + self.ls1(self.attn(self.norm1(x), rope))
            out.append(x + self.ls2(self.mlp(self.norm2(x))))
        return out

    def _forward_packed(self, xs: list[Tensor], ropes: list[Rope]) -> list[Tensor]:
        # Each list element draws its own kept samples, separately for the two branches; only the
        # kept samples are computed, and their residual is scaled by B/k so its expectation is unchanged.
        # Token-wise ops (norms, qkv/proj, FFN) run once on the concatenation of all elements.
        sizes = [x.shape[0] for x in xs]
        keeps = [subset_size(b, self.drop_path) for b in sizes]

        idx = [torch.randperm(b, device=x.device)[:k] for x, b, k in zip(xs, sizes, keeps)]
        flat, shapes = pack([x[i] for x, i in zip(xs, idx)])
        residuals = self.attn.forward_list(unpack(self.norm1(flat), shapes), ropes)
        xs = [
            torch.index_add(x, 0, i, self.ls1(r).to(x.dtype), alpha=b / k)
            for x, r, i, b, k in zip(xs, residuals, idx, sizes, keeps)
        ]

        idx = [torch.randperm(b, device=x.device)[:k] for x, b, k in zip(xs, sizes, keeps)]
        flat, shapes = pack([x[i] for x, i in zip(xs, idx)])
        residuals = unpack(self.mlp(self.norm2(flat)), shapes)
        return [
            torch.index_add(x, 0, i, self.ls2(r).to(x.dtype), alpha=b / k)
            for x, r, i, b, k in zip(xs, residuals, idx, sizes, keeps)
        ]
