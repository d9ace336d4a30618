"""`dinodist report OUT --out FILE.png`: a run's metrics.jsonl as curves, one row of panels per group."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="draw a run's metrics (losses, step/wait seconds, k-NN, teacher agreement) as a PNG",
        description="Read OUT/<group>/metrics.jsonl of a `dinodist distill` run (every student group and "
        "the teacher) or OUT/metrics.jsonl of a `dinodist train` run (the group 'train') and draw, per "
        "group, over iterations: the loss and its terms; step, wait and other *_seconds; k-NN top-1 and "
        "teacher agreement/cosine where the rows carry them. Works on a running job: an unfinished last "
        "line is skipped. See docs/viz.md.",
    )
    p.add_argument("out_dir", metavar="OUT", help="the run folder (the --out of distill or train)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write (atomically)")
    p.add_argument("--group", action="append", default=None, metavar="G",
                   help="only this group (repeatable; default: every group, in the run's order)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinodist.orchestrator.report import build_figure, collect_series, save_figure
    from dinodist.orchestrator.viz import check_png_out

    out = check_png_out(args.out)
    series = collect_series(args.out_dir, args.group)
    # collect_series refuses a run with no values, so there is a last iteration
    last = max(xs[-1] for panels in series.values() for s in panels.values() for xs, _ in s.values())
    save_figure(build_figure(series, f"{args.out_dir}: up to iteration {last}"), out)
    print(f"wrote {out}: {', '.join(series)} (up to iteration {last})")
    return 0
