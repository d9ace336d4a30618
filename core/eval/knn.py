"""Weighted k-NN classification on frozen features, as in DINO's evaluation.

Features are L2-normalised; each test sample takes its k nearest training samples by cosine similarity and
every neighbour votes for its label with weight exp(similarity / T) (k=20, T=0.07 by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels [M] for test features [M,D] given training features [N,D] and labels [N]."""
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long()
    n_cls = int(num_classes if num_classes is not None else labels.max().item() + 1)
    k = min(k, train.shape[0])
    preds = []
    # Chunks bound the [chunk, N] similarity matrix: 60k training features stay well under a GiB.
    for start in range(0, test_feats.shape[0], chunk):
        test = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(test.shape[0], n_cls).scatter_add_(1, labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    n_cls = int(max(train_labels.max().item(), test_labels.max().item()) + 1)
    preds = knn_predict(train_feats, train_labels, test_feats, k, temperature, n_cls)
    return (preds == test_labels.long()).float().mean().item()
