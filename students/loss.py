"""Distillation losses of one student group, from its rows' teacher targets.

Teacher side (per group, on its own rows): the teacher heads' last layers turn the received
bottleneck vectors into logits, Sinkhorn-Knopp centres them over the whole group (all-reduce in
the group's process group), giving probabilities. Student side: DINO on the 2 global crops
(ignoring same-crop pairs) and the n local crops, iBOT at the masked positions, KoLeo on each
global crop's CLS. Scales generalise the official 2/18 and 16/18 to n local crops:
global_terms = 2 * (2 - 1), local_terms = 2 * n, each scaled by its share of all terms.

Two ways to the same numbers (LossConfig.loss_chunk_rows, the topology's `train.loss_chunk_rows`):
0 materialises the [rows, K] logits of teacher and student (the heads' full forward);
> 0 streams them over chunks of rows (core.losses.chunked), so at paper scale (K = 262,144) a rank
never holds them whole. The chunked prototype losses must run *inside* each head's FSDP unit: they
read the head's unsharded `last_layer.weight` and return its gradient, so `attach_chunked_losses`
registers them (and the backbone pass that feeds them) as FSDP forward methods.

Every term is a mean over the rank's rows (DINO over crops x rows, iBOT over crops, KoLeo over
rows per crop, features over rows): on uneven shares students/run.py rescales the total by
core.rows.loss_scale so the group's averaged gradient is the full-batch gradient.

Agreement with the teacher (`quality`, measured every iteration, never part of the loss): on the
rank's 2 x rows global crops, `teacher_agreement` is the fraction whose student DINO prototype argmax
(the student's own logits, what the cross-entropy trains) equals the argmax of the teacher's target for
that crop (its bottleneck through its `last_layer`, then Sinkhorn-Knopp over the group: the very
distribution the student is trained towards. Before Sinkhorn-Knopp a weak teacher, e.g. the README
demo's, puts every crop on the same prototype, and agreement would read 0 however well the student
follows its targets), and `teacher_cosine` the mean cosine between the two centred
logit vectors of the same crop (the Pearson correlation of their prototype scores; centring removes the
per-row offset softmax ignores). Logits, not bottlenecks: a student's head is its own, trained only
through its own prototype layer, so its bottleneck space is an arbitrary rotation of the teacher's and
their cosine would measure nothing. `features` targets: `teacher_cosine` is the mean cosine of the
projected student CLS and the teacher's CLS (1 - the `cls_cosine` term); there is no agreement. All of it
is computed under no_grad from detached tensors, so losses and gradients are bit for bit those of a run
without it; the chunked path computes it chunk by chunk inside the DINO head's FSDP unit, holding at
most the [chunk, K] logits of a student and a teacher chunk at a time.

The terms come back as detached 0-dim tensors, not Python floats: reading a GPU tensor into Python
waits for the device, and the step reads all of them at once, after the optimizer step.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dinodist.core.errors import DinodistError
from dinodist.core.losses import (
    PRECISIONS,
    SinkhornScaling,
    dino_loss,
    dino_loss_chunked,
    ibot_loss,
    ibot_loss_chunked,
    koleo_loss,
    sinkhorn_knopp,
    sinkhorn_knopp_chunked,
)
from dinodist.core.targets import HEADS

N_GLOBAL = 2


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """A student's loss settings; defaults as for StudentOptim: the topology's, except recipe constants."""

    teacher_temp: float
    student_temp: float
    ibot_weight: float
    koleo_weight: float
    # rows per chunk of the prototype losses (train.loss_chunk_rows); 0: full logits
    loss_chunk_rows: int
    # matmul mode of the chunked losses (core/losses/chunked.py, train.loss_precision): "auto" = fp32 on
    # CPU, TF32 on CUDA
    loss_precision: str
    dino_weight: float = 1.0
    local_dino_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_chunk_rows < 0:
            raise DinodistError(f"train.loss_chunk_rows must be >= 0, got {self.loss_chunk_rows}")
        if self.loss_precision not in PRECISIONS:
            raise DinodistError(f"loss precision must be one of {', '.join(PRECISIONS)}, "
                                f"got {self.loss_precision!r}")


def dino_scales(n_local: int) -> tuple[float, float]:
    """(global_scale, local_scale): each DINO term's share of all crop pairs (2/18, 16/18 for n=8)."""
    global_terms = N_GLOBAL * (N_GLOBAL - 1)
    local_terms = N_GLOBAL * n_local
    total = global_terms + local_terms
    return global_terms / total, local_terms / total


def teacher_probs(targets: dict[str, torch.Tensor], last_layers: dict[str, torch.Tensor], temp: float,
                  group=None) -> dict[str, torch.Tensor]:
    """Crop-major bottleneck targets -> Sinkhorn-Knopp probabilities over the group.

    DINO: [2B, Db] -> [2, B, K] (SK's batch is both global crops of the group's rows, 2G);
    iBOT: [M, Di] -> [M, Ki] (SK's batch is the group's masked-patch count).
    """
    dino_logits = targets["dino"].float() @ last_layers["dino_last_layer.weight"].float().t()
    ibot_logits = targets["ibot"].float() @ last_layers["ibot_last_layer.weight"].float().t()
    dino = sinkhorn_knopp(dino_logits, temp, group=group)
    ibot = sinkhorn_knopp(ibot_logits, temp, group=group)
    return {"dino": dino.view(N_GLOBAL, -1, dino.shape[-1]), "ibot": ibot}


def _detached(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def agreement_sums_(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    teacher_probs: torch.Tensor) -> torch.Tensor:
    """[2] float32 of [n, K] rows: (rows where the student logits' argmax is the teacher target's,
    sum over rows of the cosine of the centred student and teacher logits).

    Centres the logits in place (they must be the caller's own temporaries): no [n, K] copy is made
    beyond them, which is what lets the chunked path call it on each chunk's fresh logits.
    """
    s, t = student_logits, teacher_logits
    agree = (s.argmax(-1) == teacher_probs.argmax(-1)).sum().float()
    s.sub_(s.mean(-1, keepdim=True))
    t.sub_(t.mean(-1, keepdim=True))
    dot = torch.bmm(s.unsqueeze(1), t.unsqueeze(2)).view(-1)  # row dot products without an [n, K] product
    cos = dot / (torch.linalg.vector_norm(s, dim=-1) * torch.linalg.vector_norm(t, dim=-1)).clamp_min(1e-12)
    return torch.stack([agree, cos.sum()])


def _quality(sums: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    means = sums / rows
    return {"teacher_agreement": means[0], "teacher_cosine": means[1]}


def heads_loss(out: dict[str, torch.Tensor], probs: dict[str, torch.Tensor], batch: dict, n_local: int,
               cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total distillation loss and its terms (detached 0-dim tensors, for metrics)."""
    b = probs["dino"].shape[1]
    logits = out["dino"].float()
    g_logits = logits[: N_GLOBAL * b].view(N_GLOBAL, b, -1)
    g_scale, l_scale = dino_scales(n_local)
    dino_global = dino_loss(g_logits, probs["dino"], student_temp=cfg.student_temp, ignore_diagonal=True)
    total = cfg.dino_weight * g_scale * dino_global
    terms = {"dino_global": dino_global}
    if n_local:
        l_logits = logits[N_GLOBAL * b:].view(n_local, b, -1)
        dino_local = dino_loss(l_logits, probs["dino"], student_temp=cfg.student_temp)
        total = total + cfg.dino_weight * cfg.local_dino_weight * l_scale * dino_local
        terms["dino_local"] = dino_local
    ibot = ibot_loss(out["ibot"].float(), probs["ibot"], batch["collated_masks"],
                     student_temp=cfg.student_temp, masks_weight=batch["masks_weight"])
    total = total + cfg.ibot_weight * ibot
    terms["ibot"] = ibot
    koleo = torch.stack([koleo_loss(c) for c in out["g_cls"].float().chunk(N_GLOBAL)]).mean()
    total = total + cfg.koleo_weight * N_GLOBAL * koleo
    terms["koleo"] = koleo
    return total, _detached(terms)


def features_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                  cfg: LossConfig,
                  quality: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backbone-feature targets: cosine distance on CLS, smooth-L1 on patch tokens (both crops).

    `quality`: filled with `teacher_cosine`, the mean CLS cosine (module docstring)."""
    mean_cos = F.cosine_similarity(out["proj_cls"].float(), targets["cls"].float(), dim=-1).mean()
    cos = 1.0 - mean_cos
    if quality is not None:
        quality["teacher_cosine"] = mean_cos.detach()
    patch = F.smooth_l1_loss(out["proj_patch"].float(), targets["patch"].float())
    koleo = torch.stack([koleo_loss(c) for c in out["g_cls"].float().chunk(N_GLOBAL)]).mean()
    total = cos + patch + cfg.koleo_weight * N_GLOBAL * koleo
    return total, _detached({"cls_cosine": cos, "patch_smooth_l1": patch, "koleo": koleo})


def distill_loss(kind: str, out: dict, targets: dict, last_layers: dict | None, batch: dict, n_local: int,
                 cfg: LossConfig, group=None,
                 quality: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms from `Student.forward`'s outputs. `quality`: filled with the agreement
    measures of the module docstring (0-dim tensors, this rank's means)."""
    if kind == HEADS:
        with torch.no_grad():
            probs = teacher_probs(targets, last_layers, cfg.teacher_temp, group)
            if quality is not None:
                # a copy: agreement_sums_ centres in place, and these logits are the loss's own
                crops = targets["dino"].shape[0]  # the global crops, crop-major as the student's rows
                s_logits = out["dino"][:crops].detach().to(torch.float32, copy=True)
                t_logits = targets["dino"].float() @ last_layers["dino_last_layer.weight"].float().t()
                t_probs = probs["dino"].reshape(crops, -1)
                quality.update(_quality(agreement_sums_(s_logits, t_logits, t_probs), crops))
        return heads_loss(out, probs, batch, n_local, cfg)
    return features_loss(out, targets, cfg, quality)


# ----------------------------------------------------------------------------------- chunked


def _head_inputs(student: nn.Module, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                 mask_indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Student.forward up to the heads: `g_cls` [2B, D], `cls` [2B + nB, D], `patch` [M, D] (masked)."""
    xs = [global_crops] + ([local_crops] if local_crops is not None and local_crops.numel() else [])
    outs = student.backbone.forward_features_list(xs, [None] * len(xs))
    g_cls = outs[0]["x_norm_clstoken"].clone()  # a copy: FSDP hooks outputs and warns about views
    cls_all = torch.cat([g_cls] + ([outs[1]["x_norm_clstoken"]] if len(outs) > 1 else []))
    flat = outs[0]["x_norm_patchtokens"].flatten(0, 1)
    return {"g_cls": g_cls, "cls": cls_all, "patch": flat.index_select(0, mask_indices.to(flat.device))}


def _bottleneck(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # the class's forward, not head(...): we already run inside the head's FSDP forward
    return type(head).forward(head, x, no_last_layer=True)


@torch.no_grad()
def agreement_sums_chunked(student_bottleneck: torch.Tensor, student_weight: torch.Tensor,
                           teacher: SinkhornScaling, chunk_rows: int) -> torch.Tensor:
    """`agreement_sums_` of `student_bottleneck @ student_weight.T`, the teacher's logits and its
    Sinkhorn-Knopp targets (`teacher.probs`), over row chunks: at most one [chunk_rows, K] matrix of
    each exists at a time."""
    teacher_bottleneck, teacher_weight = teacher.bottleneck, teacher.weight
    sums = torch.zeros(2, device=student_bottleneck.device)
    n = student_bottleneck.shape[0]
    # the weights as they are (bf16 under FSDP mixed precision): a float32 copy of a [K, Db] matrix per
    # call is what the metric must not cost at K = 262,144
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        s = (student_bottleneck[rows].detach().to(student_weight.dtype) @ student_weight.detach().t()).float()
        t = (teacher_bottleneck[rows].detach().to(teacher_weight.dtype) @ teacher_weight.detach().t()).float()
        sums += agreement_sums_(s, t, teacher.probs(rows))
    return sums


def _dino_terms(head: nn.Module, cls: torch.Tensor, teacher, n_local: int, cfg: LossConfig,
                rows: int, with_quality: bool = False) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                 torch.Tensor | None]:
    """(dino_global, dino_local, agreement sums or None) with the head's prototypes applied chunk by chunk.

    The agreement sums (`agreement_sums_chunked` on the global crops) are computed here because only
    inside the head's FSDP forward is its `last_layer.weight` unsharded."""
    z = _bottleneck(head, cls)
    w = head.last_layer.weight
    g = z[: N_GLOBAL * rows].view(N_GLOBAL, rows, -1)
    glob = dino_loss_chunked(g, w, teacher, cfg.student_temp, ignore_diagonal=True,
                             chunk_rows=cfg.loss_chunk_rows, precision=cfg.loss_precision)
    sums = None
    if with_quality:
        sums = agreement_sums_chunked(z[: N_GLOBAL * rows], w, teacher, cfg.loss_chunk_rows)
    if not n_local:
        return glob, None, sums
    loc = z[N_GLOBAL * rows:].view(n_local, rows, -1)
    return glob, dino_loss_chunked(loc, w, teacher, cfg.student_temp, chunk_rows=cfg.loss_chunk_rows,
                                   precision=cfg.loss_precision), sums


def _ibot_term(head: nn.Module, patch: torch.Tensor, teacher, masks: torch.Tensor, masks_weight: torch.Tensor,
               cfg: LossConfig) -> torch.Tensor:
    z = _bottleneck(head, patch)
    return ibot_loss_chunked(z, head.last_layer.weight, teacher, masks, cfg.student_temp, masks_weight,
                             chunk_rows=cfg.loss_chunk_rows, precision=cfg.loss_precision)


def attach_chunked_losses(student: nn.Module) -> None:
    """Give a (FSDP2-sharded) heads student the methods the chunked path calls, as FSDP forwards.

    FSDP2 all-gathers a unit's parameters only around `forward` and methods registered with
    `register_fsdp_forward_method`; the chunked losses use the heads' `last_layer.weight` directly,
    so they are such methods of the head units, and the backbone pass that stops before the heads
    is one of the root unit (Student.forward would apply the full prototype layer).
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    if not hasattr(student, "dino_head"):
        raise DinodistError("chunked losses (train.loss_chunk_rows > 0) need a heads student")
    for module, name, fn in ((student, "head_inputs", _head_inputs),
                             (student.dino_head, "dino_terms", _dino_terms),
                             (student.ibot_head, "ibot_term", _ibot_term)):
        setattr(module, name, types.MethodType(fn, module))
        register_fsdp_forward_method(module, name)


def chunked_heads_loss(student: nn.Module, batch: dict, targets: dict[str, torch.Tensor],
                       last_layers: dict[str, torch.Tensor], n_local: int, cfg: LossConfig,
                       group=None,
                       quality: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`heads_loss` of `student(...)` without any [rows, K] logits (student or teacher) held whole.

    Needs `attach_chunked_losses(student)` first. Same terms and scales as `distill_loss`; teacher
    Sinkhorn-Knopp over the group by `sinkhorn_knopp_chunked` (kept as factors, recomputed per chunk).
    `quality`: filled as by `distill_loss`, chunk by chunk.
    """
    c, prec = cfg.loss_chunk_rows, cfg.loss_precision
    with torch.no_grad():
        t_dino = sinkhorn_knopp_chunked(targets["dino"], last_layers["dino_last_layer.weight"],
                                        cfg.teacher_temp, group=group, chunk_rows=c, precision=prec)
        t_ibot = sinkhorn_knopp_chunked(targets["ibot"], last_layers["ibot_last_layer.weight"],
                                        cfg.teacher_temp, group=group, chunk_rows=c, precision=prec)
    rows = targets["dino"].shape[0] // N_GLOBAL
    local = batch.get("collated_local_crops")
    out = student.head_inputs(batch["collated_global_crops"], local, batch["mask_indices_list"])
    dino_global, dino_local, sums = student.dino_head.dino_terms(out["cls"], t_dino, n_local, cfg, rows,
                                                                 quality is not None)
    if quality is not None:
        quality.update(_quality(sums, N_GLOBAL * rows))
    g_scale, l_scale = dino_scales(n_local)
    total = cfg.dino_weight * g_scale * dino_global
    terms = {"dino_global": dino_global}
    if dino_local is not None:
        total = total + cfg.dino_weight * cfg.local_dino_weight * l_scale * dino_local
        terms["dino_local"] = dino_local
    ibot = student.ibot_head.ibot_term(out["patch"], t_ibot, batch["collated_masks"], batch["masks_weight"],
                                       cfg)
    total = total + cfg.ibot_weight * ibot
    terms["ibot"] = ibot
    koleo = torch.stack([koleo_loss(x) for x in out["g_cls"].float().chunk(N_GLOBAL)]).mean()
    total = total + cfg.koleo_weight * N_GLOBAL * koleo
    terms["koleo"] = koleo
    return total, _detached(terms)
