"""`dinodist export hf|safetensors CHECKPOINT OUT_DIR`: a backbone (and heads) in the formats people load.

`hf`: config.json + model.safetensors that transformers' `DINOv3ViTModel.from_pretrained` loads, with the
same outputs as dinodist (archs it cannot represent exactly are refused). `safetensors`: the official
DINOv3 key layout, plus the DINO/iBOT heads when the source has them. Both write a model card (README.md),
stage and check everything in OUT_DIR.tmp-* and only then rename it into place.
"""

from __future__ import annotations

import argparse

from dinodist.core.errors import DinodistError

CHECKPOINT_HELP = ("a `dinodist distill` group folder (OUT/<group>), a teacher export .pth (+ .json "
                   "sidecar), a `dinodist train` run folder, or an official-layout backbone .pth "
                   "(needs --arch)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a backbone for Hugging Face transformers or as safetensors (with heads)",
        description="Export a trained backbone in a format other tools load. Writes atomically: OUT_DIR "
        "is staged beside it and renamed into place once complete and checked.",
    )
    sub = p.add_subparsers(dest="format", metavar="FORMAT")
    sub.required = True
    hf = sub.add_parser(
        "hf",
        help="config.json + model.safetensors for transformers' DINOv3ViTModel",
        description="Write a folder that transformers' DINOv3ViTModel.from_pretrained(OUT_DIR) loads, with "
        "outputs equal to dinodist's forward_features (fp32). An arch the HF model cannot represent exactly "
        "is refused. When transformers is installed the folder is loaded and compared before it is moved "
        "into place.",
    )
    st = sub.add_parser(
        "safetensors",
        help="backbone.safetensors (official keys) + heads.safetensors, config.json, README.md",
        description="Write OUT_DIR/backbone.safetensors in the official DINOv3 key layout, the DINO/iBOT "
        "heads when the source has them (a group folder: the EMA student's, from its newest valid "
        "checkpoint; a teacher export: its heads) as heads.safetensors + heads.json, config.json "
        "(arch, overrides, head specs) and a model card README.md. The round trip is checked.",
    )
    for q in (hf, st):
        q.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
        q.add_argument("out_dir", metavar="OUT_DIR", help="destination folder (new or empty)")
        q.add_argument("--arch", default=None,
                       help="arch or preset of a .pth without sidecar (e.g. vits16, tiny-vitb)")
        q.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
        q.add_argument("--no-verify", dest="verify", action="store_false",
                       help="skip the check of the written files (for very large models)")
    st.add_argument("--no-heads", dest="heads", action="store_false", help="backbone only")
    hf.set_defaults(func=run, heads=False)
    st.set_defaults(func=run)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dinodist.orchestrator.export import check_out_dir, export_hf, export_safetensors, resolve_source

    if not Path(args.checkpoint).exists():
        raise DinodistError(f"CHECKPOINT {args.checkpoint}: no such file or folder")
    out = check_out_dir(args.out_dir, args.force, Path(args.checkpoint))
    src = resolve_source(args.checkpoint, args.arch, heads=args.heads)
    if args.format == "hf":
        files, checks = export_hf(src, out, verify=args.verify)
    else:
        files, checks = export_safetensors(src, out, verify=args.verify)
    print(f"dinodist export {args.format}: wrote {out}/ from {src.description}")
    for f in files:
        print(f"  {f.name:<20} {_size(f.stat().st_size)}")
    for line in [*checks, *(f"note: {n}" for n in src.notes)]:
        print(f"  {line}")
    return 0
