"""Which rows of the global batch each rank owns: the one split rule, in plain Python.

The planner (orchestrator/allocate.py) sizes groups with it and the teacher and student ranks
(core/targets.py) exchange and train by it, so what `dinodist plan` sizes is what runs.
"""

from __future__ import annotations

from dinodist.core.errors import DinodistError


def rank_rows(global_batch: int, group_size: int, rank: int) -> slice:
    """Rows [floor(rank G/d), floor((rank+1) G/d)) of the global batch G owned by `rank` of d ranks.

    Contiguous, in rank order, sizes differing by at most one (the first ranks get the smaller
    shares); exactly G/d each when d divides G.
    """
    if group_size <= 0 or group_size > global_batch:
        raise DinodistError(
            f"group size {group_size}: must be between 1 and the global batch size {global_batch}"
        )
    if not 0 <= rank < group_size:
        raise DinodistError(f"rank {rank}: outside a group of {group_size} ranks")
    return slice(rank * global_batch // group_size, (rank + 1) * global_batch // group_size)


def loss_scale(rows: int, group_size: int, global_batch: int) -> float:
    """Factor on a rank's per-row mean loss so that data-parallel training sees the full-batch mean.

    FSDP2 / DDP average gradients over the d ranks of a group: with equal shares the mean of the
    ranks' mean losses is the mean over the global batch, with unequal shares it would weight a
    2-row rank's rows more than a 3-row rank's. Scaling rank r's loss by rows_r * d / G makes
    (1/d) sum_r rows_r d / G grad(mean_r) = grad of the mean over all G rows. 1.0 for even shares.
    """
    return rows * group_size / global_batch
