"""k-NN quality measured inside a training loop, with feature extraction sharded over a process group.

A distillation group evaluates its (FSDP2-sharded) EMA backbone every `every` iterations: each rank of
the group extracts the features of its own slice of the evaluation images (`core.rows.rank_rows`, the
split rule of the training rows), the slices are all-gathered on the group's process group, and group
rank 0 runs the weighted k-NN vote (core/eval/knn.py). Time therefore shrinks with the group's size, and
no other group takes part.

Collective rules: a sharded model's forward all-gathers its parameters, so every rank of the group must
run the same number of forwards. Ranks whose slice is shorter (or empty) run padding batches of one
image, whose features are dropped. The gather pads every slice to the longest one, since gloo's
all_gather needs equal sizes.

Images are the first images of neither split: `eval_ids` spreads `limit` ids evenly over the source, so a
`folder:` source in class sub-folders (sorted by class) still gives every class its share. Preprocessing
is `core.eval.preprocess` (resize of the whole image, ImageNet normalisation), as `dinodist eval`; a rank
keeps its preprocessed slices between evaluations when they fit in `CACHE_BYTES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinodist.core.data.sources import ImageSource, build_source
from dinodist.core.errors import DinodistError
from dinodist.core.eval import preprocess
from dinodist.core.eval.knn import knn_accuracy

# a rank's preprocessed evaluation images kept between evaluations up to this size (float32 pixels)
CACHE_BYTES = 512 * 1024 * 1024

Forward = Callable[[torch.Tensor], torch.Tensor]  # normalised images [B,3,S,S] -> CLS features [B,D]


@dataclass(frozen=True, kw_only=True)
class KnnSettings:
    """The topology's `eval:` as a loop needs it; the topology (orchestrator/topology.py) states defaults."""

    every: int  # evaluate after every `every` iterations, and after the last one
    train: str  # labelled source specs (core/data/sources.py)
    test: str
    train_index: str | None  # core.data.index files the driver wrote for them (None: list the files)
    test_index: str | None
    limit_train: int | None  # evenly spread images of each source (None: all)
    limit_test: int | None
    image_size: int
    k: int
    temperature: float
    batch_size: int  # images per forward, per rank


def backbone_forward(root: torch.nn.Module, autocast_bf16: bool = False) -> Forward:
    """The CLS features of `root.backbone` as a forward method of `root`, registered with FSDP2 when
    `root` is sharded: outside one, the root unit's parameters (patch embed, tokens, norms) stay
    sharded. Eval mode during the call (the root's mode is restored after); `autocast_bf16`: bf16
    autocast on CUDA, as the teacher computes its targets."""
    import contextlib
    import types

    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not hasattr(root, "eval_features"):
        root.eval_features = types.MethodType(lambda self, x: self.backbone(x), root)
        if isinstance(root, FSDPModule):
            register_fsdp_forward_method(root, "eval_features")

    def forward(x: torch.Tensor) -> torch.Tensor:
        was = root.training
        root.eval()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16 and x.is_cuda
                    else contextlib.nullcontext())
        try:
            with autocast:
                return root.eval_features(x)
        finally:
            root.train(was)

    return forward


def due(iteration: int, iterations: int, every: int) -> bool:
    """Whether the loop evaluates after `iteration` (0-based): after every `every`-th one and the last."""
    return (iteration + 1) % every == 0 or iteration == iterations - 1


def eval_ids(n: int, limit: int | None) -> list[int]:
    """`limit` ids spread evenly over [0, n) (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


def labelled_source(spec: str, index: str | None, field: str) -> ImageSource:
    """The source of `spec`, refusing one without labels with a one-line error naming `field`."""
    source = build_source(spec, index=index)
    if len(source) == 0 or source.label(0) is None:
        raise DinodistError(f"{field}: {spec} has no labels; k-NN needs a labelled source (folder:PATH "
                            "with one sub-folder per class, or fashion-mnist:DIR:train|test)")
    return source


def _share(n: int, size: int, rank: int) -> range:
    # core.rows.rank_rows's rule, but a group larger than the split is allowed (its ranks then pad)
    return range(rank * n // size, (rank + 1) * n // size)


class _Split:
    """One evaluation split on one rank: its ids, all labels, its slice, cached preprocessed batches."""

    def __init__(self, source: ImageSource, limit: int | None, image_size: int, batch_size: int,
                 group_rank: int, group_size: int) -> None:
        self.source = source
        self.ids = eval_ids(len(source), limit)
        self.labels = torch.tensor([source.label(i) for i in self.ids], dtype=torch.long)
        n = len(self.ids)
        self.shares = [len(_share(n, group_size, r)) for r in range(group_size)]
        share = _share(n, group_size, group_rank)
        self.mine = self.ids[share.start:share.stop]
        self.steps = -(-max(self.shares) // batch_size)  # forwards every rank runs
        self.image_size, self.batch_size = image_size, batch_size
        per_image = 3 * image_size * image_size * 4
        self._cache: list[torch.Tensor] | None = [] if len(self.mine) * per_image <= CACHE_BYTES else None

    def batches(self) -> list[torch.Tensor | None]:
        """This rank's preprocessed batches, `steps` of them; None marks a padding forward."""
        if self._cache:
            return self._cache + [None] * (self.steps - len(self._cache))
        out: list[torch.Tensor | None] = []
        for j in range(self.steps):
            ids = self.mine[j * self.batch_size:(j + 1) * self.batch_size]
            out.append(preprocess([self.source.load(i) for i in ids], self.image_size) if ids else None)
        if self._cache is not None:
            self._cache = [b for b in out if b is not None]
        return out

    def padding(self) -> torch.Tensor:
        return preprocess([self.source.load(self.ids[0])], self.image_size)


class ShardedKnn:
    """k-NN top-1 of a model on two labelled sources, its extraction sharded over `group`.

    `group` None (with `group_size` 1): one rank, no collectives. `evaluate` is collective over the
    group: call it on every rank at the same point of the loop.
    """

    def __init__(self, settings: KnnSettings, group, group_rank: int, group_size: int,
                 device: torch.device, field: str = "eval.knn") -> None:
        self.settings, self.group = settings, group
        self.group_rank, self.group_size, self.device = group_rank, group_size, device
        s = settings
        self.train = _Split(labelled_source(s.train, s.train_index, f"{field}.train"), s.limit_train,
                            s.image_size, s.batch_size, group_rank, group_size)
        self.test = _Split(labelled_source(s.test, s.test_index, f"{field}.test"), s.limit_test,
                           s.image_size, s.batch_size, group_rank, group_size)

    @torch.no_grad()
    def features(self, forward: Forward, split: _Split) -> torch.Tensor:
        """Every image's features [N, D] (float32, host), on every rank of the group."""
        local, pad, probe = [], None, None
        for batch in split.batches():
            if batch is None:
                pad = split.padding() if pad is None else pad
                probe = forward(pad.to(self.device))  # keeps the group's forwards in step; output dropped
                continue
            local.append(forward(batch.to(self.device)).float())
        # an empty slice learns D from its padding forward, for the gather's shape
        mine = torch.cat(local) if local else probe.float()[:0]
        if self.group_size == 1:
            return mine.cpu()
        longest = max(split.shares)
        padded = torch.zeros(longest, mine.shape[1], dtype=mine.dtype, device=mine.device)
        padded[: mine.shape[0]] = mine
        parts = [torch.empty_like(padded) for _ in range(self.group_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, split.shares)]).cpu()

    def evaluate(self, forward: Forward) -> tuple[float | None, float]:
        """(top-1 accuracy on group rank 0, None on the others; seconds this rank spent)."""
        t0 = time.perf_counter()
        train = self.features(forward, self.train)
        test = self.features(forward, self.test)
        top1 = None
        if self.group_rank == 0:
            top1 = knn_accuracy(train, self.train.labels, test, self.test.labels, k=self.settings.k,
                                temperature=self.settings.temperature)
        return top1, time.perf_counter() - t0
