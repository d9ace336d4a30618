"""Topology + plan -> what one rank runs: jobs, the row-exchange plan, target sizes, its control thread.

Plain field-by-field adapters: every value comes from the validated topology (whose schema states
every default once) or from the plan the driver wrote; nothing here restates a default.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import torch

from dinodist.core.control.client import CONTROL_ENV, rank_key_from_env
from dinodist.core.control.thread import ControlThread
from dinodist.core.data.augment import CropConfig
from dinodist.core.distributed import destroy
from dinodist.core.eval.inloop import KnnSettings
from dinodist.core.targets import HEADS, ExchangePlan, MaskCounter, TargetDims
from dinodist.core.train.preempt import Preempted
from dinodist.orchestrator.planfile import DATA_INDEX_FILE, RunPlan
from dinodist.orchestrator.topology import EVAL_INDEX_FILES, Topology, eval_image_size
from dinodist.students.loss import LossConfig
from dinodist.students.model import StudentOptim
from dinodist.students.run import StudentJob
from dinodist.teacher.run import TeacherJob


def crop_config(topo: Topology) -> CropConfig:
    d = topo.data
    return CropConfig(global_size=d.global_crop_size, local_size=d.local_crop_size, n_local=d.local_crops,
                      flips=d.flips, global_scale=tuple(d.global_crop_scale),
                      local_scale=tuple(d.local_crop_scale))


def target_dtype(topo: Topology) -> str:
    """`train.target_dtype` resolved: "fp32" or "bf16", the one dtype of the targets on the wire.

    Every rank resolves it here from the same topology file (the teacher for its sends, each student
    for its receive buffers, the inline runner for its rounding), so sender and receivers cannot disagree
    about the bytes. auto: bf16 on GPUs (NCCL), fp32 on CPU so that CPU runs stay exact.
    """
    chosen = topo.train.target_dtype
    if chosen != "auto":
        return chosen
    return "bf16" if topo.resolved_backend() == "nccl" or topo.cluster.device != "cpu" else "fp32"


_WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def wire_dtype(topo: Topology) -> torch.dtype:
    return _WIRE_DTYPES[target_dtype(topo)]


def store_settings(topo: Topology, out_dir: str | Path) -> dict | None:
    """The topology's `store:` as the teacher's StoreWriter takes it (retain "all" -> None).

    With `control.on_failure: restart_group` and no `store:`, the teacher still writes one, at
    `<out>/targets` ("implicit"): a restarted group replays the iterations it missed from it, only as far
    back as a group can resume from (its oldest kept checkpoint) plus one interval. It is written in the
    wire's dtype (`target_dtype`), so replayed targets equal the ones the live groups received bit for
    bit: fp32 is stored as is; bf16 stores the same round-to-nearest of the same fp32 values as the wire's
    `.to(bfloat16)` (core/target_store/quant.py), and both decode exactly to float32. An fp32 store
    behind a bf16 wire would give a restarted group *more* precise targets than its peers got.
    """
    path = topo.target_store_path(out_dir)
    if path is None:
        return None
    if topo.store is not None:
        retain = topo.store.retain
        return {"path": path, "dtype": topo.store.dtype, "retain": None if retain == "all" else retain,
                "implicit": False}
    every, keep = topo.train.checkpoint_every, topo.train.keep_checkpoints
    return {"path": path, "dtype": target_dtype(topo), "retain": (keep + 1) * every if every else None,
            "implicit": True}


def data_index(out_dir: str | Path) -> str | None:
    """The driver's index of the data source (`<out>/data-index.json`), if it wrote one."""
    path = Path(out_dir) / DATA_INDEX_FILE
    return str(path) if path.is_file() else None


def knn_settings(topo: Topology, out_dir: str | Path) -> KnnSettings | None:
    """The topology's `eval:` for the loops, with the source indexes the driver wrote (if it did)."""
    ev = topo.eval
    if ev is None:
        return None
    k = ev.knn

    def index(field: str) -> str | None:
        path = Path(out_dir) / EVAL_INDEX_FILES[field]
        return str(path) if path.is_file() else None

    return KnnSettings(every=ev.every, train=k.train, test=k.test, train_index=index("train"),
                       test_index=index("test"), limit_train=k.limit_train, limit_test=k.limit_test,
                       image_size=eval_image_size(topo), k=k.k, temperature=k.temperature,
                       batch_size=k.batch_size)


def teacher_job(topo: Topology, out_dir: str | Path, plan: RunPlan | None = None) -> TeacherJob:
    """`plan`: the driver's plan, whose teacher layout (`teacher.shard: auto` resolved by the cost model)
    the ranks apply; without one (a store check, the inline runner), the topology's `teacher.shard`."""
    t, tr, d = topo.teacher, topo.train, topo.data
    layout = plan.teacher_layout if plan is not None else None
    shard = layout.layout if layout is not None else t.shard
    if shard == "auto":  # no plan to say: one process, where every layout is the same full copy
        shard = "replicate"
    return TeacherJob(
        arch=t.arch, kind=t.targets, source=d.source, data_index=data_index(out_dir), crops=crop_config(topo),
        global_batch=tr.global_batch_size, iterations=tr.iterations, out_dir=Path(out_dir),
        overrides=dict(t.overrides), checkpoint=t.checkpoint, shard=shard,
        shard_size=layout.shard_size if layout is not None else None,
        dino_head=topo.dino_head(), ibot_head=topo.ibot_head(), seed=tr.seed,
        mask_prob=d.mask_probability, mask_ratio=tuple(d.mask_ratio), workers=d.workers, uint8=d.uint8,
        prefetch_depth=tr.prefetch_depth, wire_dtype=wire_dtype(topo), store=store_settings(topo, out_dir),
        topology=topo.name,
        detach_failed_groups=topo.control.on_failure == "restart_group",
        knn=knn_settings(topo, out_dir) if topo.eval is not None and topo.eval.teacher else None,
    )


def student_job(topo: Topology, name: str, out_dir: str | Path) -> StudentJob:
    s = topo.student(name)
    tr = topo.student_train(name)  # `train:` with the student's `optim:` overrides applied
    d = topo.data
    dino, ibot = topo.student_heads(name)
    optim = StudentOptim(lr=tr["lr"], weight_decay=tr["weight_decay"],
                         warmup_iterations=tr["warmup_iterations"], layerwise_decay=tr["layerwise_decay"],
                         clip_grad=tr["clip_grad"], ema=tr["ema"], lr_schedule=tr["lr_schedule"],
                         lr_end=tr["lr_end"])
    loss = LossConfig(teacher_temp=tr["teacher_temp"], student_temp=tr["student_temp"],
                      ibot_weight=tr["ibot_weight"], koleo_weight=tr["koleo_weight"],
                      loss_chunk_rows=tr["loss_chunk_rows"], loss_precision=tr["loss_precision"])
    return StudentJob(
        name=name, arch=s.arch, kind=topo.teacher.targets, source=d.source, data_index=data_index(out_dir),
        crops=crop_config(topo),
        global_batch=tr["global_batch_size"], iterations=tr["iterations"], out_dir=Path(out_dir),
        overrides=dict(s.overrides), dino_head=dino, ibot_head=ibot,
        teacher_dim=topo.teacher_spec().embed_dim, seed=tr["seed"],
        mask_prob=d.mask_probability, mask_ratio=tuple(d.mask_ratio), workers=d.workers, uint8=d.uint8,
        optim=optim, loss=loss,
        checkpoint_every=tr["checkpoint_every"], keep_checkpoints=tr["keep_checkpoints"],
        activation_checkpointing=s.activation_checkpointing, compile=s.compile,
        teacher=topo.teacher.checkpoint,
        knn=knn_settings(topo, out_dir),
    )


def target_dims(topo: Topology) -> TargetDims:
    spec = topo.teacher_spec()
    if topo.teacher.targets == HEADS:
        return TargetDims(HEADS, dino_dim=topo.dino_head().bottleneck_dim,
                          ibot_dim=topo.ibot_head().bottleneck_dim)
    grid = topo.data.global_crop_size // spec.patch_size
    return TargetDims("features", feat_dim=spec.embed_dim, n_patches=grid * grid)


def last_layer_shapes(topo: Topology) -> dict[str, tuple[int, int]]:
    d, i = topo.dino_head(), topo.ibot_head()
    return {"dino_last_layer.weight": (d.n_prototypes, d.bottleneck_dim),
            "ibot_last_layer.weight": (i.n_prototypes, i.bottleneck_dim)}


def mask_counter(topo: Topology, num_samples: int) -> MaskCounter:
    """iBOT counts of any rows of any iteration, as the teacher's and every student's loader mask them."""
    d, tr = topo.data, topo.train
    grid = d.global_crop_size // topo.teacher_spec().patch_size
    return MaskCounter(tr.global_batch_size, num_samples, tr.seed, (grid, grid),
                       d.mask_probability, tuple(d.mask_ratio))


def exchange_plan(plan: RunPlan) -> ExchangePlan:
    return ExchangePlan(plan.global_batch_size, list(plan.teacher.ranks),
                        {g.name: list(g.ranks) for g in plan.groups if g.role == "student"},
                        even_batches=plan.even_batches)


def start_control(topo: Topology, rank: int, group: str, role: str, world: dict,
                  device: torch.device | None = None) -> ControlThread | None:
    """The rank's control-plane thread when a supervisor started it ($DINODIST_CONTROL), else None.

    Its key: $DINODIST_CONTROL_KEY from the supervisor's launcher, else derived from the secret in
    control.secret_env (launch files). On a CUDA `device` it also reports that GPU through NVML."""
    addr = os.environ.get(CONTROL_ENV)
    if not addr:
        return None
    c = topo.control
    key = rank_key_from_env(rank, group, c.secret_env)
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = device.index if device.index is not None else torch.cuda.current_device()
    return ControlThread(addr, rank, group, role, None, world, heartbeat_interval_s=c.heartbeat_interval_s,
                         key=key, cuda_device=cuda)


@contextlib.contextmanager
def reporting_to(control: ControlThread | None, rank: int, group: str) -> Iterator[None]:
    """The end of a rank's work: tell the supervisor `done`, or the error that ended it (naming the
    rank and group, so the job's failure line does), and leave the world on success.

    A preempted rank has checkpointed and is done with this run: `done` too, and its exit code
    (core.train.preempt.PREEMPTED_EXIT) tells the supervisor the rest. It does not leave the world
    politely: receives posted for iterations the teacher will never send are still pending."""
    try:
        yield
    except Preempted:
        if control is not None:
            control.close("done")
        raise
    except BaseException as exc:
        if control is not None:
            control.close("error", f"rank {rank} ({group}): {exc}")
        raise
    if control is not None:
        control.close("done")
    destroy()


def write_rank_record(out_dir: Path, rank: int, record: dict) -> None:
    """`<out>/logs/rank-<r>.json`: the rank's totals and its CPU seconds, which the summaries read."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    logs = Path(out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cpu = usage.ru_utime + usage.ru_stime
    (logs / f"rank-{rank}.json").write_text(json.dumps({**record, "cpu_seconds": cpu}))
