"""Linear probe: a single linear layer trained on frozen, standardised features.

Mini-batch AdamW with a cosine lr and a fixed seed, so the probe's accuracy depends only on the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 30,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Train on (train_feats, train_labels), return top-1 accuracy on the test set."""
    x = train_feats.float()
    # Standardising with training statistics makes one lr work across backbones of any width and scale.
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_feats.float() - mean) / std
    y = train_labels.long()
    n_cls = int(max(y.max().item(), test_labels.max().item()) + 1)
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], n_cls)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-x.shape[0] // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(layer(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (layer(xt).argmax(1) == test_labels.long()).float().mean().item()
