"""The modules of an SSL stage: student (backbone + DINO and iBOT heads), EMA teacher, optional Gram teacher.

`SSLModel` is a plain container whose FQNs ("student.backbone.blocks.0...", "teacher.dino_head...",
"gram_teacher...") are the checkpoint keys. Data parallelism is FSDP2 `fully_shard` per block, per backbone
and per head, over a 1-D mesh of the whole world; the teacher and the Gram teacher are sharded exactly like
the student so the EMA update and the Gram refresh (core/train/ema.py) are local copies between equal
shards.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinodist.core.errors import DinodistError
from dinodist.core.models import (
    apply_activation_checkpointing,
    build_backbone,
    build_head,
    compile_blocks,
    read_state_dict,
)
from dinodist.core.models.arch import HeadSpec, arch_dict
from dinodist.core.models.io import read_sidecar
from dinodist.core.ssl.config import HeadConfig, ModelConfig

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment]

HEADS = ("dino_head", "ibot_head")


def head_spec(h: HeadConfig) -> HeadSpec:
    return HeadSpec(h.hidden_dim, h.bottleneck_dim, h.n_prototypes, h.nlayers)


def _tower(cfg: ModelConfig) -> nn.ModuleDict:
    backbone = build_backbone(cfg.arch, **cfg.overrides)
    d = backbone.embed_dim
    return nn.ModuleDict(
        {
            "backbone": backbone,
            "dino_head": build_head(d, head_spec(cfg.dino_head)),
            "ibot_head": build_head(d, head_spec(cfg.ibot_head)),
        }
    )


class SSLModel(nn.Module):
    def __init__(self, cfg: ModelConfig, with_gram_teacher: bool) -> None:
        super().__init__()
        self.student = _tower(cfg)
        self.teacher = _tower(cfg)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.gram_teacher = None
        if with_gram_teacher:
            # Official: the Gram teacher runs without its overrides' stochastic depth (eval mode anyway).
            self.gram_teacher = build_backbone(cfg.arch, **cfg.overrides)
            self.gram_teacher.load_state_dict(self.student.backbone.state_dict())
            self.gram_teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> SSLModel:
        # Teachers always run in eval: no RoPE coordinate augmentation, no drop path, no local_cls_norm.
        self.student.train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        self.training = mode
        return self

    @property
    def depth(self) -> int:
        return len(self.student.backbone.blocks)


def build_ssl_model(cfg: ModelConfig, with_gram_teacher: bool, seed: int) -> SSLModel:
    """Same weights on every rank (seeded before sharding), then the training RNG is the caller's."""
    torch.manual_seed(seed)
    model = SSLModel(cfg, with_gram_teacher)
    return model.train()


def checkpoint_and_compile(model: SSLModel, activation_checkpointing: bool | str,
                           compile: bool = False) -> SSLModel:
    """Checkpoint (true/"full", "selective", false/"none") and optionally compile the student's blocks.

    In place, before `shard_model`: checkpointing -> compile -> FSDP, as the distillation students, so the
    blocks' FSDP hooks wrap the checkpointed forward and the backward's recompute runs on the weights FSDP
    gathers again for it. The EMA and Gram teachers are left alone: they run under no_grad, where a block
    runs its plain forward anyway, and eager as the students' EMA. Names and state-dict keys do not change,
    so checkpoints load either way.
    """
    apply_activation_checkpointing(model.student.backbone, activation_checkpointing)
    if compile:
        compile_blocks(model.student.backbone)
    return model


def shard_model(model: SSLModel, mesh, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: every block, each backbone, each head; reduce in fp32, params in `param_dtype` (bf16 on GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    backbones = [model.student.backbone, model.teacher.backbone]
    if model.gram_teacher is not None:
        backbones.append(model.gram_teacher)
    for bb in backbones:
        for blk in bb.blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(bb, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    for tower in (model.student, model.teacher):
        for h in HEADS:
            fully_shard(tower[h], mesh=mesh, mp_policy=mp, reshard_after_forward=True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP2: call on every rank)."""
    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


def teacher_export_state(model: SSLModel) -> dict[str, torch.Tensor]:
    """The EMA teacher as the official distillation loader reads it: backbone.*, dino_head.*, ibot_head.*."""
    return full_state_dict(model.teacher)


def sidecar(cfg: ModelConfig, model: SSLModel) -> dict[str, Any]:
    """What dinodist needs to rebuild an exported teacher (written as OUT.pth.json)."""
    return {
        "format": "dinodist-teacher-v1",
        "arch": cfg.arch,
        "overrides": cfg.overrides,
        "arch_spec": arch_dict(model.student.backbone.spec),
        "dino_head": asdict(head_spec(cfg.dino_head)),
        "ibot_head": asdict(head_spec(cfg.ibot_head)),
    }


def read_teacher_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict with backbone./dino_head./ibot_head. keys, sidecar or None) of an export .pth."""
    p = Path(path)
    if not p.is_file():
        raise DinodistError(f"{p}: teacher checkpoint not found")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        state = obj["teacher"]
    else:
        # A flat official backbone: no heads.
        state = {f"backbone.{k}": v for k, v in read_state_dict(p).items()}
    return state, read_sidecar(p)


def load_tower(tower: nn.ModuleDict, state: dict[str, torch.Tensor], source: str, heads: bool = True) -> None:
    """Strictly load backbone (and heads) from an export state into an unsharded tower."""
    want = ("backbone",) + (HEADS if heads else ())
    for name in want:
        sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        if not sub:
            raise DinodistError(f"{source}: has no {name}.* weights")
        try:
            missing, unexpected = tower[name].load_state_dict(sub, strict=False)
        except RuntimeError as exc:  # shape mismatch
            detail = str(exc).strip().splitlines()[-1].strip()
            msg = f"{source}: {name} does not match the config's model ({detail[:200]})"
            raise DinodistError(msg) from None
        if missing or unexpected:
            raise DinodistError(
                f"{source}: {name} does not match the config's model "
                f"(missing {', '.join(missing[:3]) or '-'}; unexpected {', '.join(unexpected[:3]) or '-'})"
            )
