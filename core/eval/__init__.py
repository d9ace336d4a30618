"""Frozen-feature evaluation: k-NN (core.eval.knn) and linear probe (core.eval.linear).

`extract_features` turns an image source into (CLS features, labels) with the eval preprocessing: a plain
resize of the whole image to `image_size` (bicubic, antialiased) and ImageNet normalisation, no crops, so
the numbers depend only on the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinodist.core.errors import DinodistError
from dinodist.core.eval.knn import knn_accuracy, knn_predict
from dinodist.core.eval.linear import linear_probe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES = ("cls", "avgpool", "cls+avgpool")

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "linear_probe", "preprocess"]


def preprocess(images: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """uint8 [3,H,W] images of any sizes -> float [B,3,S,S] normalised."""
    if len({tuple(img.shape) for img in images}) == 1:
        groups = [torch.stack(images)]  # same-size images (e.g. Fashion-MNIST): one resize call per batch
    else:
        groups = [img.unsqueeze(0) for img in images]
    out = []
    for img in groups:
        x = img.float() / 255.0
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(
                x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False
            )
        out.append(x)
    x = torch.cat(out).clamp_(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract_features(
    model: nn.Module,
    source,
    image_size: int,
    batch_size: int = 256,
    limit: int | None = None,
    features: str = "cls",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels [N] of the first `limit` images of `source`, model in eval mode.

    features: "cls" = model(x), the normed CLS token [N,D] (DINO's k-NN protocol); "avgpool" = mean of the
    normed patch tokens [N,D]; "cls+avgpool" = both concatenated [N,2D] (DINOv2's linear protocol). A
    freshly initialised DINOv3 backbone has LayerScale 1e-5, so its CLS token hardly depends on the image:
    compare random-init baselines on "avgpool" as well.
    """
    if features not in FEATURES:
        raise DinodistError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise DinodistError(f"{getattr(source, 'name', 'source')}: no images to evaluate")
    if source.label(0) is None:
        raise DinodistError(f"{getattr(source, 'name', 'source')}: has no labels; k-NN/linear need labels")
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for start in range(0, n, batch_size):
        ids = range(start, min(start + batch_size, n))
        x = preprocess([source.load(i) for i in ids], image_size)
        if features == "cls":
            feats.append(model(x).float())
        else:
            out = model.forward_features(x)
            pooled = out["x_norm_patchtokens"].mean(dim=1)
            both = [out["x_norm_clstoken"], pooled] if features == "cls+avgpool" else [pooled]
            feats.append(torch.cat(both, dim=1).float())
        labels.extend(source.label(i) for i in ids)
    model.train(was_training)
    return torch.cat(feats), torch.tensor(labels, dtype=torch.long)
