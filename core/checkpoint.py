"""Training checkpoints: torch.distributed.checkpoint (DCP) of model + optimizer, iteration, RNG state.

Layout: `<root>/<iteration>/` holds the DCP shards (loadable on any number of ranks: FSDP2 and plain modules
share the same keys), `meta.json` (iteration, world size, anything JSON the caller adds) and one
`rng-rank<r>.pt` per rank. Atomicity: every rank writes into `<root>/.tmp-<iteration>/`, and only after all
of them are done rank 0 renames it; a directory without the `.tmp-` prefix is therefore always complete, and
a crash mid-save leaves the previous checkpoints untouched. Only the newest `keep` checkpoints are kept
(`keep=None`: all).

`group`: the process group that owns the model (a student group is a sub-group of the run's world); ranks,
world size, barriers and DCP's collectives are those of the group, None meaning the whole world.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dinodist.core.errors import DinodistError

_META = "meta.json"


@contextlib.contextmanager
def _quiet():
    """Single-process runs save without a process group on purpose; DCP warns about that on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _barrier(group: dist.ProcessGroup | None) -> None:
    if _distributed():
        dist.barrier(group=group)


def _first_line(exc: BaseException) -> str:
    # DCP's CheckpointException holds each failed rank's exception and traceback; the first rank's
    # exception, without the traceback, is the message
    if isinstance(exc, dcp.CheckpointException) and exc.failures:
        rank = min(exc.failures)
        return f"rank {rank}: {_first_line(exc.failures[rank][0])}"
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__)[:200]


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.isdigit() and (d / _META).is_file():
            found.append((int(d.name), d))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch (and CUDA) generator states."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: str | Path,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any] | None = None,
    keep: int | None = 2,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Save on every rank of `group` (collective); returns the final directory `<root>/<iteration>`."""
    rank, world = _rank_world(group)
    # serialised on every rank before any collective: meta that is not JSON fails everywhere, not on rank 0
    meta_text = json.dumps({"iteration": iteration, "world_size": world, **(meta or {})}, indent=1)
    root = Path(root)
    final = root / str(iteration)
    tmp = root / f".tmp-{iteration}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of a save that crashed
        tmp.mkdir()
    _barrier(group)
    model_sd, optim_sd = _state(model, optimizer)
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), process_group=group)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    _barrier(group)
    if rank == 0:
        (tmp / _META).write_text(meta_text)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep is not None:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(group)
    return final


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    if optimizer is None:
        model_sd, _ = get_state_dict(model, [])
        return model_sd, {}
    return get_state_dict(model, optimizer)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta.json of a checkpoint directory (DinodistError if it is missing or not a JSON object)."""
    p = Path(path) / _META
    if not p.is_file():
        raise DinodistError(f"{path}: not a dinodist checkpoint (no {_META})")
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DinodistError(f"{path}: unreadable {_META} ({_first_line(exc)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int):
        raise DinodistError(f"{path}: {_META} has no integer 'iteration'")
    return meta


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Load a checkpoint of `save_checkpoint` (any world size) on every rank of `group`; return its meta.

    RNG states are restored only when the world size matches: on a different world size each rank's random
    stream is necessarily new.
    """
    path = Path(path)
    meta = read_meta(path)
    rank, world = _rank_world(group)
    model_sd, optim_sd = _state(model, optimizer)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path), process_group=group)
    # whatever DCP raises (a missing shard, a torn file), the user gets one line; its CheckpointException
    # derives from BaseException, not Exception
    except (Exception, dcp.CheckpointException) as exc:
        raise DinodistError(f"{path}: cannot load checkpoint ({_first_line(exc)})") from None
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-rank{rank}.pt"
    if restore_rng and meta.get("world_size") == world and rng_file.is_file():
        try:
            rng = torch.load(rng_file, weights_only=True)
        except Exception as exc:
            raise DinodistError(f"{rng_file}: cannot load RNG state ({_first_line(exc)})") from None
        set_rng_state(rng)
    return meta


def load_model_only(
    path: str | Path, model: nn.Module, prefix: str | None = None, group: dist.ProcessGroup | None = None
) -> dict[str, Any]:
    """Load only model tensors (optionally only keys under `prefix.`) from a checkpoint into `model`.

    `model` is the module that owns the keys after stripping `prefix.` — e.g. load the EMA teacher of
    another run into a Gram teacher: prefix="teacher.backbone", model=gram_backbone.
    """
    path = Path(path)
    meta = read_meta(path)
    target, _ = _state(model, None)
    keyed = {f"{prefix}.{k}" if prefix else k: v for k, v in target.items()}
    try:
        with _quiet():
            dcp.load({"model": keyed}, checkpoint_id=str(path), process_group=group)
    except (Exception, dcp.CheckpointException) as exc:
        raise DinodistError(f"{path}: cannot load {prefix or 'model'} ({_first_line(exc)})") from None
    plen = len(prefix) + 1 if prefix else 0
    set_state_dict(model, [], model_state_dict={k[plen:]: v for k, v in keyed.items()}, optim_state_dict={})
    return meta
