"""Process-group helpers shared by every rank: env:// init, local spawning, sub-groups and their meshes.

One torch.distributed world holds every rank of a run (teacher and all student groups). Each
group is a sub-group of that world. `torch.distributed.new_group` is itself a collective over
the world: every rank must create every sub-group, in the same order, even those it is not
in. `make_subgroups` does exactly that so callers cannot get the order wrong.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dinodist.core.errors import DinodistError
from dinodist.core.net import free_port

_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
BACKENDS = ("auto", "nccl", "gloo")


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


def choose_backend(nproc: int, requested: str = "auto", flag: str = "--backend") -> str:
    """The backend of `nproc` local ranks: `auto` is NCCL with one GPU per rank when CUDA is there, else gloo.

    More ranks than visible GPUs is an error rather than ranks sharing a GPU (NCCL refuses two ranks on
    one device, and gloo cannot reduce-scatter CUDA tensors for FSDP); `gloo` asks for CPU ranks.
    """
    if requested not in BACKENDS:
        raise DinodistError(f"{flag}: unknown backend {requested!r}; known: {', '.join(BACKENDS)}")
    if requested == "gloo" or (requested == "auto" and not torch.cuda.is_available()):
        return "gloo"
    if not torch.cuda.is_available():
        raise DinodistError(f"{flag} nccl: CUDA is not available (torch.cuda.is_available() is False)")
    visible = torch.cuda.device_count()
    if nproc > visible:
        raise DinodistError(f"--nproc {nproc}: only {visible} CUDA device(s) visible, one per rank "
                            f"(lower --nproc, or {flag} gloo for CPU ranks)")
    return "nccl"


def init_local_rank(rank: int, world: int, port: int, backend: str, timeout_s: float) -> DistInfo:
    """Join a single-machine world on 127.0.0.1:`port` as `rank`, with the device `backend` needs.

    NCCL: `torch.cuda.set_device(rank)` before the group exists, so the rank's communicator, its
    `cuda.current_device()` and everything it allocates live on GPU `rank`, not all on GPU 0. gloo:
    CUDA is hidden from this process (it must not have touched CUDA yet), so code that picks CUDA
    when available runs on the CPU that gloo's collectives expect.
    """
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    kwargs = {"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return DistInfo(rank=rank, world_size=world, local_rank=rank, backend=backend)


def _spawned(rank: int, world: int, port: int, backend: str, errors, fn: Callable, args: tuple,
             timeout_s: float) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        init_local_rank(rank, world, port, backend, timeout_s)
        fn(*args)
    except DinodistError as exc:
        errors.put((rank, str(exc)))
        raise SystemExit(2) from None
    except BaseException as exc:  # noqa: BLE001 - any failure must reach the parent as one line
        last = traceback.format_exc().strip().splitlines()[-1]
        errors.put((rank, f"rank {rank} failed: {last}"))
        raise SystemExit(1) from exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn: Callable[..., Any], nproc: int, args: tuple = (), backend: str = "auto",
                timeout_s: float = 600.0, grace_s: float = 5.0) -> str:
    """Run fn(*args) on `nproc` local ranks joined on 127.0.0.1; raise the first failing rank's error.

    The backend is `choose_backend(nproc, backend)`; rank r uses GPU r under NCCL. Once a rank has
    failed the others get `grace_s` (they are usually blocked in a collective) and are then terminated.
    Returns the backend the ranks used.
    """
    import torch.multiprocessing as mp

    chosen = choose_backend(nproc, backend)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_spawned, args=(r, nproc, port, chosen, errors, fn, args, timeout_s), daemon=False)
        for r in range(nproc)
    ]
    for p in procs:
        p.start()
    failed_at = None
    while any(p.is_alive() for p in procs):
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        time.sleep(0.05)
    for p in procs:
        p.join()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    if msgs:
        raise DinodistError(sorted(msgs)[0][1])
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise DinodistError(f"rank {bad[0][0]} exited with code {bad[0][1]}")
    return chosen


# an SSL rank may wait in a collective for minutes (a checkpoint save, a slow rank's data loading)
SSL_TIMEOUT_S = 600.0


def under_torchrun() -> bool:
    """Started by torchrun (or anything that sets its env:// variables)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


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
