"""The loop of one student rank: targets for its rows -> losses -> step -> EMA -> metrics -> checkpoints.

The same loop serves a live teacher (P2P receives posted one iteration ahead), an inline teacher
(orchestrator/runtime/inline.py) and a target-store replay: only the `TargetSource` differs, which is
what makes those runs comparable loss for loss.

Uneven shares (`train.even_batches: false`): rank r of d owns rank_rows(G, d, r); its loss, a mean
over its rows, is multiplied by core.rows.loss_scale (rows * d / G) before backward because FSDP2
averages gradients over the d ranks: the group then steps on the full-batch gradient, as one rank
holding all G rows would. metrics.jsonl reports the unscaled group-level terms, each the
rows-weighted mean of the ranks' terms (= the term over the whole batch; the plain mean when even).

The optimizer step (core/train/update.py) and the checkpoints (core/checkpoint.py, on the group's
process group: `<group_dir>/ckpt/<iteration>/` holding student, EMA, optimizer and every rank's RNG
state, the newest `keep_checkpoints` kept) are the SSL stages'. Each checkpoint also refreshes
`<group_dir>/backbone.pth` (the EMA backbone, official layout), so a stopped job leaves usable weights.

Quality in the loop (docs/distill.md): every iteration's `teacher_agreement` / `teacher_cosine`
(students/loss.py) ride in the step's one read; with the topology's `eval:`, the EMA backbone's k-NN
top-1 is measured after every `eval.every`-th and the last iteration, extraction sharded over the
group's ranks (core/eval/inloop.py), and a new best is exported as `<group_dir>/backbone-best.pth`.

Resume (`resume_at`): the group loads its checkpoint of that iteration and continues; data, masks and
schedules are functions of the iteration, so the losses continue as if the run had never stopped, and
metrics.jsonl keeps each iteration once. Preemption: targets flagged `last` by the teacher end the run
after that iteration with a checkpoint, which every group writes at the same iteration.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dinodist.core.checkpoint import load_checkpoint, save_checkpoint
from dinodist.core.data.augment import CropConfig
from dinodist.core.data.device import prepare_batch
from dinodist.core.data.loader import BatchLoader
from dinodist.core.data.sources import build_source
from dinodist.core.errors import DinodistError
from dinodist.core.eval.inloop import KnnSettings, ShardedKnn, backbone_forward, due
from dinodist.core.models import HeadSpec, build_backbone, compile_blocks, load_backbone_state, save_backbone
from dinodist.core.models.io import write_sidecar
from dinodist.core.models.rope import set_rope_dtype, student_rope_dtype
from dinodist.core.rows import loss_scale, rank_rows
from dinodist.core.targets import HEADS, TargetSource, crop_major, masks_from_collated, step_timer
from dinodist.core.train import preempt
from dinodist.core.train.metrics import knn_last_best, open_metrics, read_records, write_record
from dinodist.core.train.optim import build_optimizer
from dinodist.core.train.update import optimizer_step
from dinodist.students.loss import LossConfig, attach_chunked_losses, chunked_heads_loss, distill_loss
from dinodist.students.model import StudentOptim, build_student, lr_at, make_ema, shard_student

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StudentJob:
    """Everything one student group needs; built from the topology by the orchestrator.

    No defaults: the topology (orchestrator/topology.py) states them, and the orchestrator passes every field.
    """

    name: str
    arch: str
    kind: str
    source: str
    data_index: str | None  # core.data.index file of `source` (None: list the files)
    crops: CropConfig
    global_batch: int
    iterations: int
    out_dir: Path
    overrides: dict
    dino_head: HeadSpec | None  # None for features targets
    ibot_head: HeadSpec | None
    teacher_dim: int
    seed: int
    mask_prob: float
    mask_ratio: tuple[float, float]
    workers: int  # loader worker processes (data.workers)
    uint8: bool  # uint8 crops, normalised on the device (data.uint8)
    optim: StudentOptim
    loss: LossConfig
    checkpoint_every: int | None
    keep_checkpoints: int
    activation_checkpointing: bool | str  # true / "full", "selective", false / "none"
    compile: bool  # torch.compile each backbone block
    teacher: str | None  # the teacher checkpoint (recorded in the backbone's sidecar)
    knn: KnnSettings | None  # topology `eval:` (None: no k-NN in the loop)

    @property
    def group_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class GroupContext:
    """Where this rank sits: its group's process group and mesh, its rows, its device."""

    group: object
    mesh: object
    group_rank: int
    group_size: int
    start: int
    stop: int
    device: torch.device


Report = Callable[[dict], "str | None"]  # per-iteration stats in, a control command (or None) out


def _reduce_rows(values: torch.Tensor, ctx: GroupContext, global_batch: int) -> torch.Tensor:
    """Group-level values of per-rank means: sum_r rows_r * value_r / G (the mean when shares are even).

    `values` [n] float64 on the rank's device, reduced there: nothing is read to the host here, the
    loop reads the result with the iteration's one read.
    """
    if ctx.group_size == 1:
        return values
    t = values * (ctx.stop - ctx.start)
    dist.all_reduce(t, group=ctx.group)
    return t / global_batch


def student_step(job: StudentJob, ctx: GroupContext, student: torch.nn.Module, ema: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, batch: dict, targets: dict[str, torch.Tensor],
                 last_layers: dict[str, torch.Tensor] | None, iteration: int, scale: float = 1.0,
                 group=None) -> tuple[float, float, dict[str, float]]:
    """One update of the rank's student: its host batch and crop-major targets to the device, losses,
    backward (x `scale`, core.rows.loss_scale), clipping, AdamW, EMA, then the step's one device read.

    Returns (this rank's loss, the group's loss, the group's loss terms and agreement measures
    `teacher_agreement` / `teacher_cosine` of students/loss.py), group values being the rows-weighted
    means over the group (`_reduce_rows`); the measures ride in the same one read. Nothing is checked: a
    non-finite loss comes back as it is, after the update. `group`: Sinkhorn-Knopp's process group, the
    student group's own (None would mean the world). Needs `attach_chunked_losses(student)` first when
    the losses are chunked.
    """
    # non_blocking: a blocking host-to-device copy waits for the whole stream (a sync per tensor)
    targets = {k: v.to(ctx.device, non_blocking=True) for k, v in targets.items()}
    batch = prepare_batch(batch, ctx.device)  # non-blocking from pinned memory; uint8 crops normalised here
    quality: dict[str, torch.Tensor] = {}  # detached, no_grad: the loss and its gradients are unchanged
    if job.kind == HEADS and job.loss.loss_chunk_rows > 0:
        loss, terms = chunked_heads_loss(student, batch, targets, last_layers, job.crops.n_local, job.loss,
                                         group=group, quality=quality)
    else:
        out = student(batch["collated_global_crops"], batch.get("collated_local_crops"),
                      batch.get("mask_indices_list"))
        loss, terms = distill_loss(job.kind, out, targets, last_layers, batch, job.crops.n_local, job.loss,
                                   group=group, quality=quality)
    terms = {**terms, **quality}
    opt = job.optim
    # loss_scale: 1.0 with even shares; see the module docstring for why uneven ones need it
    optimizer_step(loss, optimizer, student, ema, lr=lr_at(iteration, opt, job.iterations),
                   wd=opt.weight_decay, clip_grad=opt.clip_grad if opt.clip_grad > 0 else None,
                   momentum=opt.ema, loss_scale=scale, measure_norms=False)
    # After the step, so the device never idles mid-step waiting for the host: the losses are read
    # once, as one tensor, this rank's loss (for the NaN check) first, then the group-level values.
    names = list(terms)
    own = torch.stack([loss.detach(), *terms.values()]).double()
    reduced = _reduce_rows(own, ctx, job.global_batch)
    own_loss, group_loss, *group_terms = torch.cat([own[:1], reduced]).tolist()
    return own_loss, group_loss, dict(zip(names, group_terms))


def _check_rows(job: StudentJob, ctx: GroupContext) -> None:
    want = rank_rows(job.global_batch, ctx.group_size, ctx.group_rank)
    if (ctx.start, ctx.stop) != (want.start, want.stop):
        raise DinodistError(
            f"group {job.name}: rank {ctx.group_rank} of {ctx.group_size} was given rows [{ctx.start}, "
            f"{ctx.stop}) but owns [{want.start}, {want.stop}) of the global batch {job.global_batch}"
        )


def train_student(job: StudentJob, targets: TargetSource, last_layers: dict[str, torch.Tensor] | None,
                  ctx: GroupContext, report: Report | None = None, resume_at: int | None = None) -> dict:
    """Train for `job.iterations`; returns the rank's totals. Group rank 0 writes metrics and exports.

    `resume_at`: continue from the group's checkpoint of that iteration (0 or None: from scratch).
    Totals carry `preempted_at` (the next iteration to train) when the teacher's targets ended the run.
    """
    _check_rows(job, ctx)
    student = build_student(job.arch, job.overrides, job.kind, job.dino_head, job.ibot_head,
                            job.teacher_dim, job.seed)
    student.apply_activation_checkpointing(job.activation_checkpointing)  # before make_ema / shard_student
    if job.compile:
        compile_blocks(student.backbone)  # checkpointing -> compile -> FSDP; the EMA copy runs eager
    set_rope_dtype(student, student_rope_dtype(ctx.device))  # bf16 on CUDA as the official students
    depth = len(student.backbone.blocks)
    ema = make_ema(student)
    student.to(ctx.device)
    ema.to(ctx.device)
    shard_student(student, ctx.mesh)
    shard_student(ema, ctx.mesh)
    chunked = job.kind == HEADS and job.loss.loss_chunk_rows > 0
    if chunked:
        attach_chunked_losses(student)
    opt = job.optim
    optimizer = build_optimizer(student, depth, layerwise_decay=opt.layerwise_decay,
                                patch_embed_lr_mult=opt.patch_embed_lr_mult, betas=opt.betas)
    # the checkpoint's model: both towers under one root, so their keys are "student.*" and "ema.*"
    towers = torch.nn.ModuleDict({"student": student, "ema": ema})
    first = resume_at or 0
    if first:
        load_checkpoint(job.group_dir / "ckpt" / str(first), towers, optimizer, group=ctx.group)
    if last_layers is not None:
        last_layers = {k: v.to(ctx.device) for k, v in last_layers.items()}
    source = build_source(job.source, index=job.data_index)
    loader = BatchLoader(source, job.crops, job.global_batch, job.seed, slice(ctx.start, ctx.stop),
                         student.backbone.patch_size, mask_prob=job.mask_prob, mask_ratio=job.mask_ratio,
                         device=ctx.device, workers=job.workers, uint8=job.uint8)
    group_dir = job.group_dir
    writer = None
    if ctx.group_rank == 0:
        group_dir.mkdir(parents=True, exist_ok=True)
        writer = open_metrics(group_dir / "metrics.jsonl", first)
    rows = ctx.stop - ctx.start
    scale = loss_scale(rows, ctx.group_size, job.global_batch)
    totals = {"iterations": 0, "images": 0, "step_seconds": 0.0, "wait_seconds": 0.0,
              "rows": [ctx.start, ctx.stop], "loss_scale": scale, "start_iteration": first,
              "checkpoint_seconds": 0.0, "eval_seconds": 0.0}
    knn = _InLoopEval(job, ctx, ema, first) if job.knn is not None else None
    # always the group itself: sinkhorn_knopp reads group=None as the whole world
    sk_group = ctx.group
    saved = first  # the iteration of the newest checkpoint of this run
    # CUDA events on a GPU: under NCCL a receive's wait() only makes the stream wait, so the host clock
    # would time the launch of the wait, not the wait
    timer = step_timer(ctx.device)
    try:
        for it in range(first, job.iterations):
            t0 = time.perf_counter()
            batch = loader.get(it)
            tw = timer.mark()
            tgt = targets.get(it)
            tw_end = timer.mark()
            masks = masks_from_collated(batch["collated_masks"])
            tgt_cm = crop_major(tgt, masks if job.kind == HEADS else None)
            own_loss, group_loss, terms = student_step(job, ctx, student, ema, optimizer, batch, tgt_cm,
                                                       last_layers, it, scale, group=sk_group)
            # The host clock is right for the step: it stops after the step's one read, which waits for
            # the device, and the previous iteration's read left the device idle when t0 was taken.
            step = time.perf_counter() - t0
            # Both events precede that read on the stream, so they are complete: reading them adds no sync.
            wait = timer.seconds(tw, tw_end)
            if not (math.isfinite(own_loss) and math.isfinite(group_loss)):
                # This iteration's update (and EMA) already ran on the bad gradient; raising here, before
                # its metrics line and checkpoint, leaves the newest checkpoint clean. Every rank of the
                # group sees the group loss, so all of them stop here, not only the one that diverged.
                bad = own_loss if not math.isfinite(own_loss) else group_loss
                raise DinodistError(f"group {job.name}: loss is {bad} at iteration {it}")
            totals["iterations"] += 1
            totals["images"] += rows
            totals["step_seconds"] += step
            totals["wait_seconds"] += wait
            evaluated = {}
            if knn is not None and due(it, job.iterations, job.knn.every):
                # after the step, outside step_seconds: its own time is knn_seconds
                evaluated = knn.run(it)
                totals["eval_seconds"] += evaluated["knn_seconds"]
            if writer is not None:
                line = {"iteration": it, "loss": group_loss, **terms, **evaluated, "step_seconds": step,
                        "wait_seconds": wait, "images": job.global_batch,
                        "lr": lr_at(it, job.optim, job.iterations)}
                write_record(writer, line)
            if tgt.last or (job.checkpoint_every and (it + 1) % job.checkpoint_every == 0):
                tc = time.perf_counter()
                saved = _checkpoint(job, ctx, towers, ema, optimizer, it + 1)
                totals["checkpoint_seconds"] += time.perf_counter() - tc
            if report is not None:
                # clamped: float rounding of a group mean must not push a ratio past the schema's bounds
                quality = {_WIRE[k]: min(max(v, -1.0 if k == "teacher_cosine" else 0.0), 1.0)
                           for k, v in {**terms, **evaluated}.items() if k in _WIRE and math.isfinite(v)}
                cmd = report({"iteration": it, "step_seconds": step, "wait_seconds": wait, "images": rows,
                              "losses": {"total": group_loss,
                                         **{k: v for k, v in terms.items() if k not in _WIRE}},
                              **quality,
                              # a host-side counter read: no device sync
                              "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(ctx.device)
                              if ctx.device.type == "cuda" else None})
                if cmd == "checkpoint" and saved != it + 1:
                    saved = _checkpoint(job, ctx, towers, ema, optimizer, it + 1)
                elif cmd == "stop":
                    raise DinodistError(f"group {job.name}: stopped by the orchestrator at iteration {it}")
                elif cmd == "preempt":
                    preempt.request("the supervisor asked")
            if tgt.last:
                # the teacher's last iteration of this run: every group has just checkpointed here
                totals["preempted_at"] = it + 1
                log.warning("group %s: preempted; checkpoint at iteration %d", job.name, it + 1)
                return totals
    finally:
        loader.close()
        if writer is not None:
            writer.close()
    export_backbone(ema, job, group_dir / "backbone.pth", ctx, job.iterations)
    return totals


# metrics.jsonl name -> control-plane name (core/control/messages.py:Quality) of the quality measures
_WIRE = {"teacher_agreement": "teacher_agreement_ratio", "teacher_cosine": "teacher_cosine",
         "knn_top1": "knn_top1_ratio"}
BEST_BACKBONE = "backbone-best.pth"


def _best_so_far(path: Path, before: int) -> float | None:
    """The best `knn_top1` of the metrics rows before `before` (a resumed run continues that record)."""
    if not before or not path.is_file():
        return None
    knn = knn_last_best([r for r in read_records(path) if r.get("iteration", before) < before])
    return knn["best"] if knn is not None else None


class _InLoopEval:
    """k-NN of the group's EMA backbone (core/eval/inloop.py), sharded over the group's ranks; a new best
    is exported as `<group>/backbone-best.pth` with its sidecar (`source.iteration`: iterations done)."""

    def __init__(self, job: StudentJob, ctx: GroupContext, ema: torch.nn.Module, first: int) -> None:
        self.job, self.ctx, self.ema = job, ctx, ema
        self.knn = ShardedKnn(job.knn, ctx.group if ctx.group_size > 1 else None, ctx.group_rank,
                              ctx.group_size, ctx.device)
        self.forward = backbone_forward(ema)
        # group rank 0 decides what is a new best; the others learn it with the result
        self.best = _best_so_far(job.group_dir / "metrics.jsonl", first) if ctx.group_rank == 0 else None

    def run(self, iteration: int) -> dict:
        """{"knn_top1", "knn_seconds"} on every rank (collective over the group; one read of one tensor)."""
        top1, seconds = self.knn.evaluate(self.forward)
        news = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        if self.ctx.group_rank == 0:
            news[0] = top1
            news[1] = 1.0 if self.best is None or top1 > self.best else 0.0
        if self.ctx.group_size > 1:
            dist.broadcast(news, group=self.ctx.group, group_src=0)
        top1, new_best = news.tolist()
        if new_best:
            self.best = top1
            export_backbone(self.ema, self.job, self.job.group_dir / BEST_BACKBONE, self.ctx, iteration + 1)
        return {"knn_top1": top1, "knn_seconds": seconds}


def _checkpoint(job: StudentJob, ctx: GroupContext, towers: torch.nn.Module, ema: torch.nn.Module,
                optimizer: torch.optim.Optimizer, iteration: int) -> int:
    """`<group_dir>/ckpt/<iteration>/` on every rank of the group (the newest `keep_checkpoints` kept),
    then the EMA backbone as `<group_dir>/backbone.pth`; returns `iteration`."""
    save_checkpoint(job.group_dir / "ckpt", iteration, towers, optimizer, meta={"group": job.name},
                    keep=job.keep_checkpoints, group=ctx.group)
    export_backbone(ema, job, job.group_dir / "backbone.pth", ctx, iteration)
    return iteration


def export_backbone(ema: torch.nn.Module, job: StudentJob, path: Path, ctx: GroupContext,
                    iteration: int) -> None:
    """The EMA backbone as a flat official state dict (all ranks gather, group rank 0 writes), with a
    sidecar `<path>.json` naming its arch, so `eval`, `viz` and `export` load it without `--arch`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # no cpu_offload: that option keeps the result on *global* rank 0 only, not the group's first rank
    full = get_model_state_dict(ema, options=StateDictOptions(full_state_dict=True))
    if ctx.group_rank != 0:
        return
    sd = {k[len("backbone."):]: v.detach().cpu() for k, v in full.items() if k.startswith("backbone.")}
    backbone = build_backbone(job.arch, device="meta", **(job.overrides or {}))
    load_backbone_state(backbone, sd, source=f"EMA of {job.arch}")
    save_backbone(backbone, path)
    write_sidecar(path, {
        "format": "dinodist-student-v1", "layout": "backbone", "arch": job.arch,
        "overrides": dict(job.overrides or {}), "image_size": job.crops.global_size,
        "source": {"run_dir": str(job.out_dir), "group": job.name, "iteration": iteration,
                   "teacher": job.teacher, "data": job.source, "targets": job.kind},
    })
