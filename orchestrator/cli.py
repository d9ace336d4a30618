"""`dinodist` entry point: each sub-command lives in its own module under orchestrator/commands.

A command module exposes `register(subparsers) -> None`, adding one parser whose
`func` default is called with the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from dinodist.core.errors import DinodistError
from dinodist.orchestrator import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinodist",
        description="DINOv3-style SSL training and one-teacher, many-students distillation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except DinodistError as exc:
        print(f"dinodist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dinodist {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
