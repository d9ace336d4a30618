"""Deterministic global-batch sampling: which samples, and with which per-sample seed, at iteration t.

Every group (teacher, each student, a replay of the target store) calls `global_batch` with the same
arguments and gets the same ids and seeds, without talking to anyone. Everything random downstream
(crops, masks) is derived from `(sample_id, sample_seed)` with `derive_seed`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from dinodist.core.errors import DinodistError

_MASK63 = (1 << 63) - 1
_INT63 = np.uint64(_MASK63)
_M64 = (1 << 64) - 1
# SplitMix64's constants: the increment and the two multipliers, shared by the numpy and the int version
_GAMMA, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_TAG_PERMUTATION = 0x7065726D  # keeps the epoch permutation stream apart from the per-sample seeds


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # SplitMix64 finaliser: a bijective, well-mixed 64-bit hash that numpy evaluates vectorised.
    z = z + np.uint64(_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL2)
    return z ^ (z >> np.uint64(31))


def hash_ints(*parts) -> np.ndarray:
    """Hash a sequence of ints (or broadcastable int arrays) into int63 values (numpy int64 array).

    Negative ints are taken modulo 2**64, so any int64 is a valid part.
    """
    with np.errstate(over="ignore"):
        h = _splitmix64(np.zeros(1, dtype=np.uint64))
        for part in parts:
            arr = np.atleast_1d(np.asarray(part, dtype=np.int64)).view(np.uint64)
            h = _splitmix64(h ^ arr)
    return (h & _INT63).astype(np.int64)


def _splitmix64_int(z: int) -> int:
    # `_splitmix64` on one Python int: derive_seed is ~15x cheaper this way than with numpy on
    # 1-element arrays, and it runs several times per crop (~40 % of a batch's build on 28 px images)
    z = (z + _GAMMA) & _M64
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


_H0 = _splitmix64_int(0)


def derive_seed(*parts: int) -> int:
    """One int63 seed from a tuple of ints, e.g. `(sample_id, sample_seed, crop_index)`: the value of
    `hash_ints(*parts)[0]`, computed on Python ints."""
    h = _H0
    for part in parts:
        part = int(part)
        if not -(1 << 63) <= part < 1 << 63:
            raise OverflowError(f"derive_seed: {part} is outside int64")
        h = _splitmix64_int(h ^ (part & _M64))
    return h & _MASK63


@lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, _TAG_PERMUTATION))
    return torch.randperm(num_samples, generator=gen)


def global_batch(
    iteration: int, global_batch_size: int, num_samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ids and per-sample seeds of the global batch at `iteration`.

    Global position `p = iteration * global_batch_size + j` reads entry `p % num_samples` of the
    permutation of epoch `p // num_samples`, so each id appears exactly once per epoch (a batch may
    straddle two epochs). The seed of position j is a hash of `(seed, iteration, j)`: the same
    sample drawn in two epochs gets different crops.
    """
    if global_batch_size <= 0:
        raise DinodistError(f"global_batch_size must be positive, got {global_batch_size}")
    if num_samples <= 0:
        raise DinodistError(f"num_samples must be positive (empty data source?), got {num_samples}")
    if iteration < 0:
        raise DinodistError(f"iteration must be >= 0, got {iteration}")
    positions = torch.arange(global_batch_size, dtype=torch.long) + iteration * global_batch_size
    epochs = positions // num_samples
    offsets = positions % num_samples
    ids = torch.empty(global_batch_size, dtype=torch.long)
    for epoch in torch.unique(epochs).tolist():
        sel = epochs == epoch
        ids[sel] = _epoch_permutation(num_samples, seed, epoch)[offsets[sel]]
    seeds = torch.from_numpy(hash_ints(seed, iteration, np.arange(global_batch_size, dtype=np.int64)))
    return ids, seeds
