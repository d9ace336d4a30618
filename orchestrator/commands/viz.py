"""`dinodist viz pca|similarity`: pictures of a backbone's patch features, one row per model."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from dinodist.core.errors import DinodistError

DEFAULT_IMAGE_SIZE = 224
_NUMBER = r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "viz",
        help="pictures of patch features: PCA as RGB, or the similarity map of one patch",
        description="Draw a backbone's patch features on a few images, one row per model, one column per "
        "image, with the inputs (as the model saw them: resized to --image-size) as the first row. "
        "Models: every --checkpoint (a `dinodist distill` group folder, a teacher export .pth with its "
        ".json sidecar, a `dinodist train` run folder, or an official backbone .pth with --arch), plus the "
        "random init of --arch with --random-init or when no --checkpoint is given. See docs/viz.md.",
    )
    sub = p.add_subparsers(dest="picture", metavar="PICTURE")
    sub.required = True
    pca = sub.add_parser(
        "pca",
        help="first three principal components of the patch features as RGB",
        description="Fit a PCA over the patch features of all IMAGES for each model and show the first "
        "three components as red, green and blue (each scaled between its 1st and 99th percentile). "
        "Colours compare across the images of a row, not across rows: each model has its own basis.",
    )
    _common(pca)
    pca.set_defaults(func=run)
    sim = sub.add_parser(
        "similarity",
        help="cosine similarity of the patch under --point to every patch",
        description="Mark the patch under --point in the first IMAGE and show its cosine similarity to "
        "every patch of every IMAGE (the first and any others), on a fixed scale: blue -1, white 0, "
        "red +1, so rows compare.",
    )
    _common(sim)
    sim.add_argument("--point", required=True, metavar="X,Y",
                     help="the query point in the first image: integer pixels of the resized image "
                     "(0..S-1, x to the right, y down), or two fractions 0..1 written with a decimal "
                     "point (0.5,0.5 is the centre)")
    sim.set_defaults(func=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write (atomically)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="X",
                   help="a model to show (repeatable, one row each): distill group folder, export .pth "
                   "with sidecar, train run folder, or official backbone .pth (needs --arch)")
    p.add_argument("--arch", default=None,
                   help="arch/preset of a .pth without sidecar, and of the random init")
    p.add_argument("--random-init", action="store_true",
                   help="add a row for the random init of --arch (implied when no --checkpoint is given)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (default 0)")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="resize every image to SxS, a multiple of each model's patch size (default: the "
                   f"first model's training size when it records one, else {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--tile", type=int, default=224, metavar="PX",
                   help="side of each tile in the picture; maps are upsampled to it with nearest "
                   "neighbours (default 224)")


def parse_point(text: str) -> tuple[float, float, bool]:
    """(x, y, as_fractions) from "X,Y": integers are pixels, numbers with a decimal point fractions."""
    m = re.fullmatch(_NUMBER + "," + _NUMBER, text)
    if m is None:
        raise DinodistError(f"--point {text!r}: expected X,Y (two integer pixels, or two fractions "
                            f"like 0.5,0.25)")
    a, b = m.group(1), m.group(2)
    fractions = "." in a or "." in b
    if not fractions:
        return float(int(a)), float(int(b)), False
    return float(a), float(b), True


def point_pixels(text: str, image_size: int) -> tuple[int, int]:
    """Pixel (x, y) of the resized image that --point names, checked against its size."""
    x, y, fractions = parse_point(text)
    if fractions:
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise DinodistError(f"--point {text}: fractions must lie in 0..1")
        # a fraction of 1.0 is the far edge: the last pixel, not one past it
        return min(int(x * image_size), image_size - 1), min(int(y * image_size), image_size - 1)
    if not (0 <= x < image_size and 0 <= y < image_size):
        raise DinodistError(f"--point {text}: outside the {image_size}x{image_size} resized image "
                            f"(pixels 0..{image_size - 1}; see --image-size)")
    return int(x), int(y)


def _load_models(args: argparse.Namespace) -> list[tuple[object, int | None, str]]:
    from dinodist.core.eval.backbone import load_eval_backbone

    models = [load_eval_backbone(c, args.arch, args.seed) for c in args.checkpoint]
    if args.random_init or not models:
        if args.arch is None:
            raise DinodistError("--arch is required for the random init (--random-init, or no --checkpoint)")
        models.append(load_eval_backbone(None, args.arch, args.seed))
    return models


def _image_size(args: argparse.Namespace, models: list) -> int:
    size = args.image_size or next((s for _, s, _ in models if s), None) or DEFAULT_IMAGE_SIZE
    for model, _, desc in models:
        if size % model.patch_size:
            what = f"--image-size {size}" if args.image_size else f"the default image size {size}"
            hint = "" if args.image_size else "; pass --image-size"
            raise DinodistError(f"{what} is not a multiple of the patch size {model.patch_size} "
                                f"of {desc}{hint}")
    return size


def run(args: argparse.Namespace) -> int:
    from dinodist.core.eval.pca import (
        patch_features,
        pca_rgb,
        point_to_patch,
        prepare,
        read_image,
        similarity_maps,
    )
    from dinodist.orchestrator.viz import check_png_out, colorize_similarity, compose_grid, save_png

    for flag in ("image_size", "tile"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise DinodistError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    out = check_png_out(args.out)
    if args.picture == "similarity":
        parse_point(args.point)  # a malformed point fails before any model loads
    images = [read_image(p) for p in args.images]
    models = _load_models(args)
    size = _image_size(args, models)
    x, shown = prepare(images, size)
    captions = [Path(p).name for p in args.images]
    rows, marks = [], {}
    if args.picture == "pca":
        title = ["PCA of patch features: components 1-3 as RGB",
                 f"fitted per model over all images, {size} px"]
        for model, _, desc in models:
            rows.append((desc, list(pca_rgb(patch_features(model, x)).numpy())))
    else:
        px, py = point_pixels(args.point, size)
        title = [f"similarity to the marked patch: pixel ({px},{py}) of {captions[0]}",
                 f"cosine, {size} px: blue -1, white 0, red +1"]
        where = ((px + 0.5) / size, (py + 0.5) / size)
        marks[(0, 0)] = where
        for r, (model, _, desc) in enumerate(models, start=1):
            feats = patch_features(model, x)
            row, col = point_to_patch(px, py, model.patch_size, tuple(feats.shape[1:3]))
            sims = similarity_maps(feats, 0, row, col).numpy()
            rows.append((desc, [colorize_similarity(s) for s in sims]))
            marks[(r, 0)] = where
    picture = compose_grid(title, captions, list(shown), rows, args.tile, marks)
    save_png(picture, out)
    print(f"wrote {out}: {len(rows)} model(s) x {len(images)} image(s), {size} px, "
          f"{picture.width}x{picture.height}")
    return 0
