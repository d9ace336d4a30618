"""The SSL training loop: data -> schedules -> step -> update -> EMA -> metrics -> checkpoints.

Determinism: the batch of iteration t is a pure function of (seed, t) (core.data), every schedule is a
pure function of t, and the checkpoint holds model, EMA teacher, Gram teacher, optimizer and every rank's
RNG state. A run killed after a checkpoint and resumed therefore continues the same loss trajectory
bit for bit (CPU). metrics.jsonl lines past the resumed iteration are dropped before writing new ones.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from dinodist.core.checkpoint import (
    MARKER,
    latest_valid_checkpoint,
    load_checkpoint,
    load_model_only,
    save_checkpoint,
)
from dinodist.core.data.augment import CropConfig
from dinodist.core.data.device import prepare_batch
from dinodist.core.data.loader import BatchLoader
from dinodist.core.data.sources import build_source
from dinodist.core.errors import DinodistError
from dinodist.core.ssl.config import Resolution, StageConfig, dump_config
from dinodist.core.ssl.model import (
    SSLModel,
    build_ssl_model,
    checkpoint_and_compile,
    load_tower,
    read_teacher_export,
)
from dinodist.core.ssl.optim import build_optimizer
from dinodist.core.ssl.schedules import lr_scale_factor, scaled, schedule_value
from dinodist.core.ssl.step import StepScalars, compute_losses
from dinodist.core.train.ema import copy_weights
from dinodist.core.train.metrics import open_metrics, write_record
from dinodist.core.train.update import optimizer_step


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolutions(cfg: StageConfig) -> list[Resolution]:
    c = cfg.crops
    if c.resolutions:
        return list(c.resolutions)
    return [Resolution(global_size=c.global_size, local_size=c.local_size, gram_size=c.gram_size)]


def resolution_index(cfg: StageConfig, iteration: int) -> int:
    """Which (global, local, gram) tuple iteration t uses: a fixed-seed draw, identical on every rank."""
    res = resolutions(cfg)
    if len(res) == 1:
        return 0
    seed = (cfg.crops.resolution_seed * 0x9E3779B1 + iteration * 0x85EBCA77) % (2**63 - 1)
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor([r.prob for r in res], dtype=torch.float64)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _crop_config(cfg: StageConfig, r: Resolution) -> CropConfig:
    c = cfg.crops
    return CropConfig(
        global_size=r.global_size,
        local_size=r.local_size,
        n_local=c.n_local,
        global_scale=tuple(c.global_scale),
        local_scale=tuple(c.local_scale),
        flips=c.flips,
        gram_size=r.gram_size,
        gram_no_distortions=c.gram_no_distortions,
    )


class _Batches:
    """One loader per resolution, each building ahead only the iterations that use its resolution.

    `data.workers` worker processes and `data.uint8` crops apply as in the distillation loaders; on a
    CUDA `device` batches are pinned in the loader's thread, so the copy in the loop is non-blocking.
    """

    def __init__(self, cfg: StageConfig, rank: int, world: int, patch_size: int,
                 device: torch.device | None = None) -> None:
        g = cfg.data.global_batch_size
        b = g // world
        source = build_source(cfg.data.source)
        if len(source) == 0:
            raise DinodistError(f"data.source {cfg.data.source!r}: no images")
        self.cfg = cfg
        res = resolutions(cfg)
        # a loader's worker processes serve only its resolution: split the configured ones among them
        workers = -(-cfg.data.workers // len(res)) if cfg.data.workers else 0
        self.loaders = [
            BatchLoader(
                source, _crop_config(cfg, r), g, cfg.seed, slice(rank * b, (rank + 1) * b), patch_size,
                mask_prob=cfg.data.mask_prob, mask_ratio=tuple(cfg.data.mask_ratio),
                prefetch=cfg.data.prefetch, workers=workers, uint8=cfg.data.uint8, device=device,
                owns=None if len(res) == 1 else (lambda t, i=i: resolution_index(cfg, t) == i),
            )
            for i, r in enumerate(res)
        ]

    def get(self, it: int) -> dict:
        return self.loaders[resolution_index(self.cfg, it)].get(it)

    def close(self) -> None:
        for ld in self.loaders:
            ld.close()


def _load_initial_weights(model: SSLModel, cfg: StageConfig) -> None:
    """Before sharding: student from a teacher (highres), Gram teacher from `gram.checkpoint`."""
    if cfg.init.checkpoint and cfg.init.mode == "teacher":
        src = cfg.init.checkpoint
        if Path(src).is_dir():
            ck = find_checkpoint(src, "init.checkpoint")
            load_model_only(ck, model.student, prefix="teacher")
        else:
            state, _ = read_teacher_export(src)
            load_tower(model.student, state, src)
        copy_weights(model.teacher, model.student)
    if model.gram_teacher is not None:
        src = cfg.gram.checkpoint
        if Path(src).is_dir():
            ck = find_checkpoint(src, "gram.checkpoint")
            load_model_only(ck, model.gram_teacher, prefix="teacher.backbone")
        else:
            state, _ = read_teacher_export(src)
            sub = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            try:
                model.gram_teacher.load_state_dict(sub)
            except RuntimeError as exc:
                line = str(exc).strip().splitlines()[0]
                raise DinodistError(f"gram.checkpoint {src}: does not match the model ({line[:160]})") \
                    from None


def find_checkpoint(run_dir: str | Path, field: str) -> Path:
    """Latest complete checkpoint of a run dir (or its ckpt/ folder, or one checkpoint dir itself)."""
    p = Path(run_dir)
    root = p / "ckpt" if (p / "ckpt").is_dir() else p
    ck = latest_valid_checkpoint(root)
    if ck is None:
        if (p / MARKER).is_file():
            return p
        raise DinodistError(f"{field}: no checkpoint found under {run_dir}")
    return ck


def _reduce_mean(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[n].float().reshape(()) for n in names])
    if world > 1:
        dist.all_reduce(stacked)  # gloo has no AVG
        stacked = stacked / world
    return {n: float(v) for n, v in zip(names, stacked.tolist())}


class _Progress:
    def __init__(self, enabled: bool, start: int, total: int, every: int) -> None:
        self.every, self.total = every, total
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def update(self, it: int, rec: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            self.bar.update(1)
        elif (it + 1) % self.every == 0 or it + 1 == self.total:
            print(
                f"it {it + 1}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
                f"{rec['step_seconds']:.3f} s/it",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    cfg: StageConfig,
    out_dir: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) a stage in this process (one rank of the current world). Returns a summary.

    `stop_at`: leave after that many completed iterations with a checkpoint, as an interrupted run would
    (the schedules still span `train.iterations`).
    """
    rank, world = _rank_world()
    out = Path(out_dir)
    total = cfg.train.iterations
    g = cfg.data.global_batch_size
    if g % world:
        raise DinodistError(f"data.global_batch_size {g} is not divisible by the {world} ranks")
    if g // world < 2:
        raise DinodistError(f"data.global_batch_size {g}: each of the {world} ranks needs at least 2 images")
    use_gram = cfg.stage in ("gram", "highres")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    group = dist.group.WORLD if world > 1 else None

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    model = build_ssl_model(cfg.model, use_gram, cfg.seed)
    if not resume:
        _load_initial_weights(model, cfg)
    checkpoint_and_compile(model, cfg.train.activation_checkpointing, cfg.train.compile)  # before FSDP
    if device is not None:
        model.to(device)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type if device is not None else "cpu", (world,))
        from dinodist.core.ssl.model import shard_model

        shard_model(model, mesh, param_dtype=torch.bfloat16 if device is not None else None)
        # The backbone returns views of its normed tokens (x_norm_clstoken = x[:, 0]); step.py never
        # modifies them in place, which is what this FSDP2 warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    optimizer = build_optimizer(model.student, model.depth, cfg.optim)

    start, refreshes = 0, 0
    # Training randomness (RoPE augmentation, drop path) differs per rank.
    torch.manual_seed(cfg.seed * 7919 + 1 + rank)
    if resume:
        # a torn newest checkpoint (killed mid-save on a filesystem without atomic rename, a truncated
        # shard) is skipped with a warning naming it: resume then costs one more interval, not the run
        ck = latest_valid_checkpoint(out / "ckpt")
        if ck is None:
            raise DinodistError(f"--resume: no complete checkpoint under {out / 'ckpt'}")
        meta = load_checkpoint(ck, model, optimizer)
        start, refreshes = int(meta["iteration"]), int(meta.get("gram_refreshes", 0))
    elif cfg.init.checkpoint and cfg.init.mode == "continue":
        ck = find_checkpoint(cfg.init.checkpoint, "init.checkpoint")
        view = torch.nn.ModuleDict({"student": model.student, "teacher": model.teacher})
        meta = load_checkpoint(ck, view, optimizer, restore_rng=False)
        start = int(meta["iteration"])
    if start >= total:
        raise DinodistError(f"train.iterations {total}: the run is already at iteration {start}")

    lr_sched = scaled(cfg.optim.lr, lr_scale_factor(cfg.optim.lr_scaling, g))
    batches = _Batches(cfg, rank, world, model.student.backbone.patch_size, device)
    bar = _Progress(progress and rank == 0, start, total, cfg.train.log_every)
    end = total if stop_at is None else min(total, stop_at)
    last: dict = {}
    metrics = open_metrics(out / "metrics.jsonl", start) if rank == 0 else None
    try:
        for it in range(start, end):
            t0 = time.perf_counter()
            batch = batches.get(it)
            # uint8 crops are normalised here, on the device (on CPU too: the model takes floats)
            batch = prepare_batch(batch, device if device is not None else torch.device("cpu"))
            lr = schedule_value(lr_sched, it, total)
            wd = schedule_value(cfg.optim.weight_decay, it, total)
            momentum = schedule_value(cfg.loss.ema_momentum, it, total)
            scalars = StepScalars(
                teacher_temp=schedule_value(cfg.loss.teacher_temp, it, total),
                local_weight=schedule_value(cfg.loss.local_weight, it, total),
                gram_weight=schedule_value(cfg.loss.gram_weight, it, total),
            )
            loss, terms = compute_losses(model, batch, scalars, cfg.loss, cfg.gram, use_gram, group)
            logged = _reduce_mean({"loss": loss.detach(), **terms}, world)
            for name in ["loss"] + sorted(terms):
                if not math.isfinite(logged[name]):
                    raise DinodistError(
                        f"iteration {it}: loss term {name!r} is {logged[name]}; stopped before the update "
                        f"(checkpoints under {out / 'ckpt'} untouched)"
                    )
            norms = optimizer_step(
                loss, optimizer, model.student, model.teacher, lr=lr, wd=wd, clip_grad=cfg.optim.clip_grad,
                momentum=momentum, freeze_last_layer=it < cfg.optim.freeze_last_layer_iters,
            )
            gc = cfg.gram
            if (
                model.gram_teacher is not None and gc.refresh_every and refreshes < gc.max_refreshes
                and it + 1 >= gc.refresh_from and (it + 1) % gc.refresh_every == 0
            ):
                copy_weights(model.gram_teacher, model.teacher.backbone)
                refreshes += 1
            rec = {"iteration": it, **logged, "lr": lr, "wd": wd, "momentum": momentum,
                   "teacher_temp": scalars.teacher_temp, "local_weight": scalars.local_weight}
            if use_gram:
                rec["gram_weight"] = scalars.gram_weight
                rec["gram_refreshes"] = refreshes
            if len(batches.loaders) > 1:
                r = resolutions(cfg)[resolution_index(cfg, it)]
                rec["resolution"] = [r.global_size, r.local_size, r.gram_size]
            rec["grad_norm"] = float(norms.get("backbone", 0.0))
            rec["step_seconds"] = time.perf_counter() - t0
            rec["images"] = g
            if metrics is not None:
                write_record(metrics, rec)
            bar.update(it, rec)
            last = rec
            done = it + 1
            if done % cfg.train.checkpoint_every == 0 or done == end:
                save_checkpoint(
                    out / "ckpt", done, model, optimizer,
                    meta={"stage": cfg.stage, "gram_refreshes": refreshes},
                    keep=cfg.train.keep_checkpoints,
                )
    finally:
        bar.close()
        batches.close()
        if metrics is not None:
            metrics.close()
    return {"iterations": end, "start": start, "last": last, "out": str(out)}


def build_for_export(cfg: StageConfig) -> SSLModel:
    """An unsharded model of a run's config, for export/eval in one process."""
    return build_ssl_model(cfg.model, cfg.stage in ("gram", "highres"), cfg.seed)
