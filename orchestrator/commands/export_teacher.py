"""`dinodist export-teacher RUN_DIR OUT.pth`: the EMA teacher of a training run as a .pth file.

Full export: `{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}` (the layout the official
distillation loader reads). `--backbone-only`: the flat backbone in the official hub layout. Either way a
sidecar `OUT.pth.json` records the arch spec and head specs so dinodist can rebuild the model.
"""

from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
    from dinodist.core.ssl.export import export_teacher

    out, side = export_teacher(args.run_dir, args.out, backbone_only=args.backbone_only)
    origin = side["source"]["checkpoint"]
    print(f"dinodist export-teacher: wrote {out} ({side['layout']} layout, from {origin})")
    return 0
