"""Check that every rank of a group reads the same data before any row is exchanged.

Teacher and student ranks each build the data source themselves, on different machines. If one of
them sees other files (a stale mount, another dataset version), rows would pair different pixels
with the same target without any error. `agree_fingerprint` compares `ImageSource.fingerprint()`
across the group with one fixed-size collective (no pickle) and fails on every rank at once.
"""

from __future__ import annotations

import hashlib
import struct

import torch
import torch.distributed as dist

from dinodist.core.errors import DinodistError

_WORDS = 4  # 32 bytes of sha256: a collision between two real fingerprints is not a practical concern


def fingerprint_digest(fingerprint: str) -> torch.Tensor:
    """sha256 of the string as an int64 [4] tensor: what the ranks exchange."""
    return torch.tensor(struct.unpack(f"<{_WORDS}q", hashlib.sha256(fingerprint.encode()).digest()),
                        dtype=torch.int64)


def agree_fingerprint(fingerprint: str, group: dist.ProcessGroup | None = None) -> None:
    """Raise DinodistError on every rank of `group` (default: world) unless all pass the same fingerprint.

    A collective: every rank of the group must call it, in the same order as its other collectives.
    The error names the (global) ranks whose fingerprint differs from the group's first rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DinodistError("agree_fingerprint: torch.distributed is not initialised")
    world = dist.get_world_size(group)
    if world == 1:
        return
    # NCCL moves only CUDA tensors; every other backend used here (gloo) takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = fingerprint_digest(fingerprint).to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    differ = [ranks[k] for k in range(1, world) if not torch.equal(gathered[k], gathered[0])]
    if differ:
        me = dist.get_rank()
        raise DinodistError(
            f"data fingerprint differs across ranks: rank{'s' if len(differ) > 1 else ''} "
            f"{', '.join(map(str, differ))} differ{'' if len(differ) > 1 else 's'} from rank {ranks[0]} "
            f"(rank {me} has {fingerprint!r}); every rank must read the same data (data.source, same files)"
        )
