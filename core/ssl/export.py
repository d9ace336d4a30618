"""A training run's EMA teacher as a .pth file (`dinodist export-teacher`).

Full export: `{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}` (the layout the official
distillation loader reads). `backbone_only`: the flat backbone in the official hub layout. Either
way a sidecar `OUT.pth.json` records the arch spec and head specs so dinodist can rebuild the model,
and under `file` the .pth's size, mtime and sha256: the checkpoint's identity (a target store's
`teacher_hash`), hashed once here instead of by every teacher rank at every start.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dinodist.core.checkpoint import latest_valid_checkpoint, load_checkpoint
from dinodist.core.errors import DinodistError
from dinodist.core.models.io import file_record, save_backbone, write_sidecar
from dinodist.core.ssl.config import load_stage_config
from dinodist.core.ssl.loop import build_for_export
from dinodist.core.ssl.model import sidecar, teacher_export_state


def load_run_model(run_dir: str | Path):
    """(config, unsharded SSLModel with the latest checkpoint's weights, checkpoint path) of a run dir."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DinodistError(f"{run}: run folder not found")
    if not (run / "config.yaml").is_file():
        raise DinodistError(f"{run}: no config.yaml (not a `dinodist train` output folder)")
    ck = latest_valid_checkpoint(run / "ckpt")
    if ck is None:
        raise DinodistError(f"{run}: no complete checkpoint under {run / 'ckpt'}")
    cfg = load_stage_config(run / "config.yaml")
    model = build_for_export(cfg)
    load_checkpoint(ck, model, None, restore_rng=False)
    return cfg, model, ck


def export_teacher(run_dir: str | Path, out: str | Path, backbone_only: bool = False) -> tuple[Path, dict]:
    """Write the latest checkpoint's EMA teacher to `out` (+ `out.json`); returns (out, sidecar)."""
    cfg, model, ck = load_run_model(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if backbone_only:
        save_backbone(model.teacher.backbone, out)
    else:
        tmp = out.with_name(out.name + ".tmp")
        torch.save({"teacher": teacher_export_state(model)}, tmp)
        os.replace(tmp, out)
    side = sidecar(cfg.model, model)
    side["layout"] = "backbone" if backbone_only else "teacher"
    res = cfg.crops.resolutions
    side["image_size"] = res[0].global_size if res else cfg.crops.global_size  # default eval resolution
    side["source"] = {"run_dir": str(run_dir), "checkpoint": str(ck), "stage": cfg.stage}
    side["file"] = file_record(out)
    # atomic: a teacher starting meanwhile never reads a half-written sidecar (a one-line error)
    write_sidecar(out, side)
    return out, side
