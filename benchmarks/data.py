"""Multi-crop throughput per core: batched `make_crops` vs a per-crop, per-op loop, side by side;
then BatchLoader batches/s with the in-process thread path (workers 0) vs worker processes.

Both crop paths draw the same parameters and do the same crop+resize; the baseline then runs every
photometric op and the normalisation on one crop at a time, the batched path on all crops of a size
at once. Images are decoded before timing (the loader caches them), so this measures augmentation.

The loader table times `get(t)` over consecutive iterations after a warm-up that starts the workers
and fills every process's image cache, so it measures steady-state batch building (no training step
runs in between). Every process uses one intra-op thread: workers N may use N cores, workers 0 one.
"rank CPU" is the CPU time the rank's own process spends per batch: what workers take off the
process that feeds the GPU, and a figure that other load on the machine barely moves.

    python benchmarks/data.py [--source skimage] [--batch 8] [--repeats 7] [--workers 2] [--iterations 24]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinodist.core.data.augment import CropConfig, _resize_box, distort, draw_params, make_crops, normalize
from dinodist.core.data.loader import BatchLoader
from dinodist.core.data.sources import build_source


def per_crop_loop(images, ids, seeds, cfg: CropConfig) -> dict[str, torch.Tensor]:
    """The unbatched baseline: one crop at a time through every step."""
    glob, loc = [], []
    for img, sid, sd in zip(images, ids, seeds):
        h, w = img.shape[1:]
        for c in range(2 + cfg.n_local):
            p = draw_params(h, w, sid, sd, c, cfg)
            size = cfg.global_size if c < 2 else cfg.local_size
            x = _resize_box(img, p.box, p.flip, size).unsqueeze(0)
            x = normalize(distort(x, [p], cfg.solarize_threshold), cfg)[0]
            (glob if c < 2 else loc).append(x)
    b = len(images)
    return {
        "global": torch.stack(glob).view(b, 2, 3, cfg.global_size, cfg.global_size),
        "local": torch.stack(loc).view(b, cfg.n_local, 3, cfg.local_size, cfg.local_size),
    }


def resize_only(images, ids, seeds, cfg: CropConfig) -> None:
    for img, sid, sd in zip(images, ids, seeds):
        h, w = img.shape[1:]
        for c in range(2 + cfg.n_local):
            p = draw_params(h, w, sid, sd, c, cfg)
            _resize_box(img, p.box, p.flip, cfg.global_size if c < 2 else cfg.local_size)


def _time_interleaved(fns: list, repeats: int) -> list[float]:
    """Median seconds of each fn, run in rotation so load changes on a shared machine hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def loader_rate(src, cfg: CropConfig, batch: int, workers: int, warm: int,
                iterations: int) -> tuple[float, float, dict]:
    """Over `iterations` iterations after `warm` untimed ones: batches/s of `BatchLoader.get`, CPU
    seconds per batch spent by this process (the rank, all its threads), and the last batch."""
    loader = BatchLoader(src, cfg, batch, seed=0, rows=slice(0, batch), patch_size=16, workers=workers)
    try:
        for t in range(warm):
            loader.get(t)
        t0, c0 = time.perf_counter(), time.process_time()
        for t in range(warm, warm + iterations):
            last = loader.get(t)
        return iterations / (time.perf_counter() - t0), (time.process_time() - c0) / iterations, last
    finally:
        loader.close()


def _same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="skimage")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2, help="loader processes compared with workers 0")
    parser.add_argument("--iterations", type=int, default=24, help="timed loader iterations")
    args = parser.parse_args()
    torch.set_num_threads(1)  # "per core"
    src = build_source(args.source)
    images = [src.load(i % len(src)) for i in range(args.batch)]
    ids = list(range(args.batch))
    seeds = [1000 + i for i in ids]
    mean_h = sum(i.shape[1] for i in images) / len(images)
    mean_w = sum(i.shape[2] for i in images) / len(images)
    print(f"source {args.source}: {args.batch} images, mean size {mean_h:.0f}x{mean_w:.0f}")
    print(f"{'sizes (global/local x n)':<26}{'batched crops/s':>16}{'loop crops/s':>14}{'speedup':>9}"
          f"{'resize share':>14}")
    for g, loc, n in ((224, 96, 8), (64, 32, 4)):
        cfg = CropConfig(global_size=g, local_size=loc, n_local=n)
        batched = make_crops(images, ids, seeds, cfg)
        looped = per_crop_loop(images, ids, seeds, cfg)
        same = all(torch.allclose(batched[k], looped[k], atol=1e-4) for k in looped)
        t_batch, t_loop, t_resize = _time_interleaved(
            [
                lambda cfg=cfg: make_crops(images, ids, seeds, cfg),
                lambda cfg=cfg: per_crop_loop(images, ids, seeds, cfg),
                lambda cfg=cfg: resize_only(images, ids, seeds, cfg),
            ],
            args.repeats,
        )
        crops = args.batch * (2 + n)
        print(
            f"{f'{g}/{loc} x {n}':<26}{crops / t_batch:>16.1f}{crops / t_loop:>14.1f}"
            f"{t_loop / t_batch:>8.2f}x{t_resize / t_batch:>13.0%}  (outputs equal: {same})"
        )
    w = args.workers
    print(f"\nBatchLoader, {args.batch} images per batch, {args.iterations} iterations after warm-up")
    print(f"{'sizes (global/local x n)':<26}{'workers 0 b/s':>15}{f'workers {w} b/s':>15}{'speedup':>9}"
          f"{'rank CPU ms/b 0':>17}{f'rank CPU ms/b {w}':>17}{'float MB':>10}{'uint8 MB':>10}")
    # each image in each process's cache: three epochs (len/batch iterations each) per worker
    warm = max(1, w) * (3 * -(-len(src) // args.batch) + 1)
    for g, loc, n in ((224, 96, 8), (64, 32, 4)):
        cfg = CropConfig(global_size=g, local_size=loc, n_local=n)
        r0, c0, b0 = loader_rate(src, cfg, args.batch, 0, warm, args.iterations)
        rw, cw, bw = loader_rate(src, cfg, args.batch, w, warm, args.iterations)
        crop_bytes = args.batch * (2 * g * g + n * loc * loc) * 3
        same = _same_batch(b0, bw)
        print(f"{f'{g}/{loc} x {n}':<26}{r0:>15.2f}{rw:>15.2f}{rw / r0:>8.2f}x"
              f"{c0 * 1e3:>17.1f}{cw * 1e3:>17.1f}"
              f"{crop_bytes * 4 / 1e6:>10.2f}{crop_bytes / 1e6:>10.2f}  (batches equal: {same})")


if __name__ == "__main__":
    main()
