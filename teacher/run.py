"""The loop of one teacher rank: its rows of each global batch -> targets -> isend to student ranks.

Pipelining: the sends of iteration t are left in flight while the teacher computes t+1; at most
`prefetch_depth` iterations of sends are outstanding, after which the teacher blocks (the time
it spends blocked is its `wait_seconds`: the students are the bottleneck then). Students post
their receives one iteration ahead, so teacher compute overlaps student training. Under NCCL it is
the teacher's stream that blocks, not its host, so the times come from CUDA events there
(core.targets.step_timer), read without a sync once the stream has passed them.

Target store (topology `store:`): every teacher rank also isends its row block to teacher rank 0,
which joins the blocks into the whole global batch and appends one record per iteration (targets,
sample ids and seeds) to a `core.target_store.StoreWriter`. Its writes happen on a background
thread. Rank 0 posts exact-size receives for iteration t (it derives every row's iBOT count from
the sample ids and seeds) and completes them after computing t+1, so it does not wait for the
other ranks' forward passes; its only work on the store path is joining blocks and queueing.
One store then holds whole global batches, so a student added later reads one file set whatever
the teacher's rank count was. Rank 0 also writes the manifest (what a replay must match) and the
heads' last layers once.

With the topology's `eval:` (and `eval.teacher`), the teacher group measures the frozen backbone's
k-NN top-1 once, after its last targets were sent (core/eval/inloop.py, sharded over its ranks), into
`<out>/teacher/stats.json`: the students need nothing from it then, so nobody waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dinodist.core.data.augment import CropConfig
from dinodist.core.data.loader import BatchLoader
from dinodist.core.data.sampler import global_batch
from dinodist.core.data.sources import build_source
from dinodist.core.errors import DinodistError, first_line
from dinodist.core.eval.inloop import KnnSettings, ShardedKnn, backbone_forward
from dinodist.core.models import HeadSpec
from dinodist.core.target_store import StoreWriter
from dinodist.core.targets import (
    HEADS,
    ExchangePlan,
    MaskCounter,
    concat,
    dims_of,
    post_recv_block,
    send_block,
    send_last_layers,
    send_transfer,
    step_timer,
    wait_block,
)
from dinodist.core.train import preempt
from dinodist.core.train.metrics import open_metrics, write_record
from dinodist.teacher.model import checkpoint_sha256, last_layers, load_sharded_teacher
from dinodist.teacher.targets import compute_targets

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TeacherJob:
    """Everything the teacher group needs; built from the topology by the rank runtime, which states
    no defaults of its own (orchestrator/runtime/jobs.py; the topology is where defaults live)."""

    arch: str
    kind: str
    source: str
    data_index: str | None  # core.data.index file of `source` (None: list the files)
    crops: CropConfig  # n_local is ignored: the teacher only sees global crops
    global_batch: int
    iterations: int
    out_dir: Path
    overrides: dict
    checkpoint: str | None
    shard: str  # fsdp | hsdp | replicate: the plan's layout (teacher/model.py:shard_teacher)
    shard_size: int | None  # hsdp: ranks one copy is spread over (the plan's); None: the whole group
    dino_head: HeadSpec | None
    ibot_head: HeadSpec | None
    seed: int
    mask_prob: float
    mask_ratio: tuple[float, float]
    workers: int  # loader worker processes (data.workers)
    uint8: bool  # uint8 crops, normalised on the device (data.uint8)
    prefetch_depth: int
    wire_dtype: torch.dtype  # of the targets sent to the students (their receive buffers use the same)
    store: dict | None  # {"path", "dtype", "retain": int | None, "implicit": bool}: write a target store
    # control.on_failure restart_group: a student group whose sends fail is dropped, not the teacher
    detach_failed_groups: bool
    topology: str  # topology name, recorded in the store manifest
    knn: KnnSettings | None  # topology `eval:` when eval.teacher (None: the teacher is not evaluated)


# Local-crop settings do not change what the teacher computes (it sees global crops only, and
# global crops do not depend on them): a student added later may use its own.
_LOCAL_ONLY_CROP_FIELDS = ("n_local", "local_size", "local_scale", "blur_prob_local")


def target_crop_config(crops: CropConfig) -> dict:
    """The crop settings the targets depend on, as the manifest stores them (JSON types)."""
    d = dataclasses.asdict(crops)
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in _LOCAL_ONLY_CROP_FIELDS}))


def store_identity(job: TeacherJob) -> str:
    """`teacher_hash` of the manifest, without loading the teacher: sha256 of its file or its seed."""
    # the sidecar's record when it still matches the file: hashing 27 GB is what a check must not do
    return checkpoint_sha256(job.checkpoint) if job.checkpoint else f"random-init:{job.seed}"


def store_manifest(job: TeacherJob, teacher_hash: str, data_fingerprint: str, patch_size: int) -> dict:
    """What produced the targets. A replay rebuilds this from its topology and must match it
    (core.target_store.check_compatible), except the fields in `NOT_COMPARED`."""
    dims = ({"dino_dim": job.dino_head.bottleneck_dim, "ibot_dim": job.ibot_head.bottleneck_dim}
            if job.kind == HEADS else {})
    return {
        "teacher_hash": teacher_hash, "teacher_arch": job.arch, "teacher_overrides": dict(job.overrides),
        "data_fingerprint": data_fingerprint, "crop_config": target_crop_config(job.crops),
        "target_kind": job.kind, "topology": job.topology, "global_batch_size": job.global_batch,
        "seed": job.seed, "mask_probability": job.mask_prob, "mask_ratio": list(job.mask_ratio),
        "patch_size": patch_size, "target_dims": dims, "iterations": job.iterations,
        # only when on: a store written before the option existed keeps its identity
        **({"uint8_crops": True} if job.uint8 else {}),
    }


NOT_COMPARED = ("topology", "iterations")


def _open_store(job: TeacherJob, identity: str, fingerprint: str, patch_size: int, start: int | None,
                append: bool = False):
    """A new store (`start` None), or the store of the run being resumed, cut back to the records before
    `start`: those after it are recomputed, so they are never kept twice nor mixed with new ones.
    `append`: the store of this very run, continued after its last complete record (a restarted teacher)."""
    teacher_hash = identity if identity.startswith("random-init:") else f"sha256:{identity}"
    manifest = store_manifest(job, teacher_hash, fingerprint, patch_size)
    s = job.store
    if append:
        return StoreWriter(s["path"], manifest, dtype=s.get("dtype", "bf16"), retain=s.get("retain"),
                           resume=True)
    if start is None and s.get("implicit") and Path(s["path"]).exists():
        # the restart store of an earlier run in this output folder: this run writes its own
        shutil.rmtree(s["path"])
    resume = start is not None and Path(s["path"]).exists()
    return StoreWriter(s["path"], manifest, dtype=s.get("dtype", "bf16"), retain=s.get("retain"),
                       resume=resume, resume_from=start if resume else None)


class _Sends:
    """The teacher's in-flight target sends, per student group, at most `depth` iterations deep.

    With `detach` (control.on_failure: restart_group) a group one of whose ranks can no longer be
    reached (gloo: the connection to a dead peer errors at once) is dropped for the rest of the run:
    no more targets go to it, while every other group is served as before. The supervisor restarts it
    as a follower of the target store, which has every iteration it missed. Without `detach` such an
    error ends the teacher, as it always did.
    """

    def __init__(self, exchange: ExchangePlan, rank: int, depth: int, detach: bool,
                 wire_dtype: torch.dtype = torch.float32, header_group=None) -> None:
        self.exchange, self.rank, self.depth, self.detach = exchange, rank, depth, detach
        self.wire_dtype, self.header_group = wire_dtype, header_group
        self.in_flight: deque[dict[str, list]] = deque()
        self.detached: dict[str, int] = {}  # group -> the iteration it was dropped at

    def send(self, targets, device: torch.device, extra: list) -> int:
        """isend this iteration's rows to every attached group (and `extra`: the store gather)."""
        works: dict[str, list] = {"": list(extra)}
        nbytes = 0
        for tr in self.exchange.sends(self.rank):
            group = self.exchange.group_of(tr.dst)
            if group in self.detached:
                continue
            try:
                w, n = send_transfer(targets, tr, device, self.wire_dtype, self.header_group)
            except RuntimeError as exc:
                self._drop(group, targets.iteration, exc)
                continue
            works.setdefault(group, []).extend(w)
            nbytes += n
        self.in_flight.append(works)
        return nbytes

    def wait(self, keep: int, iteration: int) -> None:
        """Complete the oldest sends until at most `keep` iterations are in flight."""
        while len(self.in_flight) > keep:
            for group, works in self.in_flight.popleft().items():
                if group in self.detached:
                    continue  # never completes: its peer is gone
                try:
                    for w in works:
                        w.wait()
                except RuntimeError as exc:
                    if group == "":
                        raise
                    self._drop(group, iteration, exc)

    def _drop(self, group: str, iteration: int, exc: BaseException) -> None:
        if not self.detach or group == "":
            raise exc
        self.detached[group] = iteration
        log.warning("teacher rank %d: group %s cannot be reached at iteration %d (%s); no more targets go to "
                    "it (it catches up from the target store)", self.rank, group, iteration, first_line(exc))


def _agree_last(local: bool, flag_group) -> bool:
    """Whether any teacher rank was asked to stop: all of them must flag the same last iteration, since
    each student rank hears only from the teacher ranks that hold its rows. A CPU (gloo) all-reduce, so
    it never waits on the device."""
    if flag_group is None:
        return local
    t = torch.tensor([1 if local else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=flag_group)
    return bool(t.item())


Report = Callable[[dict], "str | None"]


def run_teacher(job: TeacherJob, exchange: ExchangePlan, rank: int, group, mesh, device: torch.device,
                report: Report | None = None, resume_at: int | None = None, flag_group=None,
                alone: bool = False, header_group=None) -> dict:
    """Serve targets for every iteration; returns this rank's totals (group rank 0 writes files).

    `resume_at`: resume at that iteration (the students' common checkpoint); None starts a new run.
    `flag_group`: a gloo group of the teacher ranks (None with one rank) on which they agree to stop
    early when preemption is requested (core.train.preempt): the last iteration's targets then carry
    `last`, every student checkpoints after it, and the totals say `preempted_at` (the next iteration).
    `header_group`: under NCCL, a gloo group holding every rank the teacher sends to (students, and the
    teacher ranks for the store gather): headers travel there in host memory, so no receiver reads its
    GPU for them (core.targets.send_transfer). None: headers go with the payloads.
    `alone`: a teacher restarted after a failure (control.on_failure: restart_group), in a world of the
    teacher ranks only: it continues the target store after its last complete record and sends nothing;
    the student groups follow the store meanwhile (core.targets.FailoverTargetSource).
    """
    if alone and job.store is None:
        raise DinodistError("a restarted teacher writes the target store, but the job has none")
    teacher_ranks = exchange.teacher_ranks
    group_rank = teacher_ranks.index(rank)
    # built on meta, weights mapped from the file straight into place (bf16 on GPU): no fp32 copy per
    # rank, and a sharded teacher copies only its own shard of each tensor to the device
    loaded = load_sharded_teacher(job.arch, job.overrides, job.checkpoint, job.kind, job.dino_head,
                                  job.ibot_head, job.seed, device=device,
                                  mesh=mesh if len(teacher_ranks) > 1 else None, layout=job.shard,
                                  shard_size=job.shard_size)
    model = loaded.model
    source = build_source(job.source, index=job.data_index)
    store = None
    if job.store is not None and group_rank == 0:
        store = _open_store(job, loaded.identity, source.fingerprint(), loaded.spec.patch_size, resume_at,
                            append=alone)
    if job.kind == HEADS and not alone:  # a restarted teacher: the students and the store have them
        weights = last_layers(model)  # collective over the teacher group when sharded
        if group_rank == 0:
            students = [r for ranks in exchange.student_groups.values() for r in ranks]
            send_last_layers(weights, students, device)
            if store is not None:
                store.write_last_layers(weights)
    first = resume_at or 0
    if alone:
        # rank 0 holds the store: every teacher rank starts after its last complete record
        nxt = torch.tensor([0 if store is None or store.last_iteration is None else store.last_iteration + 1],
                           dtype=torch.int64, device=device)
        if len(teacher_ranks) > 1:
            dist.broadcast(nxt, src=teacher_ranks[0], group=group)
        first = int(nxt.item())
        log.warning("teacher rank %d: restarted; continuing the target store at iteration %d", rank, first)
    start, stop = exchange.teacher_rows(rank)
    crops = dataclasses.replace(job.crops, n_local=0)
    # device: batches pinned in the loader's thread on CUDA, so the copy in compute_targets overlaps
    loader = BatchLoader(source, crops, job.global_batch, job.seed, slice(start, stop),
                         loaded.spec.patch_size, mask_prob=job.mask_prob, mask_ratio=job.mask_ratio,
                         device=device, workers=job.workers, uint8=job.uint8)
    num_samples = len(source)
    grid = (job.crops.global_size // loaded.spec.patch_size,) * 2
    counts_of = MaskCounter(job.global_batch, num_samples, job.seed, grid, job.mask_prob, job.mask_ratio)
    out_dir = Path(job.out_dir) / "teacher"
    totals = {"iterations": 0, "teacher_forwards": 0, "target_bytes_sent": 0, "forward_seconds": 0.0,
              "wait_seconds": 0.0, "step_seconds": 0.0, "store_seconds": 0.0, "start_iteration": first,
              "restarted": alone}
    # built before serving, so an unlabelled source stops the job at startup, not after the run
    knn = (ShardedKnn(job.knn, group if len(teacher_ranks) > 1 else None, group_rank, len(teacher_ranks),
                      device) if job.knn is not None else None)
    preempted_at = None
    try:
        with contextlib.ExitStack() as stack:
            _serve(job, exchange, rank, group_rank, model, loader, store, stack, totals, out_dir, counts_of,
                   num_samples, device, report, first, flag_group, alone, header_group)
    except preempt.Preempted as p:
        preempted_at = p.iteration
    if preempted_at is not None:
        totals["preempted_at"] = preempted_at
    elif knn is not None:
        # Once, after the last targets were sent (and the store closed): the students need nothing more
        # from the teacher, so its evaluation overlaps their last iterations instead of stalling them.
        top1, seconds = knn.evaluate(backbone_forward(model, autocast_bf16=True))
        totals["knn_seconds"] = seconds
        if top1 is not None:
            totals["knn_top1"] = top1
            if report is not None:
                report({"knn_top1_ratio": top1})
    sent = torch.tensor([totals["target_bytes_sent"]], dtype=torch.float64, device=device)
    if len(teacher_ranks) > 1:
        dist.all_reduce(sent, group=group)
    if group_rank == 0:
        stats = {**totals, "target_bytes_sent_all_ranks": int(sent.item()), "identity": loaded.identity,
                 "ranks": len(teacher_ranks)}
        if store is not None:
            stats["store"] = {"path": str(store.path), "dtype": store.dtype, **store.stats}
        (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return totals


def _serve(job: TeacherJob, exchange: ExchangePlan, rank: int, group_rank: int, model, loader, store,
           stack: contextlib.ExitStack, totals: dict, out_dir: Path, counts_of, num_samples: int,
           device: torch.device, report: Report | None, first: int, flag_group, alone: bool,
           header_group=None) -> None:
    teacher_ranks = exchange.teacher_ranks
    root = teacher_ranks[0]
    start, stop = exchange.teacher_rows(rank)
    pending = None  # rank 0 with a store: (its targets of iteration t, the posted receives of t)
    sends = _Sends(exchange, rank, job.prefetch_depth, job.detach_failed_groups, job.wire_dtype, header_group)
    if alone:
        sends.detached.update(dict.fromkeys(exchange.student_groups, first))
    stack.callback(loader.close)
    writer = None
    if group_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = stack.enter_context(open_metrics(out_dir / "metrics.jsonl", first))
    if store is not None:
        # exits first: marks the store CLOSED on success; on a failure or a preemption it stays
        # unclosed, so readers stop at its last complete record as after a crash
        stack.enter_context(store)
    timer = step_timer(device)
    # served iterations whose times are not known yet: (iteration, bytes, store seconds, 4 marks)
    served: deque[tuple] = deque()

    def publish(block: bool) -> None:
        """Count, log and report each served iteration, in order, once its times are known. With host
        clocks (CPU) that is at once. On CUDA the loop never waits for the device (no host sync), so an
        iteration's events complete a little later and its line follows behind; `block`, at the end of
        the run, waits for the last one."""
        if block and served:
            timer.wait(served[-1][-1][-1])
        while served and timer.ready(served[0][-1][-1]):
            it, nbytes, store_s, (m0, m_fwd, m_wait, m_end) = served.popleft()
            forward, wait, step = (timer.seconds(m0, m_fwd), timer.seconds(m_wait, m_end),
                                   timer.seconds(m0, m_end))
            totals["iterations"] += 1
            # one teacher forward per global batch: the group's ranks each run their share of it
            totals["teacher_forwards"] += 1 if group_rank == 0 else 0
            totals["target_bytes_sent"] += nbytes
            totals["forward_seconds"] += forward
            totals["wait_seconds"] += wait
            totals["step_seconds"] += step
            totals["store_seconds"] += store_s
            if writer is not None:
                write_record(writer, {"iteration": it, "step_seconds": step, "forward_seconds": forward,
                                      "wait_seconds": wait, "images": job.global_batch,
                                      "target_bytes_sent": nbytes, "store_seconds": store_s})
            if report is not None:
                cmd = report({"iteration": it, "step_seconds": step, "wait_seconds": wait,
                              "images": stop - start, "teacher_forwards": 1 if group_rank == 0 else 0,
                              "target_bytes_sent": nbytes,
                              "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(device)
                              if device.type == "cuda" else None})
                if cmd == "stop":
                    raise DinodistError(f"teacher rank {rank}: stopped by the orchestrator at iteration {it}")
                if cmd == "preempt":
                    preempt.request("the supervisor asked")

    last = False
    for it in range(first, job.iterations):
        m0 = timer.mark()
        last = _agree_last(preempt.requested(), flag_group) and it < job.iterations - 1
        batch = loader.get(it)
        targets = compute_targets(model, batch, it, start, job.kind, device)
        targets.last = last
        m_fwd = timer.mark()
        ts = time.perf_counter()  # host work only (joining blocks, queueing the record): the host clock
        gather = []
        if job.store is not None and group_rank != 0:
            gather = send_block(targets, root, device, header_group)
        elif store is not None and len(teacher_ranks) == 1:
            _append_record(store, job, targets, [], num_samples)
        elif store is not None:
            if pending is not None:
                _append_record(store, job, *pending, num_samples)
            pending = (targets, [post_recv_block(dims_of(targets), src, it, *exchange.teacher_rows(src),
                                                 counts_of(it, *exchange.teacher_rows(src))
                                                 if job.kind == HEADS else None, device, header_group)
                                 for src in teacher_ranks[1:]])
        store_s = time.perf_counter() - ts
        nbytes = sends.send(targets, device, gather)
        m_wait = timer.mark()
        sends.wait(job.prefetch_depth, it)
        served.append((it, nbytes, store_s, (m0, m_fwd, m_wait, timer.mark())))
        publish(block=False)
        if last:
            break
    if pending is not None:
        _append_record(store, job, *pending, num_samples)
    sends.wait(0, job.iterations)
    publish(block=True)
    totals["detached"] = dict(sends.detached)
    if last:
        if store is not None:
            store.flush()
        raise preempt.Preempted(f"teacher rank {rank}: preempted after iteration {it}", it + 1)


def _append_record(store: StoreWriter, job: TeacherJob, targets, pending: list, num_samples: int) -> None:
    """Teacher rank 0: complete the other teacher ranks' blocks, join them, queue one store record."""
    it = targets.iteration
    full = concat([targets] + [wait_block(p) for p in pending])
    ids, seeds = global_batch(it, job.global_batch, num_samples, job.seed)
    meta = {"iteration": it, "rows": full.rows, "global_crop_size": job.crops.global_size,
            "local_crop_size": job.crops.local_size, "n_local": job.crops.n_local,
            "last": targets.last}  # a follower stops where the live groups do (preemption)
    store.append(it, {**full.tensors, "sample_ids": ids, "sample_seeds": seeds}, meta)
