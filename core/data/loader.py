"""Per-rank batch loader: the rows of the global batch this rank owns, augmented, masked, collated.

A rank asks for iteration t; the loader has usually built it already in a background thread (the next
`prefetch` iterations are always queued). Decoded images are kept in an LRU cache bounded in bytes, so
small sources are decoded once and decode stays off the hot path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dinodist.core.data.augment import CropConfig, make_crops
from dinodist.core.data.collate import collate
from dinodist.core.data.masking import sample_masks
from dinodist.core.data.sampler import global_batch
from dinodist.core.data.sources import ImageSource
from dinodist.core.errors import DinodistError


class ImageCache:
    """Thread-safe LRU of decoded uint8 images, capped in bytes."""

    def __init__(self, source: ImageSource, max_bytes: int):
        self.source = source
        self.max_bytes = max_bytes
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, i: int) -> torch.Tensor:
        with self._lock:
            img = self._items.get(i)
            if img is not None:
                self._items.move_to_end(i)
                self.hits += 1
                return img
            self.misses += 1
        img = self.source.load(i)  # decode outside the lock: other threads keep going
        size = img.numel() * img.element_size()
        if size > self.max_bytes:
            return img
        with self._lock:
            if i not in self._items:
                self._items[i] = img
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return img


class BatchLoader:
    """Collated batches for `rows` of each global batch; `get(iteration)` prefetches the next ones.

    The batch dict is `collate(...)` plus `sample_ids`, `seeds` (the rows' entries of `global_batch`),
    `labels` (long, -1 where unknown; only when the source has labels) and `global_batch_size`.
    """

    def __init__(
        self,
        source: ImageSource,
        cfg: CropConfig,
        global_batch_size: int,
        seed: int,
        rows: slice,
        patch_size: int,
        mask_prob: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        prefetch: int = 2,
        workers: int = 1,
        cache_bytes: int = 1 << 30,
    ):
        self.source = source
        self.cfg = cfg.validate()
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        start, stop, step = rows.indices(self.global_batch_size)
        if step != 1 or stop <= start:
            raise DinodistError(
                f"loader rows {rows} select no contiguous rows of a global batch of {global_batch_size}"
            )
        self.rows = slice(start, stop)
        if patch_size <= 0 or cfg.global_size % patch_size:
            raise DinodistError(
                f"crops.global_size {cfg.global_size} is not a multiple of patch_size {patch_size}"
            )
        self.grid = (cfg.global_size // patch_size, cfg.global_size // patch_size)
        self.mask_prob = mask_prob
        self.mask_ratio = tuple(mask_ratio)
        if prefetch < 0 or workers < 1:
            raise DinodistError(f"loader prefetch must be >= 0 and workers >= 1, got {prefetch}, {workers}")
        self.prefetch = prefetch
        self.cache = ImageCache(source, cache_bytes)
        self._num_samples = len(source)
        self._has_labels = source.label(0) is not None if self._num_samples else False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dinodist-data")
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._closed = False

    def build(self, iteration: int) -> dict:
        """Build the batch of `iteration` synchronously (what the background threads run)."""
        ids, seeds = global_batch(iteration, self.global_batch_size, self._num_samples, self.seed)
        ids, seeds = ids[self.rows], seeds[self.rows]
        images = [self.cache.get(i) for i in ids.tolist()]
        crops = make_crops(images, ids, seeds, self.cfg)
        masks = sample_masks(ids, seeds, self.grid, self.mask_prob, self.mask_ratio)
        batch = collate(crops, masks)
        batch["sample_ids"] = ids
        batch["seeds"] = seeds
        batch["global_batch_size"] = self.global_batch_size
        if self._has_labels:
            labels = [self.source.label(i) for i in ids.tolist()]
            batch["labels"] = torch.tensor([-1 if v is None else v for v in labels], dtype=torch.long)
        return batch

    def _submit(self, iteration: int) -> Future:
        fut = self._futures.get(iteration)
        if fut is None:
            fut = self._pool.submit(self.build, iteration)
            self._futures[iteration] = fut
        return fut

    def get(self, iteration: int) -> dict:
        """The batch of `iteration`; queues iterations+1..+prefetch in the background.

        An error building it (e.g. the source's DinodistError for an unreadable file) is raised here
        as it was raised, also when a background thread hit it.
        """
        if self._closed:
            raise DinodistError("BatchLoader.get called after close()")
        with self._lock:
            fut = self._futures.pop(iteration, None)
            for it in [k for k in self._futures if k < iteration or k > iteration + self.prefetch]:
                self._futures.pop(it).cancel()  # a jump (resume, replay) drops stale work
            for it in range(iteration + 1, iteration + 1 + self.prefetch):
                self._submit(it)
        return fut.result() if fut is not None else self.build(iteration)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for fut in self._futures.values():
                fut.cancel()
            self._futures.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
