"""`dinodist train STAGE_CONFIG`: run an SSL stage (pretrain / gram / highres), locally or under torchrun."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dinodist.core.errors import DinodistError
from dinodist.core.ssl.config import load_stage_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="run an SSL stage (pretrain, gram, highres) from a stage config",
        description="Run an SSL stage. Writes <out>/metrics.jsonl, <out>/config.yaml and DCP checkpoints "
        "under <out>/ckpt/<iteration>/.",
    )
    p.add_argument("config", help="stage config YAML (configs/stages/*.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--nproc", type=int, default=1,
                   help="local ranks to spawn, one GPU each under NCCL; ignored under torchrun")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="process-group backend with --nproc > 1 or torchrun: auto = nccl when CUDA is "
                   "available, else gloo; --nproc with gloo spawns CPU ranks (default: auto)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr.peak=1e-3 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def _train_rank(cfg, out: str, resume: bool, progress: bool) -> None:
    from dinodist.core.ssl.loop import train

    train(cfg, out, resume=resume, progress=progress)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.iterations is not None:
        if args.iterations <= 0:
            raise DinodistError(f"--iterations must be positive, got {args.iterations}")
        overrides.append(f"train.iterations={args.iterations}")
    if args.nproc <= 0:
        raise DinodistError(f"--nproc must be positive, got {args.nproc}")
    cfg = load_stage_config(args.config, overrides)
    out = args.out or str(Path("runs") / Path(args.config).stem)
    if args.resume and not (Path(out) / "ckpt").is_dir():
        raise DinodistError(f"--resume: no checkpoint folder {Path(out) / 'ckpt'}")
    from dinodist.core.distributed import SSL_TIMEOUT_S, destroy, init_from_env, spawn_local, under_torchrun

    if under_torchrun():
        if args.backend == "gloo":
            # CPU ranks, as under --nproc: the loop trains on CUDA whenever it sees it
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        init_from_env(backend=None if args.backend == "auto" else args.backend, timeout_s=SSL_TIMEOUT_S)
        try:
            _train_rank(cfg, out, args.resume, not args.quiet)
        finally:
            destroy()
    elif args.nproc > 1:
        spawn_local(_train_rank, args.nproc, (cfg, out, args.resume, not args.quiet), backend=args.backend,
                    timeout_s=SSL_TIMEOUT_S)
    else:
        _train_rank(cfg, out, args.resume, not args.quiet)
    print(f"dinodist train: done, outputs in {out}")
    return 0
