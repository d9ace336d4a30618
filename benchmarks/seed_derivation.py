"""Batch building with per-crop seeds hashed on Python ints (now) vs one numpy call per seed (before).

Every crop and every mask draws its randomness from `derive_seed(sample_id, sample_seed, crop, ...)`.
On small images (Fashion-MNIST's 28 px at 32 px crops, the distillation-quality benchmark's data), a
numpy call on a 1-element array per seed was about 40 % of a batch's build time, and in a
distillation the teacher and every student build the same batch. Both ways are timed in rotation in one
run, on the same loader, and must build identical batches.

    python benchmarks/seed_derivation.py [--source fashion-mnist:/usr/share/datasets/fashion-mnist:train]
        [--batch 64] [--size 32] [--batches 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from dinodist.core.data import augment, masking
from dinodist.core.data.augment import CropConfig
from dinodist.core.data.loader import BatchLoader
from dinodist.core.data.sampler import hash_ints
from dinodist.core.data.sources import build_source


def numpy_derive_seed(*parts: int) -> int:
    """The previous `derive_seed`: `hash_ints` on a 1-element numpy array per call."""
    return int(hash_ints(*parts)[0])


@contextmanager
def numpy_seeds():
    """Builds batches with `numpy_derive_seed` in the two modules that draw per-crop randomness."""
    saved = augment.derive_seed, masking.derive_seed
    augment.derive_seed = masking.derive_seed = numpy_derive_seed
    try:
        yield
    finally:
        augment.derive_seed, masking.derive_seed = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="fashion-mnist:/usr/share/datasets/fashion-mnist:train")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32,
                    help="global crop size (no local crops, as cpu-fashion.yaml)")
    ap.add_argument("--batches", type=int, default=20, help="batches built per timing")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = CropConfig(global_size=a.size, local_size=a.size // 2, n_local=0)
    loader = BatchLoader(build_source(a.source), cfg, a.batch, 0, slice(0, a.batch), 8)
    try:
        with numpy_seeds():
            before = loader.build(0)
        now = loader.build(0)
        for key in ("collated_global_crops", "collated_masks"):
            assert torch.equal(before[key], now[key]), f"{key} differs between the two seed paths"
        for it in range(1, a.batches + 1):  # every image decoded and cached before timing
            loader.build(it)

        def build_all() -> None:
            for it in range(1, a.batches + 1):
                loader.build(it)

        def build_all_numpy() -> None:
            with numpy_seeds():
                build_all()

        times: dict[str, list[float]] = {"numpy per seed (before)": [], "python ints (now)": []}
        for _ in range(a.repeats):
            for name, fn in zip(times, (build_all_numpy, build_all)):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) / a.batches)
    finally:
        loader.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"source {a.source}, batch {a.batch}, {a.size} px global crops x 2, masks on; "
          f"median of {a.repeats} x {a.batches} batches, 1 thread; identical batches: yes")
    print("| seeds | ms per batch |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} |")
    before_s, now_s = med.values()
    print(f"speed-up: {before_s / now_s:.2f}x")


if __name__ == "__main__":
    main()
