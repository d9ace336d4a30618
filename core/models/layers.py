"""Backbone building blocks: patch embedding, attention with masked K bias, FFNs, LayerScale.

Module and attribute names follow the official DINOv3 layers so that state-dict keys match.
Token-wise layers accept a flattened token concatenation [T, D] as well as [B, N, D]; the list
forward of `Block` relies on that to run them once over all crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinodist.core.models.rope import apply_rope_qk


class PatchEmbed(nn.Module):
    """Conv patchify to [B, H/p, W/p, D] (no norm, no flattening: the backbone flattens row-major)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        bound = math.sqrt(1.0 / (self.in_chans * self.patch_size**2))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim))
        if self.gamma.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class LinearKMaskedBias(nn.Linear):
    """qkv projection whose bias is multiplied by `bias_mask`, which zeroes the K third.

    The mask is a persistent buffer because released checkpoints contain it (`attn.qkv.bias_mask`).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        if out_features % 3:
            raise ValueError(f"qkv out_features {out_features} must be divisible by 3")
        self.register_buffer("bias_mask", torch.empty(out_features), persistent=True)
        if self.bias_mask.device.type != "meta":
            self.reset_mask()

    def reset_mask(self) -> None:
        o = self.out_features
        with torch.no_grad():
            self.bias_mask.fill_(1.0)
            self.bias_mask[o // 3 : 2 * o // 3].fill_(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = LinearKMaskedBias(dim, 3 * dim) if qkv_bias else nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)

    def attend(self, qkv: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """SDPA on a projected qkv [B, N, 3D] laid out [q|k|v]; returns [B, N, D] before `proj`."""
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope_qk(q, k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.proj(self.attend(self.qkv(x), rope))

    def forward_list(self, xs: list[Tensor], ropes: list[tuple[Tensor, Tensor] | None]) -> list[Tensor]:
        """qkv and proj run once on the token concatenation; attention runs per element (per crop size)."""
        flat, shapes = pack(xs)
        qkvs = unpack(self.qkv(flat), shapes)
        attended = [self.attend(qkv, rope) for qkv, rope in zip(qkvs, ropes)]
        flat, shapes = pack(attended)
        return unpack(self.proj(flat), shapes)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """out = w3(silu(w1 x) * w2 x); `hidden` is already aligned (ArchSpec.ffn_hidden)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def build_ffn(kind: str, dim: int, hidden: int) -> nn.Module:
    if kind == "mlp":
        return Mlp(dim, hidden)
    if kind == "swiglu":
        return SwiGLUFFN(dim, hidden)
    raise ValueError(f"unknown ffn_layer {kind!r}")


def pack(xs: list[Tensor]) -> tuple[Tensor, list[torch.Size]]:
    """Concatenate the tokens of [B_i, N_i, D] tensors into one [sum B_i*N_i, D] tensor."""
    shapes = [x.shape for x in xs]
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], dim=0), shapes


def unpack(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    sizes = [s[0] * s[1] for s in shapes]
    return [t.reshape(s[0], s[1], -1) for t, s in zip(flat.split(sizes, dim=0), shapes)]
