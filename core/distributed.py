"""Process-group helpers shared by every rank: env:// init, free ports, sub-groups and their meshes.

One torch.distributed world holds every rank of a run (teacher and all student groups). Each
group is a sub-group of that world. `torch.distributed.new_group` is itself a collective over
the world: every rank must create every sub-group, in the same order, even those it is not
in. `make_subgroups` does exactly that so callers cannot get the order wrong.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinodist.core.errors import DinodistError

_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def device(self) -> torch.device:
        return device_for_backend(self.backend, self.local_rank)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for_backend(backend: str, local_rank: int = 0) -> torch.device:
    """Tensors that travel over a backend must live where it expects them: NCCL on the GPU, gloo on CPU."""
    if backend == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def env_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun-style variables, with a clear error if any is missing."""
    missing = [v for v in _ENV_VARS if v not in os.environ]
    if missing:
        raise DinodistError(f"environment variable {missing[0]} is not set (expected torchrun-style env://)")
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise DinodistError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    if not 0 <= rank < world:
        raise DinodistError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world, local


def init_from_env(backend: str | None = None, timeout_s: float = 60.0) -> DistInfo:
    """Join the world described by env:// variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""
    rank, world, local = env_info()
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend)


def make_subgroups(rank_lists: Sequence[Sequence[int]], timeout_s: float | None = None) -> list:
    """Create one process group per rank list, in list order, on every rank of the world.

    Returns the groups in the same order; entries for groups this rank is not in are the
    non-member sentinel torch returns and must not be used for collectives.
    """
    seen: set[int] = set()
    for ranks in rank_lists:
        overlap = seen.intersection(ranks)
        if overlap:
            raise DinodistError(f"rank {min(overlap)} is listed in two sub-groups")
        seen.update(ranks)
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    return [dist.new_group(ranks=list(ranks), **kwargs) for ranks in rank_lists]


def group_mesh(group, ranks: Sequence[int], device_type: str):
    """A 1-D DeviceMesh over an existing sub-group, for FSDP2 `fully_shard(mesh=...)`.

    `init_device_mesh` only spans the whole world; a mesh over a sub-group must be built from
    the group so FSDP's collectives stay inside it.
    """
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(group, device_type, mesh=list(ranks))
    if mesh.size() != len(ranks) or dist.get_rank() not in ranks:
        raise DinodistError(f"device mesh over ranks {list(ranks)} does not contain rank {dist.get_rank()}")
    return mesh


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
