"""`dinodist add-student TOPOLOGY --store DIR --student NAME`: a new student, no teacher compute."""

from __future__ import annotations

import argparse
import logging

from dinodist.orchestrator.add_student import FOLLOW_TIMEOUT_S


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "add-student",
        help="train a new student group from a target store (zero teacher forwards)",
        description="Train student NAME on the targets a live `dinodist distill` run wrote to its target "
        "store (topology `store:`), in the same training loop, with no teacher. The store must match the "
        "topology (teacher checkpoint hash, data fingerprint, crop and masking config, batch size, seed). "
        "With --follow, tail a store that a running job is still writing: the new group catches up, "
        "then trains in step with it; if the writer dies, it stops after the last complete record and "
        "the command exits 2 naming that iteration. Writes OUT/NAME/metrics.jsonl, OUT/NAME/backbone.pth "
        "and OUT/summary.json (\"teacher_forwards\": 0).",
    )
    p.add_argument("topology", help="topology YAML of the run that wrote the store")
    p.add_argument("--store", help="target store directory (default: the topology's store.path)")
    p.add_argument("--student", required=True, metavar="NAME",
                   help="student group to train: one of the topology's, or a new name with --arch")
    p.add_argument("--arch", help="arch of the student (required when NAME is not in the topology)")
    p.add_argument("--out", help="output folder (default: <the topology's output>/add-student-NAME)")
    p.add_argument("--devices", type=int, help="ranks of the new group (default: its topology entry, else 1)")
    p.add_argument("--iterations", type=int, help="override train.iterations")
    p.add_argument("--follow", action="store_true", help="tail a store that a live run is still writing")
    p.add_argument("--follow-timeout", type=float, default=FOLLOW_TIMEOUT_S, metavar="S",
                   help="with --follow: seconds without a new record (and no CLOSED marker) after which "
                   f"the writer counts as dead (default {FOLLOW_TIMEOUT_S:g})")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default: metrics.port; 0 = any free)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinodist.core.errors import DinodistError
    from dinodist.orchestrator.add_student import run_add_student

    if args.devices is not None and args.devices < 1:
        raise DinodistError(f"--devices: must be >= 1, got {args.devices}")
    if args.follow_timeout <= 0:
        raise DinodistError(f"--follow-timeout: must be positive, got {args.follow_timeout:g}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_add_student(args.topology, args.student, store=args.store, arch=args.arch, out=args.out,
                    devices=args.devices, iterations=args.iterations, follow=args.follow,
                    follow_timeout=args.follow_timeout, metrics_port=args.metrics_port,
                    echo=lambda line: print(line, flush=True))
    return 0
