"""k-NN and linear-probe evaluation on frozen features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinodist.core.errors import DinodistError
from dinodist.core.eval import extract_features, knn_accuracy, knn_predict, linear_probe, preprocess


def clusters(n_per_class: int, n_cls: int = 4, dim: int = 16, noise: float = 0.3, seed: int = 0):
    # fixed centers (one task); `seed` only draws the samples (train vs test split)
    centers = F.normalize(torch.randn(n_cls, dim, generator=torch.Generator().manual_seed(99)), dim=1) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_cls).repeat_interleave(n_per_class)
    x = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return x, labels


def test_knn_separable_clusters_high_accuracy():
    xtr, ytr = clusters(50, seed=0)
    xte, yte = clusters(20, seed=1)
    assert knn_accuracy(xtr, ytr, xte, yte) >= 0.95
    # chance level on shuffled labels: the accuracy comes from the features, not from the vote rule
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
    assert knn_accuracy(xtr, ytr[perm], xte, yte) < 0.6


def test_knn_matches_bruteforce_loop():
    g = torch.Generator().manual_seed(3)
    xtr, ytr = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    xte = torch.randn(15, 8, generator=g)
    fast = knn_predict(xtr, ytr, xte, k=5, temperature=0.1, num_classes=3, chunk=4)
    a, b = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    for i in range(len(xte)):
        sims = [(float(b[i] @ a[j]), j) for j in range(len(a))]
        top = sorted(sims, reverse=True)[:5]
        votes = [0.0, 0.0, 0.0]
        for s, j in top:
            votes[int(ytr[j])] += torch.exp(torch.tensor(s / 0.1)).item()
        assert int(fast[i]) == max(range(3), key=lambda c: votes[c])


def test_knn_temperature_weighting():
    # two far neighbours of class 0 against one very close neighbour of class 1
    train = torch.tensor([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, test, k=3, temperature=0.07).item() == 1  # sharp weights: closest wins
    assert knn_predict(train, labels, test, k=3, temperature=100.0).item() == 0  # flat weights: majority


def test_linear_probe_separable():
    xtr, ytr = clusters(60, seed=0, noise=0.5)
    xte, yte = clusters(20, seed=1, noise=0.5)
    assert linear_probe(xtr, ytr, xte, yte, epochs=20) >= 0.95
    assert linear_probe(xtr, ytr, xte, yte, epochs=20) == linear_probe(xtr, ytr, xte, yte, epochs=20)


class _Source:
    name = "fake"

    def __init__(self, n: int, labelled: bool = True):
        self.n, self.labelled = n, labelled

    def __len__(self):
        return self.n

    def load(self, i):
        return torch.full((3, 10 + i, 12), 20 * i, dtype=torch.uint8)

    def label(self, i):
        return i % 2 if self.labelled else None


def test_extract_features_batches_and_preprocess():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    feats, labels = extract_features(model, _Source(5), image_size=8, batch_size=2)
    assert feats.shape == (5, 5) and labels.tolist() == [0, 1, 0, 1, 0]
    one = model(preprocess([_Source(5).load(3)], 8))
    torch.testing.assert_close(feats[3:4], one)
    x = preprocess([torch.full((3, 4, 4), 255, dtype=torch.uint8)], 4)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]))
    assert extract_features(model, _Source(5), 8, limit=3)[0].shape[0] == 3
    with pytest.raises(DinodistError, match="no labels"):
        extract_features(model, _Source(3, labelled=False), 8)


def test_feature_kinds_on_a_backbone():
    from dinodist.core.models import build_backbone

    model = build_backbone("tiny-vits", depth=1, embed_dim=24)
    cls, _ = extract_features(model, _Source(3), 16, features="cls")
    avg, _ = extract_features(model, _Source(3), 16, features="avgpool")
    both, _ = extract_features(model, _Source(3), 16, features="cls+avgpool")
    torch.testing.assert_close(both, torch.cat([cls, avg], dim=1))
    out = model.forward_features(preprocess([_Source(3).load(1)], 16))
    torch.testing.assert_close(avg[1], out["x_norm_patchtokens"][0].mean(0))
    with pytest.raises(DinodistError, match="features"):
        extract_features(model, _Source(3), 16, features="gap")
