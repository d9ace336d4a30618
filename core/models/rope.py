"""Axial 2-D rotary position embedding (DINOv3 `RopePositionEmbedding`).

RoPE has no learnable weights; only `periods` is kept, as a persistent buffer, because official
checkpoints carry it. Sin/cos are recomputed on every call so that, while training, each call
(i.e. each block and each crop size) draws its own coordinate augmentation.

Rope dtype (`rope_dtype`): the rotation runs in the dtype of sin/cos, as the official `apply_rope`
casts q and k to the rope's dtype. fp32 (the default) is the released backbones' and the 7B's; the
official distilled students train with rope dtype bf16 (`student_rope_dtype`), which on a GPU
saves two fp32 copies of q and k per block. Unlike the official, whose bf16 rope also computes the
coordinates and angles in bf16, the angles and sin/cos are computed in fp32 and rounded once: the
same bf16 operands up to that rounding, and no bf16 error in angles of up to 4 pi.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def rope_periods(head_dim: int, base: float, device=None) -> Tensor:
    """periods[j] = base ** (4j / head_dim), j < head_dim / 4 (computed in fp32, as the official init)."""
    exponents = 2 * torch.arange(head_dim // 4, device=device, dtype=torch.float32) / (head_dim // 2)
    return base**exponents


class RopePositionEmbedding(nn.Module):
    """Produces (sin, cos), each [H*W, head_dim], for a patch grid of H rows and W columns."""

    def __init__(
        self,
        head_dim: int,
        base: float = 100.0,
        rescale_coords: float | None = None,
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rope_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim {head_dim} must be a multiple of 4 for axial RoPE")
        self.head_dim = head_dim
        self.base = base
        self.rescale_coords = rescale_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rope_dtype = rope_dtype  # of the returned sin/cos, hence of the rotation; None: fp32
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        if self.periods.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.periods.copy_(rope_periods(self.head_dim, self.base, device=self.periods.device))

    def coords(self, H: int, W: int) -> Tensor:
        """Patch-centre coordinates in (-1, 1), [H*W, 2] as (y, x), row-major; augmented when training."""
        device = self.periods.device
        # "separate" normalisation: each axis is divided by its own length, so any aspect ratio maps
        # onto the same (-1, 1) square.
        ys = torch.arange(0.5, H, device=device, dtype=torch.float32) / H
        xs = torch.arange(0.5, W, device=device, dtype=torch.float32) / W
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training:
            if self.shift_coords is not None:
                shift = torch.empty(2, device=device).uniform_(-self.shift_coords, self.shift_coords)
                coords = coords + shift[None, :]
            if self.jitter_coords is not None:
                lim = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, device=device).uniform_(-lim, lim).exp()[None, :]
            if self.rescale_coords is not None:
                lim = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, device=device).uniform_(-lim, lim).exp()
        return coords

    def angles(self, H: int, W: int) -> Tensor:
        """Rotation angles [H*W, head_dim]: all y-frequencies, then all x-frequencies, tiled twice."""
        coords = self.coords(H, W)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]
        angles = angles.flatten(1, 2)
        return angles.tile(2)

    def forward(self, H: int, W: int) -> tuple[Tensor, Tensor]:
        angles = self.angles(H, W)
        sin, cos = torch.sin(angles), torch.cos(angles)
        if self.rope_dtype is not None and self.rope_dtype != torch.float32:
            return sin.to(self.rope_dtype), cos.to(self.rope_dtype)
        return sin, cos


def student_rope_dtype(device: torch.device | str) -> torch.dtype | None:
    """The rope dtype a distilled student trains with on `device`: bf16 on CUDA (the official distilled
    students'), None (fp32, every result as before) elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def set_rope_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Set the rope dtype of every RopePositionEmbedding in `model` (None: fp32); returns `model`."""
    for m in model.modules():
        if isinstance(m, RopePositionEmbedding):
            m.rope_dtype = dtype
    return model


def rotate_half(x: Tensor) -> Tensor:
    # Half-split pairing: dimension i rotates with i + head_dim/2 (matches the tiled angle layout).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


def apply_rope_qk(q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Rotate the patch tokens of q, k [B, heads, N, hd]; the leading cls/register tokens stay as they are.

    The rotation runs in the rope dtype, sin's: fp32 (the released models') unless the embedding was
    given a 16-bit `rope_dtype`; the result is cast back to q's dtype.
    """
    sin, cos = rope
    n_patches = sin.shape[-2]
    prefix = q.shape[-2] - n_patches
    dtype = q.dtype
    rope_dtype = sin.dtype if sin.dtype in (torch.bfloat16, torch.float16) else torch.float32
    sin, cos = sin.to(rope_dtype), cos.to(rope_dtype)
    q_rot = rope_apply(q[:, :, prefix:].to(rope_dtype), sin, cos).to(dtype)
    k_rot = rope_apply(k[:, :, prefix:].to(rope_dtype), sin, cos).to(dtype)
    q = torch.cat((q[:, :, :prefix], q_rot), dim=-2)
    k = torch.cat((k[:, :, :prefix], k_rot), dim=-2)
    return q, k
