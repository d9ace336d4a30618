"""`dinodist export-teacher RUN_DIR OUT.pth`: the EMA teacher of a training run as a .pth file.

Full export: `{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}` (the layout the official
distillation loader reads). `--backbone-only`: the flat backbone in the official hub layout. Either way a
sidecar `OUT.pth.json` records the arch spec and head specs so dinodist can rebuild the model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dinodist.core.errors import DinodistError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-teacher",
        help="export the EMA teacher of a training run (with heads, or backbone only)",
        description="Export the EMA teacher of a `dinodist train` run from its latest checkpoint.",
    )
    p.add_argument("run_dir", help="output folder of `dinodist train` (holds config.yaml and ckpt/)")
    p.add_argument("out", help="destination .pth")
    p.add_argument("--backbone-only", action="store_true", help="flat official backbone state dict, no heads")
    p.set_defaults(func=run)


def load_run_model(run_dir: str | Path):
    """(config, unsharded SSLModel with the latest checkpoint's weights, checkpoint path) of a run dir."""
    from dinodist.core.checkpoint import latest_checkpoint, load_checkpoint
    from dinodist.core.ssl.config import load_stage_config
    from dinodist.core.ssl.loop import build_for_export

    run = Path(run_dir)
    if not run.is_dir():
        raise DinodistError(f"{run}: run folder not found")
    if not (run / "config.yaml").is_file():
        raise DinodistError(f"{run}: no config.yaml (not a `dinodist train` output folder)")
    ck = latest_checkpoint(run / "ckpt")
    if ck is None:
        raise DinodistError(f"{run}: no checkpoint under {run / 'ckpt'}")
    cfg = load_stage_config(run / "config.yaml")
    model = build_for_export(cfg)
    load_checkpoint(ck, model, None, restore_rng=False)
    return cfg, model, ck


def run(args: argparse.Namespace) -> int:
    from dinodist.core.models.io import save_backbone
    from dinodist.core.ssl.model import sidecar, teacher_export_state

    cfg, model, ck = load_run_model(args.run_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.backbone_only:
        save_backbone(model.teacher.backbone, out)
    else:
        tmp = out.with_name(out.name + ".tmp")
        torch.save({"teacher": teacher_export_state(model)}, tmp)
        os.replace(tmp, out)
    side = sidecar(cfg.model, model)
    side["layout"] = "backbone" if args.backbone_only else "teacher"
    res = cfg.crops.resolutions
    side["image_size"] = res[0].global_size if res else cfg.crops.global_size  # default eval resolution
    side["source"] = {"run_dir": str(args.run_dir), "checkpoint": str(ck), "stage": cfg.stage}
    Path(str(out) + ".json").write_text(json.dumps(side, indent=1))
    print(f"dinodist export-teacher: wrote {out} ({side['layout']} layout, from {ck})")
    return 0
