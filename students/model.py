"""A student: backbone + fresh DINO/iBOT heads with the teacher's head dims, its EMA, its lr schedule.

The student module is the FSDP2 root: its `forward` runs the multi-crop backbone pass and both
heads, so the root unit's parameters (patch embed, tokens, norms) are unsharded by FSDP's hook.
Blocks and heads are their own units. `features` targets replace the heads by a linear
projection to the teacher's width. The optimizer, clipping and EMA update are core/train's, as
in the SSL stages.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from dinodist.core.models import HeadSpec, apply_activation_checkpointing, build_backbone, build_head
from dinodist.core.targets import HEADS


@dataclass(frozen=True, kw_only=True)
class StudentOptim:
    """A student's optimisation settings.

    The topology's `train:` (orchestrator/topology.py) states their defaults; only the recipe constants
    it does not expose have one here.
    """

    lr: float
    weight_decay: float
    warmup_iterations: int
    layerwise_decay: float
    clip_grad: float  # 0: no clipping
    ema: float
    patch_embed_lr_mult: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"  # after warmup: "constant" or "cosine" (to lr_end at the last iteration)
    lr_end: float = 0.0


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, kind: str, dino_head: HeadSpec | None = None,
                 ibot_head: HeadSpec | None = None, teacher_dim: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.kind = kind
        d = backbone.embed_dim
        if kind == HEADS:
            self.dino_head = build_head(d, dino_head)
            self.ibot_head = build_head(d, ibot_head)
        else:
            self.feature_proj = nn.Linear(d, teacher_dim)

    def apply_activation_checkpointing(self, mode: bool | str) -> Student:
        """Checkpoint each backbone block in `mode` (true/"full", "selective", false/"none"), in place.

        Before `shard_student`: the blocks are FSDP units, and their hooks must wrap the checkpointed
        forward so that the backward's recompute runs on the re-gathered weights. The heads are not
        checkpointed (as the official recipe): their activations are a few rows per image.
        """
        apply_activation_checkpointing(self.backbone, mode)
        return self

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                mask_indices: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Student outputs on unmasked crops (as the official multidistillation: masks only select
        which patch positions iBOT supervises).

        Returns `g_cls` [2B, D] (pre-head, for KoLeo) and for heads: `dino` [2B + nB, K] (global
        crops first), `ibot` [M, Ki]; for features: `proj_cls` [2B, Dt], `proj_patch` [2B, P, Dt].
        """
        xs = [global_crops] + ([local_crops] if local_crops is not None and local_crops.numel() else [])
        outs = self.backbone.forward_features_list(xs, [None] * len(xs))
        # a copy, not a view: FSDP hooks the outputs for backward and warns about views
        g_cls = outs[0]["x_norm_clstoken"].clone()
        g_patch = outs[0]["x_norm_patchtokens"]
        res = {"g_cls": g_cls}
        if self.kind != HEADS:
            res["proj_cls"] = self.feature_proj(g_cls)
            res["proj_patch"] = self.feature_proj(g_patch)
            return res
        cls_all = torch.cat([g_cls] + ([outs[1]["x_norm_clstoken"]] if len(outs) > 1 else []))
        # one call: one all-gather of the head per step; the loss splits global [:2B] and local [2B:]
        res["dino"] = self.dino_head(cls_all)
        flat = g_patch.flatten(0, 1)
        res["ibot"] = self.ibot_head(flat.index_select(0, mask_indices.to(flat.device)))
        return res


def build_student(arch: str, overrides: dict | None, kind: str, dino_head: HeadSpec | None,
                  ibot_head: HeadSpec | None, teacher_dim: int, seed: int) -> Student:
    """Same seed -> same initial weights, whatever group or rank builds it."""
    torch.manual_seed(seed)
    backbone = build_backbone(arch, **(overrides or {}))
    return Student(backbone, kind, dino_head, ibot_head, teacher_dim)


def shard_student(student: Student, mesh) -> Student:
    """FSDP2 over the group's mesh: one unit per block, per head, and the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if mesh.device_type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in student.backbone.blocks:
        fully_shard(block, **kwargs)
    for name in ("dino_head", "ibot_head", "feature_proj"):
        if hasattr(student, name):
            fully_shard(getattr(student, name), **kwargs)
    fully_shard(student, **kwargs)
    return student


def make_ema(student: nn.Module) -> nn.Module:
    ema = copy.deepcopy(student)
    ema.requires_grad_(False)
    return ema


def lr_at(iteration: int, cfg: StudentOptim, iterations: int) -> float:
    """Linear warmup from 0 to `lr`, then constant (the official distilled recipe's shape) or a cosine from
    `lr` to `lr_end` at iteration `iterations - 1`.

    A function of the absolute iteration and the run's length, so a resumed run follows the same curve."""
    if cfg.warmup_iterations > 0 and iteration < cfg.warmup_iterations:
        return cfg.lr * iteration / cfg.warmup_iterations
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    span = iterations - 1 - cfg.warmup_iterations
    progress = min(1.0, (iteration - cfg.warmup_iterations) / span) if span > 0 else 1.0
    return cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1.0 + math.cos(math.pi * progress))
