"""metrics.jsonl: one JSON record per iteration, written by one rank of the run or of the group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from dinodist.core.errors import DinodistError


def _drop_from(path: Path, start: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] < start:
                keep.append(line)
        except (ValueError, KeyError):
            break  # a torn last line of a killed run
    path.write_text("".join(k + "\n" for k in keep))


def open_metrics(path: str | Path, start: int = 0) -> TextIO:
    """Open `path` (line-buffered) to append records from iteration `start` on.

    Records of iterations >= `start` (written after the checkpoint a run resumes from) and a torn last
    line are dropped first, so the file reads as one uninterrupted run; `start` 0 starts a new file.
    """
    path = Path(path)
    if start <= 0:
        return open(path, "w", buffering=1)
    _drop_from(path, start)
    return open(path, "a", buffering=1)


def write_record(f: TextIO, record: dict) -> None:
    """One line; a line-buffered file from `open_metrics` has it on disk at once, even if the run dies."""
    f.write(json.dumps(record) + "\n")


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; an unparsable last line (a running job mid-write, or one killed
    mid-line) is skipped, an unparsable line before it is a one-line error naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DinodistError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if k == len(numbered) - 1:
                break  # torn by a writer that is still running (or was killed mid-line)
            why = str(exc).splitlines()[0]
            raise DinodistError(f"{path}:{lineno}: not a metrics record ({why})") from None
        rows.append(row)
    return rows


def knn_last_best(rows: list[dict]) -> dict[str, Any] | None:
    """Last and best `knn_top1` of metrics records, with their iterations (the first of equal bests, as
    the loop keeps the first), and how many evaluations; None when none was measured."""
    evals = [r for r in rows if isinstance(r.get("knn_top1"), int | float)]
    if not evals:
        return None
    best = max(evals, key=lambda r: r["knn_top1"])
    return {"last": evals[-1]["knn_top1"], "last_iteration": evals[-1].get("iteration"),
            "best": best["knn_top1"], "best_iteration": best.get("iteration"), "evaluations": len(evals)}
