"""Where a resumed run starts: the newest checkpoint iteration that every student group holds.

Groups train in lockstep and checkpoint at the same iterations, but a crash can leave one group a
checkpoint ahead of another (it died while the others were saving), and a torn checkpoint does not
count. Every rank reads its own group's checkpoints (core.checkpoint.valid_iterations) and the world
agrees on one iteration with a few all-reduces of one number each: the minimum of the newest ones,
stepping back past any that some group lacks. The teacher has no state of its own beyond that
iteration (its targets are a function of it), so it simply starts there.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dinodist.core.checkpoint import valid_iterations

log = logging.getLogger("dinodist.resume")


def _all_reduce(value: int, op, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def agree_resume_point(ckpt_dir: Path | None, iterations: int, device: torch.device) -> int:
    """Collective over the world: the iteration every group resumes from (0: from scratch).

    `ckpt_dir`: this rank's group checkpoint folder, None for a teacher rank.
    """
    have = set(valid_iterations(ckpt_dir)) if ckpt_dir is not None else None
    candidate = max(have, default=0) if have is not None else iterations
    while True:
        k = _all_reduce(candidate, dist.ReduceOp.MIN, device)
        ok = have is None or k == 0 or k in have
        if _all_reduce(int(ok), dist.ReduceOp.MIN, device):
            break
        candidate = max((i for i in (have or ()) if i < k), default=0) if have is not None else k
    if have is not None and have and max(have) > k:
        log.warning("%s: resuming at iteration %d, the newest checkpoint every group has (this group "
                    "has up to %d)", ckpt_dir, k, max(have))
    return k


def drop_checkpoints_after(ckpt_dir: Path, iteration: int) -> None:
    """Group rank 0, before training: remove checkpoint folders past `iteration` (an abandoned timeline:
    the run continues from `iteration`, so a later resume must not pick them). With `iteration` 0 that is
    every checkpoint: a new run in an old output folder."""
    if not ckpt_dir.is_dir():
        return
    stale = [d for d in ckpt_dir.iterdir()
             if d.is_dir() and (not d.name.isdigit() or int(d.name) > iteration)]
    if stale:
        log.warning("%s: removing %d checkpoint folder(s) past iteration %d (%s)", ckpt_dir, len(stale),
                    iteration, ", ".join(sorted(d.name for d in stale)))
    for d in stale:
        shutil.rmtree(d)
