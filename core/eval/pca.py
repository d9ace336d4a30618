"""Patch-feature pictures: PCA of patch tokens as RGB, and cosine-similarity maps (`dinodist viz`).

Everything here is plain tensor math on the normed patch tokens (`x_norm_patchtokens`) of a backbone in
eval mode; the drawing lives in the driver (orchestrator/viz.py), which receives numpy arrays.

Conventions:
- feature grids are [B, h, w, D] with h = H / patch, w = W / patch (row-major, as the tokens come out);
- PCA is fitted over every patch of every image given for one model, so the colours of one row of the
  picture are comparable across its images (not across models: each model has its own basis);
- a principal direction's sign is arbitrary; it is fixed so that its largest-magnitude loading is
  positive, so the same features always give the same colours.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dinodist.core.data.sources import pil_to_uint8_chw
from dinodist.core.errors import DinodistError, first_line
from dinodist.core.eval import IMAGENET_MEAN, IMAGENET_STD, preprocess

# Robust min-max: a few extreme patches (often the image border or a register-like outlier token)
# would otherwise squash every other patch into one flat colour.
LOW_QUANTILE = 0.01
HIGH_QUANTILE = 0.99


def read_image(path: str | os.PathLike) -> Tensor:
    """uint8 [3, H, W] RGB of an image file; a missing or undecodable file is a one-line error naming it."""
    p = Path(path)
    if not p.is_file():
        raise DinodistError(f"image {p}: no such file")
    try:
        with Image.open(p) as img:
            img.load()  # decode now: a truncated file fails here, inside the try
            return pil_to_uint8_chw(img)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DinodistError(f"image {p}: cannot read it ({first_line(exc)})") from None


def to_display(x: Tensor) -> np.ndarray:
    """Preprocessed (normalised) images [B, 3, S, S] back to uint8 [B, S, S, 3]: what the model saw."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (x.float() * std + mean).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def patch_features(model: nn.Module, x: Tensor, batch_size: int = 16) -> Tensor:
    """Normed patch tokens of preprocessed images [B, 3, H, W] as a float grid [B, H/p, W/p, D]."""
    p = model.patch_size
    if x.shape[-2] % p or x.shape[-1] % p:
        raise DinodistError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
    h, w = x.shape[-2] // p, x.shape[-1] // p
    was_training = model.training
    model.eval()
    try:
        out = [model.forward_features(x[i:i + batch_size])["x_norm_patchtokens"].float()
               for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    tokens = torch.cat(out)
    return tokens.reshape(x.shape[0], h, w, tokens.shape[-1])


def pca_basis(x: Tensor, k: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [D], components [k', D] orthonormal rows, explained variance [k']) of samples x [N, D].

    k' = min(k, N, D). Computed in float64: the features of a random-init backbone are nearly collinear
    and float32 SVD then returns visibly non-orthogonal directions.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise DinodistError(f"pca: expected a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    xd = x.double()
    mean = xd.mean(dim=0)
    _, s, vh = torch.linalg.svd(xd - mean, full_matrices=False)
    k = min(k, vh.shape[0])
    comps = vh[:k]
    # the largest-magnitude loading of each direction positive: a deterministic sign
    idx = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(k), idx])
    signs[signs == 0] = 1
    comps = comps * signs[:, None]
    var = s[:k] ** 2 / max(x.shape[0] - 1, 1)
    return mean.float(), comps.float(), var.float()


def robust_unit(v: Tensor, low: float = LOW_QUANTILE, high: float = HIGH_QUANTILE) -> Tensor:
    """Each column of v [N, C] mapped to [0, 1] between its `low` and `high` quantiles (clamped outside).

    A constant column (nothing to show) becomes 0.5 rather than dividing by zero.
    """
    lo = torch.quantile(v, low, dim=0)
    hi = torch.quantile(v, high, dim=0)
    span = hi - lo
    flat = span <= 1e-12 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    out = (v - lo) / torch.where(flat, torch.ones_like(span), span)
    out[:, flat] = 0.5
    return out.clamp(0, 1)


def pca_rgb(feats: Tensor, low: float = LOW_QUANTILE, high: float = HIGH_QUANTILE) -> Tensor:
    """Feature grids [B, h, w, D] -> [B, h, w, 3] in [0, 1]: the first three principal components over
    all B*h*w patches, each robustly min-max scaled. Fewer than three components (D or N < 3) leave the
    missing channels at 0."""
    b, h, w, d = feats.shape
    flat = feats.reshape(-1, d).float()
    mean, comps, _ = pca_basis(flat, 3)
    proj = robust_unit((flat - mean) @ comps.T, low, high)
    rgb = torch.zeros(flat.shape[0], 3)
    rgb[:, : proj.shape[1]] = proj
    return rgb.reshape(b, h, w, 3)


def point_to_patch(x: int, y: int, patch_size: int, grid: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the patch holding pixel (x, y) of the resized image."""
    h, w = grid
    return min(y // patch_size, h - 1), min(x // patch_size, w - 1)


def similarity_maps(feats: Tensor, image: int, row: int, col: int) -> Tensor:
    """Cosine similarity [B, h, w] in [-1, 1] of patch (row, col) of image `image` to every patch of every
    image in feats [B, h, w, D]."""
    b, h, w, _ = feats.shape
    if not (0 <= image < b and 0 <= row < h and 0 <= col < w):
        raise DinodistError(f"similarity: patch ({image}, {row}, {col}) is outside the grid {b}x{h}x{w}")
    unit = F.normalize(feats.float(), dim=-1)
    return (unit @ unit[image, row, col]).clamp(-1, 1)


def prepare(images: list[Tensor], image_size: int) -> tuple[Tensor, np.ndarray]:
    """(model input [B, 3, S, S], uint8 display images [B, S, S, 3]) with `dinodist eval`'s resize."""
    x = preprocess(images, image_size)
    return x, to_display(x)
