"""The backbone `dinodist eval` measures: from an export, a training run, an official .pth, or random init."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dinodist.core.checkpoint import load_model_only
from dinodist.core.errors import DinodistError
from dinodist.core.models.io import load_backbone, load_backbone_state, read_sidecar, read_state_dict
from dinodist.core.models.vit import build_backbone
from dinodist.core.ssl.config import load_stage_config
from dinodist.core.ssl.loop import find_checkpoint


def load_eval_backbone(checkpoint: str | None, arch: str | None,
                       seed: int = 0) -> tuple[nn.Module, int | None, str]:
    """(backbone in eval mode, default image size or None, description) for `dinodist eval`.

    `checkpoint`: a teacher export .pth with its .json sidecar, a `dinodist train` run folder (its
    EMA teacher), a `dinodist distill` group folder (its `backbone.pth` and sidecar), an official
    backbone .pth (needs `arch`), or None for the random init of `arch`.
    """

    if checkpoint is None:
        if arch is None:
            raise DinodistError("--arch is required when no --checkpoint is given (random-init baseline)")
        torch.manual_seed(seed)
        return build_backbone(arch).eval(), None, f"random init of {arch} (seed {seed})"
    path = Path(checkpoint)
    if path.is_dir() and (path / "backbone.pth").is_file() and not (path / "config.yaml").is_file():
        path = path / "backbone.pth"  # a distill group folder: its EMA backbone, described by its sidecar
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise DinodistError(f"{path}: neither a `dinodist train` run folder (config.yaml) nor a "
                                f"`dinodist distill` group folder (backbone.pth)")
        cfg = load_stage_config(path / "config.yaml")
        bb = build_backbone(cfg.model.arch, **cfg.model.overrides)
        ck = find_checkpoint(path, "--checkpoint")
        load_model_only(ck, bb, prefix="teacher.backbone")
        return bb.eval(), cfg.crops.global_size, f"EMA teacher of {path} ({ck.name})"
    if not path.is_file():
        raise DinodistError(f"--checkpoint {path}: no such file or folder")
    meta = read_sidecar(path, require_arch=True)
    if meta is not None:
        bb = build_backbone(meta["arch"], **meta.get("overrides", {}))
        load_backbone_state(bb, read_state_dict(path), source=str(path))
        return bb.eval(), meta.get("image_size"), f"{path} ({meta['arch']})"
    if arch is None:
        raise DinodistError(f"--checkpoint {path}: no {path.name}.json sidecar, so --arch is required")
    return load_backbone(path, arch).eval(), None, f"{path} ({arch})"
