"""GPU smoke test and first numbers: one process, one GPU, under 8 minutes, one JSON object on stdout.

    python -m benchmarks.gpu_smoke [--budget-s 420] [--out FILE] [--only SECTION ...]

Sections, each guarded (an exception, an out-of-memory or its time limit is recorded as its `error`
and the next section runs; numbers measured before the failure are kept):

- `sdpa`: which SDPA backends (flash, efficient, cuDNN, math) run the attention of the H+ student
  (head_dim 64) and the 7B teacher (head_dim 128) at the global and local crop sizes, with q, k, v
  laid out as our blocks make them; and the kernel the default dispatch picks.
- `block`: one H+ block, forward + backward in bf16 at the plan's batch: eager (fp32 and bf16 RoPE)
  vs torch.compile (time to compile, then per step).
- `teacher`: the 7B teacher (built on meta, materialised in bf16 on the GPU, random weights) computing
  `teacher.targets.compute_targets` on the plan's 40 rows: images/s, achieved TFLOP/s against the cost
  model's assumed rate (orchestrator/cost.py: peak x utilisation), peak memory.
- `student`: the H+ student at the plan's per-rank batch, as `students/run.py` trains it (FSDP2 on a
  one-rank group, bf16 mixed precision, chunked losses, fused AdamW, bf16 RoPE) through
  `students.run.student_step`, with activation checkpointing `full` (the plan's) and `none`: step
  time, peak memory, and the activations saved up to the heads' bottleneck against the cost model's
  `student_activation_bytes` terms.
- `losses`: the chunked prototype losses at paper size (K = 262,144 / 98,304) on the H+ rank's rows in
  fp32, TF32 and bf16 matmul precision: time and relative change of each loss and gradient vs fp32.
- `h2d`: host-to-device copy bandwidth from pinned and from pageable memory.
- `syncs`: device-to-host syncs in one student step (ViT-S), counted by the profiler: CUDA
  synchronisations, device-to-host copies and the aten ops that read the device.

Without CUDA it prints one line to stderr ("gpu_smoke: skipped: ...") and exits 0, measuring nothing.
`--cpu-check` instead runs every section on the CPU with the tiny models of cpu-small.yaml: a check of
this script's own code, not a measurement. Exit code 1 when a section failed (the JSON still comes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "topologies" / "dinov3-paper.yaml"
CPU_SMALL = ROOT / "configs" / "topologies" / "cpu-small.yaml"
GIB = 1024**3
SKIPPED_EXIT = 0  # no CUDA: nothing to measure is not a failure

# seconds each section may take at most (all of them within --budget-s)
LIMITS = {"sdpa": 60, "block": 150, "teacher": 120, "student": 180, "losses": 90, "h2d": 30, "syncs": 90}


class SectionTimeout(Exception):
    pass


@dataclass
class Env:
    """What the sections share: the device, the topology and the sizes they measure at."""

    device: torch.device
    cpu_check: bool
    topo: object  # orchestrator.topology.Topology
    student: str  # the large student (H+)
    student_batch: int  # its plan's per-rank batch
    small_student: str  # for the sync count
    small_batch: int
    teacher_rows: int
    out_dir: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ------------------------------------------------------------------------------------------ helpers


def _sync(env: Env) -> None:
    if env.cuda:
        torch.cuda.synchronize()


def _timed(env: Env, fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(env)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(env)
        times.append(time.perf_counter() - t0)
    return times


def _reset_peak(env: Env) -> None:
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()


def _allocated(env: Env) -> int | None:
    return torch.cuda.memory_allocated() if env.cuda else None


def _peak(env: Env) -> int | None:
    return torch.cuda.max_memory_allocated() if env.cuda else None


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


_made_world: list[bool] = []


def _world(env: Env):
    """A one-rank process group (FSDP2 needs one), made once; an existing one is used as it is."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if env.cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _made_world.append(True)
    return dist.group.WORLD


def _batch(env: Env, rows: int, local_crops: int | None = None) -> dict:
    """A collated host batch of `rows` images as the loader makes it (random pixels, real masks)."""
    from dinodist.core.data.collate import collate
    from dinodist.core.data.masking import sample_masks

    d, spec = env.topo.data, env.topo.teacher_spec()
    n_local = d.local_crops if local_crops is None else local_crops
    grid = d.global_crop_size // spec.patch_size
    gen = torch.Generator().manual_seed(0)
    crops = {"global": torch.randn(rows, 2, 3, d.global_crop_size, d.global_crop_size, generator=gen),
             "local": torch.randn(rows, n_local, 3, d.local_crop_size, d.local_crop_size, generator=gen)}
    masks = sample_masks(list(range(rows)), list(range(rows)), (grid, grid), d.mask_probability,
                         tuple(d.mask_ratio))
    return collate(crops, masks)


# ----------------------------------------------------------------------------------------- sections


def section_sdpa(res: dict, env: Env) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dinodist.core.models.arch import num_tokens

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    d = env.topo.data
    for who, spec in (("student", env.topo.student_spec(env.student)), ("teacher", env.topo.teacher_spec())):
        for crop in (d.global_crop_size, d.local_crop_size):
            n, h, hd = num_tokens(spec, crop), spec.num_heads, spec.head_dim
            # our blocks' layout: qkv [B, N, 3, heads, hd] permuted to [3, B, heads, N, hd]
            qkv = torch.randn(4, n, 3, h, hd, device=env.device, dtype=torch.bfloat16)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            row = {"arch": spec.name, "head_dim": hd, "heads": h, "tokens": n}
            for name, backend in backends.items():
                try:
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, k, v)
                    row[name] = True
                except RuntimeError as exc:
                    row[name] = str(exc).strip().splitlines()[0][:200]
            row["default_kernels"] = _kernels(env, lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k,
                                                                                                      v))
            res[f"{who}_{crop}px"] = row


def _kernels(env: Env, fn: Callable[[], object]) -> list[str]:
    """Names of the device kernels (CPU ops on the CPU) that `fn` runs, most time first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if env.cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        _sync(env)
    kind = torch.autograd.DeviceType.CUDA if env.cuda else torch.autograd.DeviceType.CPU
    attr = "device_time_total" if env.cuda else "cpu_time_total"
    rows = [e for e in prof.key_averages() if getattr(e, "device_type", kind) == kind]
    rows.sort(key=lambda e: -getattr(e, attr, 0.0))
    return [e.key[:120] for e in rows][:4]


def section_block(res: dict, env: Env) -> None:
    from dinodist.core.models import build_backbone
    from dinodist.core.models.arch import num_tokens

    spec = env.topo.student_spec(env.student)
    d = env.topo.data
    backbone = build_backbone(spec.name, device=env.device, depth=1)
    block = backbone.blocks[0].to(torch.bfloat16)
    grid = d.global_crop_size // spec.patch_size
    sin, cos = backbone.rope_embed.eval()(grid, grid)
    b, n = 2 * env.student_batch, num_tokens(spec, d.global_crop_size)
    x = torch.randn(b, n, spec.embed_dim, device=env.device, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    res.update({"arch": spec.name, "tokens": [b, n, spec.embed_dim], "dtype": "bf16", "pass": "fwd+bwd"})

    def step(fn, rope):
        def run():
            x.grad = None
            block.zero_grad(set_to_none=True)
            fn(x, rope).backward(gy)
        return run

    repeats = 2 if env.cpu_check else 5
    res["eager_ms"] = 1e3 * statistics.median(_timed(env, step(block, (sin, cos)), repeats, warmup=2))
    rope16 = (sin.bfloat16(), cos.bfloat16())
    res["eager_bf16_rope_ms"] = 1e3 * statistics.median(_timed(env, step(block, rope16), repeats, warmup=2))
    if env.cpu_check:
        res["compiled"] = "skipped in --cpu-check"
        return
    compiled = torch.compile(block)
    t0 = time.perf_counter()
    step(compiled, (sin, cos))()
    _sync(env)
    res["compile_s"] = time.perf_counter() - t0
    res["compiled_ms"] = 1e3 * statistics.median(_timed(env, step(compiled, (sin, cos)), repeats, warmup=2))
    res["compiled_speedup"] = res["eager_ms"] / res["compiled_ms"]


def _teacher_model(env: Env):
    """The topology's teacher with heads, built on meta and materialised on the device: bf16 parameters
    (the GPU teacher's), fp32 buffers (RoPE periods), random trunc-normal weights."""
    from dinodist.core.models import build_backbone, build_head
    from dinodist.teacher.model import TeacherModel

    t = env.topo.teacher
    spec = env.topo.teacher_spec()
    backbone = build_backbone(t.arch, device="meta", **dict(t.overrides))
    dino = build_head(spec.embed_dim, env.topo.dino_head(), device="meta")
    ibot = build_head(spec.embed_dim, env.topo.ibot_head(), device="meta")
    model = TeacherModel(backbone, dino, ibot, "heads")
    if env.cuda:
        model.to(torch.bfloat16)  # on meta: free
        for m in model.modules():
            for name, buf in m._buffers.items():
                if buf is not None and buf.is_floating_point():
                    m._buffers[name] = buf.float()
    model.to_empty(device=env.device)
    backbone.init_weights()
    dino.init_weights()
    ibot.init_weights()
    return model.eval().requires_grad_(False)


def section_teacher(res: dict, env: Env) -> None:
    from dinodist.orchestrator.cost import device_profile, teacher_flops_per_image
    from dinodist.teacher.targets import compute_targets

    _reset_peak(env)
    t0 = time.perf_counter()
    model = _teacher_model(env)
    _sync(env)
    res["build_s"] = time.perf_counter() - t0
    res["parameters"] = sum(p.numel() for p in model.parameters())
    res["weights_gib"] = _gib(sum(p.numel() * p.element_size() for p in model.parameters()))
    rows = env.teacher_rows
    batch = _batch(env, rows, local_crops=0)
    batch = {k: (v.pin_memory() if env.cuda and torch.is_tensor(v) else v) for k, v in batch.items()}
    masked = int(batch["mask_indices_list"].numel())
    times = _timed(env, lambda: compute_targets(model, batch, 0, 0, "heads", env.device),
                   repeats=1 if env.cpu_check else 3)
    t = statistics.median(times)
    flops = teacher_flops_per_image(env.topo) * rows
    assumed = device_profile(env.topo).flops
    res.update({"arch": env.topo.teacher.arch, "rows": rows, "masked_patches": masked, "step_s": t,
                "images_per_s": rows / t, "achieved_tflops": flops / t / 1e12,
                "cost_model_tflops": assumed / 1e12, "achieved_over_assumed": flops / t / assumed,
                "peak_gib": _gib(_peak(env))})


def _student_rig(env: Env, name: str, batch_rows: int, mode: str) -> dict:
    """One student rank as students/run.py:train_student sets it up, on a one-rank group."""
    from dinodist.core.distributed import group_mesh
    from dinodist.core.models.rope import set_rope_dtype, student_rope_dtype
    from dinodist.core.train.optim import build_optimizer
    from dinodist.orchestrator.runtime.jobs import student_job
    from dinodist.students.loss import attach_chunked_losses
    from dinodist.students.model import build_student, make_ema, shard_student
    from dinodist.students.run import GroupContext

    group = _world(env)
    job = student_job(env.topo, name, env.out_dir)
    with torch.device(env.device):  # initialised where it trains: no host copy of the weights
        student = build_student(job.arch, job.overrides, job.kind, job.dino_head, job.ibot_head,
                                job.teacher_dim, job.seed)
    student.apply_activation_checkpointing(mode)
    set_rope_dtype(student, student_rope_dtype(env.device))
    ema = make_ema(student)
    mesh = group_mesh(group, [0], env.device.type)
    shard_student(student, mesh)
    shard_student(ema, mesh)
    chunked = job.loss.loss_chunk_rows > 0
    if chunked:
        attach_chunked_losses(student)
    o = job.optim
    optimizer = build_optimizer(student, len(student.backbone.blocks), layerwise_decay=o.layerwise_decay,
                                patch_embed_lr_mult=o.patch_embed_lr_mult, betas=o.betas)
    ctx = GroupContext(group, mesh, 0, 1, 0, batch_rows, env.device)
    batch = _batch(env, batch_rows)
    m = int(batch["mask_indices_list"].numel())
    gen = torch.Generator().manual_seed(1)
    t_dino, t_ibot = env.topo.dino_head(), env.topo.ibot_head()
    targets = {"dino": F.normalize(torch.randn(2 * batch_rows, t_dino.bottleneck_dim, generator=gen), dim=-1),
               "ibot": F.normalize(torch.randn(m, t_ibot.bottleneck_dim, generator=gen), dim=-1)}
    last_layers = {
        "dino_last_layer.weight": torch.randn(t_dino.n_prototypes, t_dino.bottleneck_dim, device=env.device)
        .mul_(0.02),
        "ibot_last_layer.weight": torch.randn(t_ibot.n_prototypes, t_ibot.bottleneck_dim, device=env.device)
        .mul_(0.02),
    }
    return {"job": job, "ctx": ctx, "student": student, "ema": ema, "optimizer": optimizer,
            "batch": batch, "targets": targets, "last_layers": last_layers, "chunked": chunked,
            "masked": m}


def _step(rig: dict, iteration: int = 0) -> tuple[float, float, dict]:
    from dinodist.students.run import student_step

    return student_step(rig["job"], rig["ctx"], rig["student"], rig["ema"], rig["optimizer"], rig["batch"],
                        rig["targets"], rig["last_layers"], iteration, group=rig["ctx"].group)


def _saved_to_bottleneck(env: Env, rig: dict) -> int | None:
    """Bytes a training forward keeps up to the heads' bottleneck (what the cost model's
    `student_activation_bytes` predicts): allocated memory after it minus before."""
    if not (env.cuda and rig["chunked"]):
        return None
    s, b = rig["student"], rig["batch"]
    dev = {k: (v.to(env.device) if torch.is_tensor(v) else v) for k, v in b.items()}
    before = torch.cuda.memory_allocated()
    out = s.head_inputs(dev["collated_global_crops"], dev["collated_local_crops"], dev["mask_indices_list"])
    zd = s.dino_head(out["cls"], no_last_layer=True)
    zi = s.ibot_head(out["patch"], no_last_layer=True)
    saved = torch.cuda.memory_allocated() - before
    del out, zd, zi, dev
    return saved


def section_student(res: dict, env: Env) -> None:
    from dinodist.orchestrator.cost import (
        activation_dtype_bytes,
        backbone_activation_bytes,
        head_saved_bytes,
        student_crops,
        student_flops_per_image,
    )

    topo, name, rows = env.topo, env.student, env.student_batch
    spec = topo.student_spec(name)
    e = 2 if env.cuda else activation_dtype_bytes(topo)
    res.update({"arch": spec.name, "batch_per_rank": rows,
                "plan_activation_checkpointing": str(topo.student(name).activation_checkpointing)})
    def measure(r: dict, mode: str) -> None:
        rig = _student_rig(env, name, rows, mode)
        r["params_and_ema_gib"] = _gib(_allocated(env))
        losses = []
        _step(rig)  # creates the optimizer state
        _sync(env)
        r["with_optimizer_state_gib"] = _gib(_allocated(env))
        _reset_peak(env)
        times = _timed(env, lambda: losses.append(_step(rig)), repeats=1 if env.cpu_check else 2, warmup=0)
        t = statistics.median(times)
        r.update({"step_s": t, "images_per_s": rows / t, "peak_gib": _gib(_peak(env)),
                  "loss": losses[-1][1], "terms": losses[-1][2]})
        if mode == "full":
            r["achieved_tflops"] = student_flops_per_image(topo, name) * rows / t / 1e12
        # after the step numbers, so a failure here loses nothing else
        saved = _saved_to_bottleneck(env, rig)
        r["measured_saved_gib"] = _gib(saved)
        if saved:
            r["predicted_over_measured"] = r["predicted_saved_gib"] / _gib(saved)

    for mode in ("full", "none"):  # the plan's first: "none" may not fit, and that is a result too
        r = res[mode] = {}
        r["predicted_saved_gib"] = _gib(backbone_activation_bytes(spec, rows, student_crops(topo), mode, e)
                                        + head_saved_bytes(topo, name, rows))
        try:
            measure(r, mode)
        except torch.OutOfMemoryError as exc:
            r["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0][:200]}"
        finally:
            gc.collect()
            if env.cuda:
                torch.cuda.empty_cache()


def section_losses(res: dict, env: Env) -> None:
    from dinodist.core.losses import dino_loss_chunked, ibot_loss_chunked, sinkhorn_knopp_chunked
    from dinodist.orchestrator.cost import masked_patches_per_image

    topo, name, rows = env.topo, env.student, env.student_batch
    dino, ibot = topo.student_heads(name)
    t_dino, t_ibot = topo.dino_head(), topo.ibot_head()
    n_local, chunk = topo.data.local_crops, topo.train.loss_chunk_rows
    m = math.ceil(rows * masked_patches_per_image(topo, topo.student_spec(name).patch_size))
    gen = torch.Generator(device=env.device).manual_seed(0)
    temp_t, temp_s = topo.train.teacher_temp, topo.train.student_temp

    def unit(*shape, dtype=torch.float32):
        return F.normalize(torch.randn(*shape, generator=gen, device=env.device), dim=-1).to(dtype)

    # teacher side fp32 (as received), student side bf16 (as FSDP's mixed precision hands it over)
    tx_d, tw_d = unit(2 * rows, t_dino.bottleneck_dim), unit(t_dino.n_prototypes, t_dino.bottleneck_dim)
    tx_i, tw_i = unit(m, t_ibot.bottleneck_dim), unit(t_ibot.n_prototypes, t_ibot.bottleneck_dim)
    sx_d = unit(2 + n_local, rows, dino.bottleneck_dim, dtype=torch.bfloat16)
    sw_d = unit(dino.n_prototypes, dino.bottleneck_dim, dtype=torch.bfloat16)
    sx_i = unit(m, ibot.bottleneck_dim, dtype=torch.bfloat16)
    sw_i = unit(ibot.n_prototypes, ibot.bottleneck_dim, dtype=torch.bfloat16)
    masks = torch.zeros(2 * rows, m // (2 * rows) + 1, dtype=torch.bool, device=env.device)
    masks.view(-1)[:m] = True
    weights = torch.full((m,), 1.0 / masks.shape[1], device=env.device)
    res.update({"rows_dino": rows * (2 + n_local), "rows_ibot": m, "k_dino": dino.n_prototypes,
                "k_ibot": ibot.n_prototypes, "chunk_rows": chunk})

    def run(precision: str) -> dict:
        leaves = [t.clone().requires_grad_() for t in (sx_d, sw_d, sx_i, sw_i)]
        xd, wd, xi, wi = leaves
        sk_d = sinkhorn_knopp_chunked(tx_d, tw_d, temp_t, chunk_rows=chunk, precision=precision)
        sk_i = sinkhorn_knopp_chunked(tx_i, tw_i, temp_t, chunk_rows=chunk, precision=precision)
        out = {
            "dino_global": dino_loss_chunked(xd[:2], wd, sk_d, temp_s, ignore_diagonal=True, chunk_rows=chunk,
                                             precision=precision),
            "dino_local": dino_loss_chunked(xd[2:], wd, sk_d, temp_s, chunk_rows=chunk, precision=precision),
            "ibot": ibot_loss_chunked(xi, wi, sk_i, masks, temp_s, weights, chunk_rows=chunk,
                                      precision=precision),
        }
        sum(out.values()).backward()
        return {**{k: v.detach() for k, v in out.items()}, "grads": [t.grad.float() for t in leaves]}

    results = {}
    for precision in ("fp32", "tf32", "bf16"):
        got: dict = {}
        repeats = 1 if env.cpu_check else 2
        times = _timed(env, lambda got=got, p=precision: got.update(run(p)), repeats=repeats)
        results[precision] = got
        row = {"s": statistics.median(times)}
        if precision != "fp32":
            ref = results["fp32"]
            for k in ("dino_global", "dino_local", "ibot"):
                row[f"{k}_rel_change"] = float((got[k] - ref[k]).abs() / ref[k].abs())
            row["grad_rel_change_max"] = max(float((g - r).abs().max() / r.abs().max())
                                             for g, r in zip(got["grads"], ref["grads"]))
            row["speedup_vs_fp32"] = res["fp32"]["s"] / row["s"]
        else:
            row.update({k: float(got[k]) for k in ("dino_global", "dino_local", "ibot")})
        res[precision] = row


def section_h2d(res: dict, env: Env) -> None:
    if not env.cuda:
        res["skipped"] = "needs CUDA"
        return
    n = 512 * 1024**2
    pageable = torch.empty(n, dtype=torch.uint8).fill_(1)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device=env.device)
    res["bytes"] = n
    for name, src, nb in (("pageable", pageable, False), ("pinned", pinned, True)):
        t = statistics.median(_timed(env, lambda src=src, nb=nb: dst.copy_(src, non_blocking=nb), repeats=5))
        res[f"{name}_gb_s"] = n / t / 1e9
    t = statistics.median(_timed(env, lambda: pinned.copy_(dst, non_blocking=True), repeats=5))
    res["device_to_pinned_gb_s"] = n / t / 1e9


# what the profiler shows for the host waiting on the device
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
_READ_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::equal", "aten::is_nonzero")


def section_syncs(res: dict, env: Env) -> None:
    from torch.profiler import ProfilerActivity, profile

    rig = _student_rig(env, env.small_student, env.small_batch, "full")
    res.update({"arch": rig["job"].arch, "batch": env.small_batch})
    for it in range(2):  # the first steps create the optimizer state and warm the allocator
        _step(rig, it)
    _sync(env)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    with profile(activities=activities) as prof:
        _step(rig, 2)  # no explicit synchronize inside: only what the step itself does
    counts: dict[str, int] = {}
    for ev in prof.events():
        name = ev.name
        if name in _SYNC_CALLS or name in _READ_OPS or name.startswith("Memcpy DtoH"):
            counts[name] = counts.get(name, 0) + 1
    res["counts"] = counts
    res["host_waits"] = sum(v for k, v in counts.items() if k in _SYNC_CALLS)
    # the aten ops count reads of host tensors too (harmless); the copies are device-to-host only
    res["device_to_host_copies"] = sum(v for k, v in counts.items() if k.startswith("Memcpy DtoH"))
    res["expected"] = "1 host wait, 1 copy: the losses' one read after the optimizer step (students/run.py)"


SECTIONS: dict[str, Callable[[dict, Env], None]] = {
    "sdpa": section_sdpa, "block": section_block, "teacher": section_teacher, "student": section_student,
    "losses": section_losses, "h2d": section_h2d, "syncs": section_syncs,
}


# --------------------------------------------------------------------------------------------- main


def _on_alarm(signum, frame):
    raise SectionTimeout()


def run_section(name: str, env: Env, results: dict, deadline: float) -> None:
    res = results[name] = {}
    left = deadline - time.monotonic()
    if left < 5:
        res["skipped"] = "the time budget is spent"
        return
    limit = max(1, int(min(LIMITS[name], left)))
    # A caller's own timer (pytest-timeout uses this one) is put back afterwards, less the time spent.
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, limit)
    t0 = time.perf_counter()
    try:
        SECTIONS[name](res, env)
    except SectionTimeout:
        res["error"] = f"timed out after {limit} s"
    except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' numbers
        res["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
        res["where"] = traceback.format_exc().strip().splitlines()[-3][:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.perf_counter() - t0), 1e-3))
        res["seconds"] = round(time.perf_counter() - t0, 2)
        gc.collect()
        if env.cuda:
            torch.cuda.empty_cache()


def _env(args: argparse.Namespace) -> Env:
    from dinodist.orchestrator.allocate import make_plan
    from dinodist.orchestrator.topology import load_topology

    out_dir = Path(args.out_dir)
    if args.cpu_check:
        topo = load_topology(CPU_SMALL)
        return Env(torch.device("cpu"), True, topo, "tiny-vitb", 4, "tiny-vits", 4, 4, out_dir)
    topo = load_topology(PAPER)
    plan = make_plan(topo)
    big = max((g for g in plan.groups if g.role == "student"), key=lambda g: g.flops_per_image)
    small = min((g for g in plan.groups if g.role == "student"), key=lambda g: g.flops_per_image)
    return Env(torch.device("cuda"), False, topo, big.name, big.batch_per_rank, small.name,
               min(small.batch_per_rank, 64), plan.group("teacher").batch_per_rank, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=420.0, help="all sections together (default 420)")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    ap.add_argument("--out", help="also write the JSON here, rewritten after every section")
    ap.add_argument("--out-dir", default="/tmp/dinodist-gpu-smoke", help="scratch folder of the student jobs")
    ap.add_argument("--cpu-check", action="store_true", help="tiny models on the CPU: checks the script only")
    args = ap.parse_args(argv)
    if not args.cpu_check and not torch.cuda.is_available():
        print(f"gpu_smoke: skipped: CUDA is not available (torch {torch.__version__}); nothing measured",
              file=sys.stderr)
        return SKIPPED_EXIT
    deadline = time.monotonic() + args.budget_s
    env = _env(args)
    results: dict = {"torch": torch.__version__, "cpu_check": env.cpu_check}
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        results.update({"device": props.name, "capability": list(torch.cuda.get_device_capability()),
                        "memory_gib": _gib(props.total_memory), "cuda": torch.version.cuda})
    results.update({"large_student": env.student, "large_student_batch": env.student_batch,
                    "teacher_rows": env.teacher_rows, "small_student": env.small_student,
                    "small_student_batch": env.small_batch})
    failed = []
    for name in args.only or list(SECTIONS):
        print(f"gpu_smoke: {name} ...", file=sys.stderr, flush=True)
        run_section(name, env, results, deadline)
        if "error" in results[name]:
            failed.append(name)
        print(f"gpu_smoke: {name}: {json.dumps(results[name])[:300]}", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    if _made_world:
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        _made_world.clear()
    print(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
