"""Per-rank batch loader: the rows of the global batch this rank owns, augmented, masked, collated.

A rank asks for iteration t; the loader has usually built it already (the next `prefetch` iterations
are always queued). Decoded images are kept in an LRU cache bounded in bytes, so small sources are
decoded once and decode stays off the hot path.

Two ways to build, one result: `workers=0` builds in `threads` background threads of this process;
`workers=N` starts N processes, and process k builds every iteration t with t % N == k (whole
batches: one round trip per batch, the tensors travel through shared memory). A batch is a pure
function of (source, config, t), so it is bit-identical whatever N is. A consumer on CUDA gets
pinned batches (`device=` or `pin_memory=True`; pinned in a background thread) and copies them with
`core.data.device.prepare_batch`.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dinodist.core.data.augment import CropConfig, make_crops
from dinodist.core.data.collate import collate
from dinodist.core.data.device import pin_batch, wants_pinned
from dinodist.core.data.masking import sample_masks
from dinodist.core.data.sampler import global_batch
from dinodist.core.data.sources import ImageSource
from dinodist.core.errors import DinodistError

# How often a reader blocked on a worker's results checks that the worker and the loader are alive.
_POLL_S = 0.2


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


class _Builder:
    """Builds the batch of an iteration in the calling process.

    Picklable: a worker process gets a copy whose image cache starts empty (each process caches what
    it decodes, up to `cache_bytes`).
    """

    def __init__(self, source: ImageSource, cfg: CropConfig, global_batch_size: int, seed: int, rows: slice,
                 grid: tuple[int, int], mask_prob: float, mask_ratio: tuple, cache_bytes: int, uint8: bool):
        self.source = source
        self.cfg = cfg
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rows = rows
        self.grid = grid
        self.mask_prob = mask_prob
        self.mask_ratio = mask_ratio
        self.cache_bytes = cache_bytes
        self.uint8 = uint8
        self.cache = ImageCache(source, cache_bytes)
        self.num_samples = len(source)
        self.has_labels = source.label(0) is not None if self.num_samples else False

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["cache"]  # holds a lock, and a worker's cache is its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cache = ImageCache(self.source, self.cache_bytes)

    def build(self, iteration: int) -> dict:
        ids, seeds = global_batch(iteration, self.global_batch_size, self.num_samples, self.seed)
        ids, seeds = ids[self.rows], seeds[self.rows]
        images = [self.cache.get(i) for i in ids.tolist()]
        crops = make_crops(images, ids, seeds, self.cfg, uint8=self.uint8)
        masks = sample_masks(ids, seeds, self.grid, self.mask_prob, self.mask_ratio)
        batch = collate(crops, masks)
        batch["sample_ids"] = ids
        batch["seeds"] = seeds
        batch["global_batch_size"] = self.global_batch_size
        if self.has_labels:
            labels = [self.source.label(i) for i in ids.tolist()]
            batch["labels"] = torch.tensor([-1 if v is None else v for v in labels], dtype=torch.long)
        if self.uint8:
            batch["crop_mean"] = torch.tensor(self.cfg.mean, dtype=torch.float32)
            batch["crop_std"] = torch.tensor(self.cfg.std, dtype=torch.float32)
        return batch


def _sendable(exc: BaseException, iteration: int) -> BaseException:
    """The worker's exception as the loader should raise it: itself when it survives pickling."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception type that does not round-trip becomes one line
        return DinodistError(f"data worker, iteration {iteration}: {type(exc).__name__}: {exc}")


def _worker_loop(builder: _Builder, tasks, results, parent: int) -> None:
    # A worker never decides when to stop: Ctrl-C and a preemption SIGTERM go to the rank, which still
    # needs batches until it has checkpointed and then closes the loader.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)  # N workers are N cores; intra-op threads would oversubscribe them
    while True:
        try:
            it = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the rank died without closing us (SIGKILL, OOM)
                break
            continue
        if it is None:
            break
        try:
            results.put((it, builder.build(it), None))
        except BaseException as exc:  # noqa: BLE001 - the rank raises it when it asks for this batch
            results.put((it, None, _sendable(exc, it)))
    results.close()
    results.join_thread()
    # Nobody reads from us any more; skipping the interpreter's teardown (a second or more with torch
    # loaded) keeps close() fast.
    os._exit(0)


class _Workers:
    """N worker processes; iteration t goes to process t % N, whose results come back in request order."""

    def __init__(self, builder: _Builder, n: int):
        import torch.multiprocessing as mp  # its queues move tensors through shared memory

        # spawn, not fork: the rank may already hold CUDA state and threads that fork cannot copy
        ctx = mp.get_context("spawn")
        self.n = n
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.results = [ctx.Queue() for _ in range(n)]
        self.locks = [threading.Lock() for _ in range(n)]
        self.stash: list[dict[int, tuple]] = [{} for _ in range(n)]
        self.closed = False
        self.procs = [
            ctx.Process(target=_worker_loop, args=(builder, self.tasks[k], self.results[k], os.getpid()),
                        daemon=True, name=f"dinodist-data-{k}")
            for k in range(n)
        ]
        for p in self.procs:
            p.start()

    def request(self, iteration: int) -> None:
        self.tasks[iteration % self.n].put(iteration)

    def fetch(self, iteration: int) -> dict:
        """Wait for a requested iteration; results of others read on the way are kept for their reader."""
        k = iteration % self.n
        with self.locks[k]:
            while iteration not in self.stash[k]:
                got = self._next(k, iteration)
                self.stash[k][got[0]] = got[1:]
            batch, exc = self.stash[k].pop(iteration)
        if exc is not None:
            raise exc
        return batch

    def _next(self, k: int, iteration: int) -> tuple:
        proc = self.procs[k]
        while True:
            try:
                return self.results[k].get(timeout=_POLL_S)
            except queue.Empty:
                pass
            if self.closed:
                raise DinodistError(f"BatchLoader closed while iteration {iteration} was being built")
            if not proc.is_alive():
                try:  # what it sent just before exiting may still be in the pipe
                    return self.results[k].get(timeout=_POLL_S)
                except Exception:  # noqa: BLE001 - nothing there, or tensors whose sender is gone
                    raise DinodistError(f"loader workers: process {k} (pid {proc.pid}) exited with code "
                                        f"{proc.exitcode} before iteration {iteration} was built") from None

    def forget(self, keep) -> None:
        """Drop kept results of iterations outside `keep` (after a jump nobody will ask for them)."""
        for k in range(self.n):
            with self.locks[k]:
                for it in [i for i in self.stash[k] if i not in keep]:
                    del self.stash[k][it]

    def close(self) -> None:
        self.closed = True
        for q in self.tasks:
            try:  # queued prefetches would be built before the stop sentinel is seen
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            q.put(None)
        for p in self.procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()  # it ignores SIGTERM
                p.join()
        for q in self.tasks + self.results:
            q.cancel_join_thread()  # unread results must not keep this process from exiting
            q.close()


class BatchLoader:
    """Collated batches for `rows` of each global batch; `get(iteration)` prefetches the next ones.

    The batch dict is `collate(...)` plus `sample_ids`, `seeds` (the rows' entries of `global_batch`),
    `labels` (long, -1 where unknown; only when the source has labels) and `global_batch_size`.

    `prefetch`: iterations queued ahead (default max(2, workers)); `workers`: 0 builds in `threads`
    threads of this process; N > 0 in N processes (iteration t in process t % N), with `threads`
    threads here waiting for and pinning their batches. Only queued iterations are built ahead, so
    `prefetch` below `workers` leaves workers idle.
    `uint8`: crops are uint8 before normalisation, with `crop_mean` and `crop_std` ([3] float32) in the
    batch; `core.data.device.prepare_batch` normalises them on the device (docs/data.md: tolerance).
    `device`: where the consumer trains; a CUDA device turns `pin_memory` on unless it is given.
    `owns`: the iterations this loader serves when several loaders share one iteration sequence (an SSL
    stage with mixed resolutions has one loader per resolution): only those are built ahead.
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
        prefetch: int | None = None,
        threads: int = 1,
        cache_bytes: int = 1 << 30,
        workers: int = 0,
        uint8: bool = False,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        owns: Callable[[int], bool] | None = None,
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
        if prefetch is None:
            prefetch = max(2, workers)  # fewer batches in flight than workers would leave workers idle
        if prefetch < 0:
            raise DinodistError(f"loader prefetch must be >= 0, got {prefetch}")
        if threads < 1:
            raise DinodistError(f"loader threads must be >= 1, got {threads}")
        if workers < 0:
            raise DinodistError(f"loader workers must be >= 0, got {workers}")
        self.prefetch = prefetch
        self.owns = owns
        self.uint8 = bool(uint8)
        self.pin_memory = wants_pinned(device) if pin_memory is None else bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            raise DinodistError("loader pin_memory: pinned memory needs CUDA, and torch.cuda.is_available() "
                                "is False")
        self._builder = _Builder(source, self.cfg, self.global_batch_size, self.seed, self.rows, self.grid,
                                 mask_prob, self.mask_ratio, cache_bytes, self.uint8)
        self.cache = self._builder.cache
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dinodist-data")
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._workers = _Workers(self._builder, workers) if workers else None
        # stale prefetches that were already running when dropped: each still takes its worker result
        self._orphans: Counter[int] = Counter()
        self._orphans_lock = threading.Lock()

    @property
    def workers(self) -> int:
        return self._workers.n if self._workers is not None else 0

    def build(self, iteration: int) -> dict:
        """Build the batch of `iteration` synchronously in this process (unpinned)."""
        return self._builder.build(iteration)

    def _produce(self, iteration: int) -> dict:
        # what a background thread runs: build (or wait for the worker), then pin for the CUDA copy
        if self._workers is not None:
            batch = self._workers.fetch(iteration)
        else:
            batch = self._builder.build(iteration)
        return pin_batch(batch) if self.pin_memory else batch

    def _submit(self, iteration: int) -> Future:
        fut = self._futures.get(iteration)
        if fut is None:
            if self._workers is not None:
                self._workers.request(iteration)
            fut = self._pool.submit(self._produce, iteration)
            self._futures[iteration] = fut
        return fut

    def get(self, iteration: int) -> dict:
        """The batch of `iteration`; queues iterations+1..+prefetch in the background.

        An error building it (e.g. the source's DinodistError for an unreadable file) is raised here
        as it was raised, also when a background thread or a worker process hit it.
        """
        if self._closed:
            raise DinodistError("BatchLoader.get called after close()")
        with self._lock:
            fut = self._futures.pop(iteration, None)
            if fut is None and self._workers is not None:
                self._workers.request(iteration)  # before the prefetches: the worker builds it first
            ahead = self._ahead(iteration)
            for it in [k for k in self._futures if k not in ahead]:
                stale = self._futures.pop(it)  # a jump (resume, replay) drops stale work
                if not stale.cancel() and self._workers is not None:
                    self._orphan(it, stale)
            if self._workers is not None:
                with self._orphans_lock:
                    keep = {iteration, *ahead} | set(self._orphans)
                self._workers.forget(keep)
            for it in ahead:
                self._submit(it)
        return fut.result() if fut is not None else self._produce(iteration)

    def _ahead(self, iteration: int) -> list[int]:
        """The next `prefetch` iterations after `iteration` that this loader serves."""
        if self.owns is None:
            return list(range(iteration + 1, iteration + 1 + self.prefetch))
        out: list[int] = []
        it = iteration + 1
        # bounded: a loader that serves almost no iterations must not scan for ever
        while len(out) < self.prefetch and it <= iteration + 64 * max(self.prefetch, 1):
            if self.owns(it):
                out.append(it)
            it += 1
        return out

    def _orphan(self, iteration: int, fut: Future) -> None:
        # Its fetch may be waiting for the lock while another reader stashes its result: forgetting
        # that result would leave it (and the thread it occupies) waiting for ever.
        with self._orphans_lock:
            self._orphans[iteration] += 1

        def done(_: Future) -> None:
            with self._orphans_lock:
                self._orphans[iteration] -= 1
                if self._orphans[iteration] <= 0:
                    del self._orphans[iteration]

        fut.add_done_callback(done)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for fut in self._futures.values():
                fut.cancel()
            self._futures.clear()
        if self._workers is not None:
            self._workers.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
