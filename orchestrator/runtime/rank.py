"""Entry point of one rank: `python -m dinodist.orchestrator.runtime.rank TOPOLOGY [--plan PLAN] ...`.

Started by `dinodist distill` / `add-student` (orchestrator/launch.py) and by the files `dinodist
deploy` writes, under torchrun: both set the env:// variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).
The rank reads the resolved topology and the plan the driver wrote beside it (`plan.json`; no
rank plans on its own), checks that they belong together, finds its group from its rank (teacher
ranks first, then the students as listed), and runs a live rank (live.py) or, with `--replay`, a
rank of a group trained from a target store (replay.py). `--check` only runs the store check the
driver asks for before it starts any rank. The supervisor's address, when there is one, is in
$DINODIST_CONTROL.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from dinodist.core.errors import DinodistError
from dinodist.core.train import preempt
from dinodist.orchestrator.planfile import PLAN_FILE, check_plan_matches, read_plan
from dinodist.orchestrator.runtime.live import run_live_rank, run_restarted_teacher_rank
from dinodist.orchestrator.runtime.replay import check_store_path, run_replay_rank
from dinodist.orchestrator.topology import check_runnable, load_topology

PROG = "python -m dinodist.orchestrator.runtime.rank"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="One rank of a dinodist distillation "
                                     "(torchrun-style env:// variables).")
    parser.add_argument("topology", help="resolved topology YAML (<out>/topology.yaml)")
    parser.add_argument("--plan", help=f"the driver's plan (default: {PLAN_FILE} beside TOPOLOGY)")
    parser.add_argument("--out", help="output folder (default: the topology's output)")
    parser.add_argument("--iterations", type=int, help="override train.iterations")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint every group holds (from scratch when "
                        "there is none); launchers always pass it, so their restarts resume")
    parser.add_argument("--replay", metavar="STORE", help="train --student from this target store "
                        "(a world of that group's ranks only)")
    parser.add_argument("--student", help="with --replay: the student group to train")
    parser.add_argument("--follow", action="store_true",
                        help="with --replay: tail a store that a live run is still writing")
    parser.add_argument("--follow-timeout", type=float, default=None,
                        help="with --follow (required): seconds without a new record before the writer "
                        "counts as dead")
    parser.add_argument("--restarted-teacher", action="store_true",
                        help="a teacher rank started again by the supervisor (control.on_failure: "
                        "restart_group): continue the target store, in a world of the teacher ranks")
    parser.add_argument("--check", action="store_true",
                        help="with --replay: only check the store against the topology, start nothing")
    return parser


def run(args: argparse.Namespace) -> int:
    overrides = {"train.iterations": args.iterations} if args.iterations else None
    topo = load_topology(args.topology, overrides)
    check_runnable(topo)
    if args.follow and args.follow_timeout is None:
        raise DinodistError("--follow needs --follow-timeout S (dinodist add-student passes its own)")
    if args.check:
        if not args.replay:
            raise DinodistError("--check needs --replay STORE")
        check_store_path(topo, args.replay, args.follow, args.follow_timeout)
        return 0
    plan_path = Path(args.plan) if args.plan else Path(args.topology).parent / PLAN_FILE
    plan = read_plan(plan_path)
    check_plan_matches(plan, topo, str(plan_path))
    out = Path(args.out) if args.out else Path(topo.output)
    preempt.install_handlers()
    if args.restarted_teacher:
        return run_restarted_teacher_rank(topo, plan, out)
    if args.replay:
        return run_replay_rank(topo, plan, out, args.replay, args.student, args.follow, args.follow_timeout,
                               resume=args.resume)
    return run_live_rank(topo, plan, out, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "?")
                        + " %(levelname)s %(message)s")
    try:
        return run(args)
    except preempt.Preempted as exc:
        print(f"dinodist rank {os.environ.get('RANK', '?')}: {exc}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        # not a normal exit: gloo's pending receives (never to be matched) would block interpreter teardown
        os._exit(preempt.PREEMPTED_EXIT)
    except DinodistError as exc:
        print(f"dinodist rank {os.environ.get('RANK', '?')}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
