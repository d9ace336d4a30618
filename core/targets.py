"""The teacher-to-student target format and the row-exchange plan.

Targets are per global-batch row (one sample, two global crops), always in *sample-major*
order on the wire and on disk:

- `heads`: `dino` [r, 2, Db] (DINO head bottleneck of each global crop's CLS, L2-normalised),
  `ibot` [M, Di] (iBOT head bottleneck of the masked patches only; for row 0 crop 0 its masked
  patches in increasing patch index, then row 0 crop 1, then row 1 ...), `ibot_counts` [r, 2].
- `features`: `cls` [r, 2, D] and `patch` [r, 2, P, D] (backbone outputs, no heads).

Students train in the official *crop-major* order (all crop-0 rows, then all crop-1 rows);
`crop_major` converts. Masks are a pure function of (sample id, seed), so a receiver knows
every count before the bytes arrive: it posts its receives one iteration ahead with exact
sizes, and the small header that precedes each payload is only a consistency check.

Row ownership (`rank_rows`, the one split rule the planner uses too): rank j of a group of d ranks
owns rows [floor(j*G/d), floor((j+1)*G/d)) of the global batch: G/d each when d divides G, else
shares that differ by one row (`train.even_batches: false`). Teacher and student groups split the
same way; a teacher rank sends each student rank exactly the intersection of the two ranges, so a
student receives only its rows, whatever T and S are.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from dinodist.core.data.masking import sample_masks
from dinodist.core.data.sampler import global_batch
from dinodist.core.errors import DinodistError, first_line
from dinodist.core.rows import rank_rows

log = logging.getLogger(__name__)

HEADS = "heads"
FEATURES = "features"
# iteration, first row, stop row, number of iBOT rows (checked by the receiver), then the flags word
_HEADER_FIXED = 5
_HEADER_CHECKED = 4
# flags: the teacher's last iteration of this run (preemption): students checkpoint after it and stop.
# In-band, so every rank of every group learns it with the same iteration's targets, with no extra message.
FLAG_LAST = 1


@dataclass
class Targets:
    """Targets of the rows [start, stop) of the global batch of one iteration (sample-major)."""

    kind: str
    iteration: int
    start: int
    stop: int
    tensors: dict[str, torch.Tensor]
    last: bool = False  # the teacher stops after this iteration (preemption): see FLAG_LAST

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def slice(self, start: int, stop: int) -> Targets:
        """The targets of the absolute rows [start, stop), which must lie inside this block."""
        if not self.start <= start <= stop <= self.stop:
            raise DinodistError(
                f"rows [{start}, {stop}) are outside the targets' rows [{self.start}, {self.stop})"
            )
        a, b = start - self.start, stop - self.start
        if self.kind == HEADS:
            counts = self.tensors["ibot_counts"]
            per_row = counts.sum(1)
            lo = int(per_row[:a].sum())
            hi = lo + int(per_row[a:b].sum())
            t = {"dino": self.tensors["dino"][a:b], "ibot": self.tensors["ibot"][lo:hi],
                 "ibot_counts": counts[a:b]}
        else:
            t = {"cls": self.tensors["cls"][a:b], "patch": self.tensors["patch"][a:b]}
        return Targets(self.kind, self.iteration, start, stop, t, self.last)


def concat(parts: Sequence[Targets]) -> Targets:
    """Join contiguous row blocks of one iteration (in row order)."""
    if not parts:
        raise DinodistError("no targets to concatenate")
    for prev, nxt in zip(parts, parts[1:]):
        if prev.stop != nxt.start or prev.iteration != nxt.iteration:
            raise DinodistError(f"target blocks are not contiguous at row {prev.stop}")
    keys = parts[0].tensors.keys()
    tensors = {k: torch.cat([p.tensors[k] for p in parts]) for k in keys}
    return Targets(parts[0].kind, parts[0].iteration, parts[0].start, parts[-1].stop, tensors,
                   any(p.last for p in parts))


def ibot_counts(masks: torch.Tensor) -> torch.Tensor:
    """Masked patches per (row, global crop) from masks [r, 2, P]."""
    return masks.sum(-1).to(torch.long)


@dataclass(frozen=True)
class MaskCounter:
    """iBOT counts [r, 2] of rows [start, stop) of any iteration, from (sample id, seed) alone.

    The masks a loader makes for those rows (core.data.loader) are a pure function of the sampled ids
    and seeds, so a receiver sizes its buffers for rows it never loads: a student rank one iteration
    ahead, teacher rank 0 for the other teacher ranks' store blocks.
    """

    global_batch: int
    num_samples: int
    seed: int
    grid: tuple[int, int]
    mask_prob: float
    mask_ratio: tuple[float, float]

    def __call__(self, iteration: int, start: int, stop: int) -> torch.Tensor:
        ids, seeds = global_batch(iteration, self.global_batch, self.num_samples, self.seed)
        return ibot_counts(sample_masks(ids[start:stop], seeds[start:stop], self.grid, self.mask_prob,
                                        self.mask_ratio))


def masks_from_collated(collated_masks: torch.Tensor) -> torch.Tensor:
    """Collated crop-major masks [2r, P] -> per-row masks [r, 2, P]."""
    n, p = collated_masks.shape
    return collated_masks.view(2, n // 2, p).transpose(0, 1)


def sample_major_to_crop_major(masks: torch.Tensor) -> torch.Tensor:
    """Index that reorders sample-major masked rows into the collated crop-major order.

    `masks` [r, 2, P]; the collated masks are `masks.transpose(0, 1).reshape(2r, P)` and the
    official `mask_indices_list` enumerates them in that order.
    """
    r, c, p = masks.shape
    position = torch.full((r, c, p), -1, dtype=torch.long)
    position[masks] = torch.arange(int(masks.sum()))
    return position.transpose(0, 1)[masks.transpose(0, 1)]


def crop_major(targets: Targets, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Student-side view: `dino` [2r, Db] and `ibot` [M, Di] in collated (crop-major) order.

    `masks` [r, 2, P] are the student's own masks of these rows; their counts must agree with
    the counts the teacher used, otherwise the two disagree about the data.
    """
    t = targets.tensors
    if targets.kind == FEATURES:
        cls, patch = t["cls"], t["patch"]
        return {"cls": cls.transpose(0, 1).flatten(0, 1), "patch": patch.transpose(0, 1).flatten(0, 1)}
    if masks is None:
        raise DinodistError("heads targets need the student's masks to order the iBOT rows")
    if not torch.equal(ibot_counts(masks).to(t["ibot_counts"].device), t["ibot_counts"]):
        raise DinodistError(
            f"iteration {targets.iteration}: the teacher's iBOT mask counts differ from the student's masks "
            f"for rows [{targets.start}, {targets.stop}) (different data or masking config?)"
        )
    order = sample_major_to_crop_major(masks.cpu()).to(t["ibot"].device)
    return {"dino": t["dino"].transpose(0, 1).flatten(0, 1), "ibot": t["ibot"].index_select(0, order)}


# --------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Transfer:
    src: int
    dst: int
    start: int
    stop: int


def _group_rows(global_batch: int, ranks: Sequence[int], what: str,
                even: bool) -> dict[int, tuple[int, int]]:
    n = len(ranks)
    if n == 0:
        raise DinodistError(f"{what} has no ranks")
    if even and global_batch % n:
        raise DinodistError(f"{what}: global batch {global_batch} is not divisible by its {n} ranks "
                            "(train.even_batches: false allows uneven shares)")
    if n > global_batch:
        raise DinodistError(f"{what}: its {n} ranks exceed the global batch {global_batch} (a rank would "
                            "get no rows)")
    rows = (rank_rows(global_batch, n, i) for i in range(n))
    return {r: (s.start, s.stop) for r, s in zip(ranks, rows)}


@dataclass
class ExchangePlan:
    """Which global-batch rows each teacher rank sends to each student rank.

    Every group splits the batch by `rank_rows`; `even_batches=True` additionally insists on equal
    shares (the topology's `train.even_batches`, already validated there; here a second guard).
    """

    global_batch: int
    teacher_ranks: list[int]
    student_groups: dict[str, list[int]]
    even_batches: bool = False
    transfers: list[Transfer] = field(init=False)

    def __post_init__(self) -> None:
        even = self.even_batches
        self._teacher = _group_rows(self.global_batch, self.teacher_ranks, "teacher", even)
        self._student: dict[int, tuple[int, int]] = {}
        self._group_of: dict[int, str] = {}
        for name, ranks in self.student_groups.items():
            self._student.update(_group_rows(self.global_batch, ranks, f"student group {name!r}", even))
            self._group_of.update({r: name for r in ranks})
        self.transfers = []
        for src, (ta, tb) in self._teacher.items():
            for dst, (sa, sb) in self._student.items():
                a, b = max(ta, sa), min(tb, sb)
                if a < b:
                    self.transfers.append(Transfer(src, dst, a, b))

    def teacher_rows(self, rank: int) -> tuple[int, int]:
        return self._teacher[rank]

    def student_rows(self, rank: int) -> tuple[int, int]:
        return self._student[rank]

    def group_of(self, rank: int) -> str:
        return self._group_of[rank]

    def sends(self, src: int) -> list[Transfer]:
        """Transfers out of a teacher rank, in the fixed order both sides use."""
        return [t for t in self.transfers if t.src == src]

    def recvs(self, dst: int) -> list[Transfer]:
        """Transfers into a student rank, in row order."""
        return sorted((t for t in self.transfers if t.dst == dst), key=lambda t: t.start)


# --------------------------------------------------------------------------------------- wire


@dataclass(frozen=True)
class TargetDims:
    """Shapes a receiver needs to size its buffers (from the teacher arch and head specs)."""

    kind: str
    dino_dim: int = 0
    ibot_dim: int = 0
    feat_dim: int = 0
    n_patches: int = 0

    def payload_numel(self, rows: int, n_ibot: int) -> int:
        if self.kind == HEADS:
            return rows * 2 * self.dino_dim + n_ibot * self.ibot_dim
        return rows * 2 * self.feat_dim * (1 + self.n_patches)


def _header(t: Targets) -> torch.Tensor:
    if t.kind == HEADS:
        counts = t.tensors["ibot_counts"].flatten().cpu()
    else:
        counts = torch.zeros(2 * t.rows, dtype=torch.long)
    n_ibot = int(counts.sum())
    fixed = torch.tensor([t.iteration, t.start, t.stop, n_ibot, FLAG_LAST if t.last else 0], dtype=torch.long)
    return torch.cat([fixed, counts.to(torch.long)])


def _payload(t: Targets, dtype: torch.dtype) -> torch.Tensor:
    names = ("dino", "ibot") if t.kind == HEADS else ("cls", "patch")
    return torch.cat([t.tensors[n].reshape(-1).to(dtype) for n in names]).contiguous()


def _unpack(kind: str, dims: TargetDims, it: int, start: int, stop: int, counts: torch.Tensor | None,
            payload: torch.Tensor) -> Targets:
    r = stop - start
    payload = payload.float()
    if kind == HEADS:
        n_dino = r * 2 * dims.dino_dim
        dino = payload[:n_dino].view(r, 2, dims.dino_dim)
        ibot = payload[n_dino:].view(-1, dims.ibot_dim)
        return Targets(kind, it, start, stop, {"dino": dino, "ibot": ibot, "ibot_counts": counts})
    n_cls = r * 2 * dims.feat_dim
    cls = payload[:n_cls].view(r, 2, dims.feat_dim)
    patch = payload[n_cls:].view(r, 2, dims.n_patches, dims.feat_dim)
    return Targets(kind, it, start, stop, {"cls": cls, "patch": patch})


def _send_header(header: torch.Tensor, dst: int, device: torch.device, header_group) -> object:
    """isend a header (a host tensor): over `header_group` (a gloo group) as it is, else on `device`
    with the payload's backend."""
    if header_group is not None:
        return dist.isend(header, dst=dst, group=header_group)
    return dist.isend(header.to(device), dst=dst)


def _recv_header(numel: int, src: int, device: torch.device, header_group) -> tuple[torch.Tensor, object]:
    """Post a header receive: into host memory over `header_group`, else into `device` memory."""
    if header_group is not None:
        header = torch.empty(numel, dtype=torch.long)
        return header, dist.irecv(header, src=src, group=header_group)
    header = torch.empty(numel, dtype=torch.long, device=device)
    return header, dist.irecv(header, src=src)


def send_transfer(targets: Targets, tr: Transfer, device: torch.device,
                  wire_dtype: torch.dtype = torch.float32, header_group=None) -> tuple[list, int]:
    """isend one student rank its rows `tr` of this teacher rank's block; returns (works, bytes).

    `header_group`: a gloo group of the whole world for the small headers when the payloads travel
    over NCCL, so a receiver reads the header (its iteration, rows and last flag) from host memory
    without waiting for its GPU stream; None sends both on the default group.
    """
    part = targets.slice(tr.start, tr.stop)
    header = _header(part)
    payload = _payload(part, wire_dtype).to(device)
    works = [_send_header(header, tr.dst, device, header_group), dist.isend(payload, dst=tr.dst)]
    return works, header.numel() * header.element_size() + payload.numel() * payload.element_size()


def send_targets(plan: ExchangePlan, rank: int, targets: Targets, device: torch.device,
                 wire_dtype: torch.dtype = torch.float32, header_group=None) -> tuple[list, int]:
    """isend every student rank its rows of this teacher rank's block; returns (works, bytes sent)."""
    works, nbytes = [], 0
    for tr in plan.sends(rank):
        w, n = send_transfer(targets, tr, device, wire_dtype, header_group)
        works += w
        nbytes += n
    return works, nbytes


class TargetSource(Protocol):
    """Where a student rank gets the targets of its rows for an iteration."""

    def get(self, iteration: int) -> Targets: ...


class P2PTargetSource:
    """Receives this student rank's rows from the teacher ranks, receives posted `depth` iterations ahead.

    `counts_fn(iteration)` gives the iBOT counts [r, 2] of this rank's rows (from its own masks)
    so buffers have exact sizes before the teacher has even computed them. `wire_dtype` must be the
    dtype the teacher sends in (both take orchestrator/runtime/jobs.py:wire_dtype); payloads arrive
    rounded to it and are handed out as float32.
    """

    def __init__(self, plan: ExchangePlan, rank: int, dims: TargetDims, iterations: range,
                 counts_fn: Callable[[int], torch.Tensor] | None, device: torch.device,
                 depth: int = 1, wire_dtype: torch.dtype = torch.float32, header_group=None) -> None:
        if depth < 1:
            raise DinodistError(f"train.prefetch_depth must be >= 1, got {depth}")
        if dims.kind == HEADS and counts_fn is None:
            raise DinodistError("heads targets need a counts function (the student's masks)")
        self.plan, self.rank, self.dims, self.device = plan, rank, dims, device
        self.counts_fn, self.depth, self.wire_dtype = counts_fn, depth, wire_dtype
        self.header_group = header_group  # see send_transfer: headers in host memory, no device read
        self.iterations = iterations
        self.start, self.stop = plan.student_rows(rank)
        self.transfers = plan.recvs(rank)
        self._posted: deque[tuple[int, list]] = deque()
        self._next = iterations.start
        self.bytes_received = 0

    def _post(self, it: int) -> None:
        counts = self.counts_fn(it) if self.dims.kind == HEADS else None
        pending = []
        for tr in self.transfers:
            a, b = tr.start - self.start, tr.stop - self.start
            part_counts = counts[a:b] if counts is not None else None
            n_ibot = int(part_counts.sum()) if part_counts is not None else 0
            header, wh = _recv_header(_HEADER_FIXED + 2 * (b - a), tr.src, self.device, self.header_group)
            numel = self.dims.payload_numel(b - a, n_ibot)
            payload = torch.empty(numel, dtype=self.wire_dtype, device=self.device)
            works = (wh, dist.irecv(payload, src=tr.src))
            pending.append((tr, part_counts, n_ibot, header, payload, works))
        self._posted.append((it, pending))

    def _fill(self, upto: int) -> None:
        last = min(upto, self.iterations.stop - 1)
        while self._next <= last:
            self._post(self._next)
            self._next += 1

    def get(self, iteration: int) -> Targets:
        self._fill(iteration)
        it, pending = self._posted.popleft()
        if it != iteration:
            raise DinodistError(
                f"targets requested for iteration {iteration} but iteration {it} is next in line"
            )
        parts, last = [], False
        for tr, counts, n_ibot, header, payload, (wh, wp) in pending:
            wh.wait()
            header = header.cpu()  # a no-op for a header that came over the gloo header group
            expect = [iteration, tr.start, tr.stop, n_ibot]
            if header[:_HEADER_CHECKED].tolist() != expect or (
                counts is not None and not torch.equal(header[_HEADER_FIXED:], counts.flatten().cpu())
            ):
                raise DinodistError(
                    f"targets from teacher rank {tr.src} for rank {self.rank} do not match: expected "
                    f"(iteration, start, stop, masked) {expect}, got {header[:_HEADER_CHECKED].tolist()}"
                )
            last = last or bool(int(header[_HEADER_CHECKED]) & FLAG_LAST)
            wp.wait()
            self.bytes_received += header.numel() * 8 + payload.numel() * payload.element_size()
            parts.append(_unpack(self.dims.kind, self.dims, iteration, tr.start, tr.stop,
                                 counts, payload))  # host counts: crop_major compares them with host masks
        # post the next receives before the caller trains on this iteration: the teacher can
        # then deliver iteration t+1 while the student computes t. None after the teacher's last one:
        # it will never send them.
        if not last:
            self._fill(iteration + self.depth)
        out = concat(parts)
        out.last = last
        return out


class FailoverTargetSource:
    """Live targets until the teacher goes away, then the target store it was writing.

    With `control.on_failure: restart_group`, a teacher rank that dies (gloo: the connection to it
    errors at once) is restarted by the supervisor as a writer of the store alone; the student ranks
    meanwhile switch, at the iteration they were waiting for, to following that store. They wait
    there for the restarted teacher, then go on: no student state is lost.
    """

    def __init__(self, live: TargetSource, fallback: Callable[[int], TargetSource]) -> None:
        self.live, self.fallback = live, fallback
        self.store: TargetSource | None = None
        self.failed_over_at: int | None = None

    def get(self, iteration: int) -> Targets:
        if self.store is None:
            try:
                return self.live.get(iteration)
            except RuntimeError as exc:  # torch.distributed's errors for a peer that is gone
                log.warning("targets of iteration %d: the teacher cannot be reached (%s); following the "
                            "target store from here", iteration, first_line(exc))
                self.store, self.failed_over_at = self.fallback(iteration), iteration
        return self.store.get(iteration)


class InlineTargetSource:
    """Targets computed in this process by a callable (the inline-teacher runner and tests)."""

    def __init__(self, compute: Callable[[int], Targets], wire_dtype: torch.dtype = torch.float32) -> None:
        self.compute, self.wire_dtype = compute, wire_dtype

    def get(self, iteration: int) -> Targets:
        t = self.compute(iteration)
        if self.wire_dtype != torch.float32:
            # round exactly as the P2P path would, so inline and distributed runs stay comparable
            t.tensors = {k: (v.to(self.wire_dtype).float() if v.is_floating_point() else v)
                         for k, v in t.tensors.items()}
        return t


# ------------------------------------------------------------------------------------- timing


class WallTimer:
    """Intervals on the host clock: on CPU the host does the work itself, so its clock is the work's."""

    def mark(self) -> float:
        return time.perf_counter()

    def ready(self, mark: float) -> bool:
        return True

    def wait(self, mark: float) -> None:
        pass

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaTimer:
    """Intervals on the device's current stream, from CUDA events recorded on it.

    Under NCCL `work.wait()` makes the stream wait, not the host, and kernels are queued asynchronously:
    host clocks around a wait or a forward measure launch times. An event's timestamp is when the stream
    reached it. `seconds` needs both events complete, and this class never synchronises to get there
    (that would add a host sync per iteration): callers read intervals after a sync their loop does
    anyway (a student's one loss read), or once `ready(end)` (a non-blocking query) says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def ready(self, mark: torch.cuda.Event) -> bool:
        return mark.query()

    def wait(self, mark: torch.cuda.Event) -> None:
        """Block until the stream has passed `mark`: a sync, for the end of a run only."""
        mark.synchronize()

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3


def step_timer(device: torch.device | str) -> WallTimer | CudaTimer:
    """The clock for step and wait times on `device`: CUDA events on a CUDA device, else the host clock."""
    device = torch.device(device)
    return CudaTimer(device) if device.type == "cuda" else WallTimer()


class StoreStopped(DinodistError):
    """A followed target store will not deliver the next iteration: its writer closed it or died.

    `last_iteration` is the last complete record (None if there was none): a follower has trained
    through it and can say so.
    """

    def __init__(self, message: str, last_iteration: int | None) -> None:
        super().__init__(message)
        self.last_iteration = last_iteration


class StoreTargetSource:
    """Replays targets written by a teacher to a target store (core.target_store.StoreReader).

    Each record holds the whole global batch; this source hands out rows [start, stop). With
    `follow=True` it tails a store that a live run is still writing: `get(t)` waits until record t
    is complete (records are only visible once whole, so a torn tail is never read) and raises
    `StoreStopped` when the writer has closed the store before t, or when `timeout_s` passes with
    no new record and no `CLOSED` marker (the writer died). `sampler(t) -> (ids, seeds)` of the
    whole global batch, when given, is checked against the record's `sample_ids`/`sample_seeds`,
    so a replay can never pair targets with other images than the teacher saw.
    """

    def __init__(self, reader, start: int, stop: int, kind: str = HEADS, *, follow: bool = False,
                 poll_s: float = 0.1, timeout_s: float | None = None,
                 sampler: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.reader, self.start, self.stop, self.kind = reader, start, stop, kind
        self.follow, self.poll_s, self.timeout_s, self.sampler = follow, poll_s, timeout_s, sampler
        # first iteration for which the follower had to wait for the writer (it had caught up)
        self.caught_up_at: int | None = None
        self.bytes_read = 0

    def newest(self) -> int | None:
        """Newest complete record now on disk (None: none yet)."""
        self.reader.refresh()
        # the reader's incremental scanner already tracks it; listing every iteration would be O(store)
        return self.reader._scanner.last_iteration

    def _wait_for(self, iteration: int) -> None:
        newest = self.newest()
        if newest is not None and newest >= iteration:
            return
        last_change, closed_seen = time.monotonic(), False
        while True:
            time.sleep(self.poll_s)
            now_newest = self.newest()
            if now_newest is not None and now_newest >= iteration:
                if self.caught_up_at is None:
                    self.caught_up_at = iteration
                return
            if now_newest != newest:
                newest, last_change = now_newest, time.monotonic()
            if closed_seen:
                raise StoreStopped(
                    f"{self.reader.path}: the writer closed the target store after iteration {newest}; "
                    f"iteration {iteration} will never come", newest)
            if self.reader.closed():
                closed_seen = True  # one more scan: records completed before the marker count
                continue
            if self.timeout_s is not None and time.monotonic() - last_change > self.timeout_s:
                raise StoreStopped(
                    f"{self.reader.path}: target store writer stopped (no new record for {self.timeout_s:g}s "
                    f"and no CLOSED marker); stopped after the last complete iteration {newest}", newest)

    def get(self, iteration: int) -> Targets:
        if self.follow:
            self._wait_for(iteration)
        tensors, meta = self.reader.read(iteration)
        names = ("dino", "ibot", "ibot_counts") if self.kind == HEADS else ("cls", "patch")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise DinodistError(f"target store iteration {iteration} has no tensor {missing[0]!r}")
        if self.sampler is not None and "sample_ids" in tensors:
            ids, seeds = self.sampler(iteration)
            if not (torch.equal(tensors["sample_ids"].long(), ids.long())
                    and torch.equal(tensors["sample_seeds"].long(), seeds.long())):
                raise DinodistError(
                    f"{self.reader.path}: iteration {iteration}: the stored sample ids/seeds differ from "
                    "this run's sampler (data source, train.seed or global batch size changed?)")
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        rows = tensors[names[0]].shape[0]
        # `last`: the live groups stopped after this iteration (preemption); a follower stops there too
        full = Targets(self.kind, iteration, 0, rows, {n: tensors[n] for n in names}, bool(meta.get("last")))
        if self.kind == HEADS:
            full.tensors["ibot_counts"] = full.tensors["ibot_counts"].to(torch.long)
        return full.slice(self.start, self.stop)


def send_last_layers(weights: Mapping[str, torch.Tensor], dst_ranks: Sequence[int],
                     device: torch.device) -> None:
    """Send the teacher heads' prototype layers (names sorted) to every student rank, once."""
    works = []
    for dst in dst_ranks:
        for name in sorted(weights):
            works.append(dist.isend(weights[name].detach().float().contiguous().to(device), dst=dst))
    for w in works:
        w.wait()


def recv_last_layers(shapes: Mapping[str, tuple[int, ...]], src: int,
                     device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(shapes):
        buf = torch.empty(shapes[name], dtype=torch.float32, device=device)
        dist.recv(buf, src=src)
        out[name] = buf
    return out


# ------------------------------------------------------------------- gather for the target store


def dims_of(targets: Targets) -> TargetDims:
    """The receive shapes of blocks like `targets` (a gatherer sizes its buffers from its own block)."""
    t = targets.tensors
    if targets.kind == HEADS:
        return TargetDims(HEADS, dino_dim=t["dino"].shape[-1], ibot_dim=t["ibot"].shape[-1])
    return TargetDims(FEATURES, feat_dim=t["cls"].shape[-1], n_patches=t["patch"].shape[2])


def send_block(targets: Targets, dst: int, device: torch.device, header_group=None) -> list:
    """isend a whole row block (header, then float32 payload) to one rank: the store gather."""
    payload = _payload(targets, torch.float32).to(device)
    return [_send_header(_header(targets), dst, device, header_group), dist.isend(payload, dst=dst)]


@dataclass
class PendingBlock:
    """A posted receive of one row block from `send_block`; `wait_block` completes it."""

    dims: TargetDims
    src: int
    iteration: int
    start: int
    stop: int
    counts: torch.Tensor | None
    header: torch.Tensor
    payload: torch.Tensor
    works: tuple


def post_recv_block(dims: TargetDims, src: int, iteration: int, start: int, stop: int,
                    counts: torch.Tensor | None, device: torch.device, header_group=None) -> PendingBlock:
    """Post the receives of rows [start, stop) of `iteration` from `src`, sized exactly from `counts`
    (the rows' iBOT counts [r, 2], which the receiver derives from sample ids and seeds), so the
    receiver need not wait for the data before going on."""
    r = stop - start
    n_ibot = int(counts.sum()) if counts is not None else 0
    header, wh = _recv_header(_HEADER_FIXED + 2 * r, src, device, header_group)
    payload = torch.empty(dims.payload_numel(r, n_ibot), dtype=torch.float32, device=device)
    works = (wh, dist.irecv(payload, src=src))
    return PendingBlock(dims, src, iteration, start, stop, counts, header, payload, works)


def wait_block(p: PendingBlock) -> Targets:
    """Complete a posted block receive; its header must match what was expected."""
    p.works[0].wait()
    header = p.header.cpu()  # a no-op for a header that came over the gloo header group
    n_ibot = int(p.counts.sum()) if p.counts is not None else 0
    expect = [p.iteration, p.start, p.stop, n_ibot]
    if header[:_HEADER_CHECKED].tolist() != expect or (
        p.counts is not None and not torch.equal(header[_HEADER_FIXED:], p.counts.flatten().cpu().long())
    ):
        raise DinodistError(f"store gather: rank {p.src} sent (iteration, start, stop, masked) "
                            f"{header[:_HEADER_CHECKED].tolist()}, expected {expect}")
    p.works[1].wait()
    counts = p.counts.to(p.payload.device).long() if p.counts is not None else None
    return _unpack(p.dims.kind, p.dims, p.iteration, p.start, p.stop, counts, p.payload)
