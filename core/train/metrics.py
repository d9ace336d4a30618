"""metrics.jsonl: one JSON record per iteration, written by one rank of the run or of the group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO


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
