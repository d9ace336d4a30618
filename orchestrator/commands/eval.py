"""`dinodist eval knn|linear`: frozen-feature evaluation (export, run dir, official .pth, or random init)."""

from __future__ import annotations

import argparse
import json
import time

from dinodist.core.errors import DinodistError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="k-NN or linear-probe accuracy of a backbone on a labelled source",
        description="Evaluate frozen CLS features. DATA is a source spec, e.g. "
        "fashion-mnist:/usr/share/datasets/fashion-mnist:train. Without --checkpoint the random init "
        "of --arch is evaluated (the baseline).",
    )
    p.add_argument("protocol", choices=["knn", "linear"])
    p.add_argument("--checkpoint", default=None,
                   help="teacher export .pth (+ .json sidecar), a run dir, or an official backbone .pth")
    p.add_argument("--train", required=True, metavar="DATA", help="training source spec")
    p.add_argument("--test", required=True, metavar="DATA", help="test source spec")
    p.add_argument("--arch", default=None, help="arch/preset (random init, or a .pth without sidecar)")
    p.add_argument("--image-size", type=int, default=None,
                   help="eval resize (default: the run's global crop size, else 224)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--features", choices=["cls", "avgpool", "cls+avgpool"], default="cls",
                   help="CLS token (default, DINO k-NN), mean patch token, or both")
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    p.add_argument("--epochs", type=int, default=30, help="linear probe epochs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the random init baseline")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinodist.core.data.sources import build_source
    from dinodist.core.eval import extract_features, knn_accuracy, linear_probe
    from dinodist.core.eval.backbone import load_eval_backbone

    for name in ("limit_train", "limit_test", "image_size"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise DinodistError(f"--{name.replace('_', '-')} must be positive, got {v}")
    model, default_size, desc = load_eval_backbone(args.checkpoint, args.arch, args.seed)
    size = args.image_size or default_size or 224
    if size % model.patch_size:
        raise DinodistError(f"--image-size {size} is not a multiple of the patch size {model.patch_size}")
    train_src, test_src = build_source(args.train), build_source(args.test)
    t0 = time.perf_counter()
    xtr, ytr = extract_features(model, train_src, size, args.batch_size, args.limit_train, args.features)
    xte, yte = extract_features(model, test_src, size, args.batch_size, args.limit_test, args.features)
    if args.protocol == "knn":
        acc = knn_accuracy(xtr, ytr, xte, yte, k=args.k, temperature=args.temperature)
    else:
        acc = linear_probe(xtr, ytr, xte, yte, epochs=args.epochs, seed=args.seed)
    res = {"protocol": args.protocol, "accuracy": acc, "model": desc, "image_size": size,
           "features": args.features, "n_train": len(ytr), "n_test": len(yte),
           "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.protocol} top-1 {100 * acc:.2f}% | {desc} | {size}px {args.features} | "
              f"train {len(ytr)} / test {len(yte)} "
              f"| {res['seconds']} s")
    return 0
