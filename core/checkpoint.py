"""Training checkpoints: torch.distributed.checkpoint (DCP) of model + optimizer, iteration, RNG state.

Layout: `<root>/<iteration>/` holds the DCP shards (loadable on any number of ranks: FSDP2 and plain modules
share the same keys), `meta.json` (iteration, world size, anything JSON the caller adds) and one
`rng-rank<r>.pt` per rank. Atomicity: every rank writes into `<root>/.tmp-<iteration>/`, and only after all
of them are done rank 0 renames it; a directory without the `.tmp-` prefix is therefore always complete, and
a crash mid-save leaves the previous checkpoints untouched. Only the newest `keep` checkpoints are kept.
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


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict[str, torch.Tensor]:
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
    keep: int = 2,
) -> Path:
    """Save on every rank (collective); returns the final directory."""
    rank, world = _rank_world()
    root = Path(root)
    final = root / str(iteration)
    tmp = root / f".tmp-{iteration}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of a save that crashed
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = _state(model, optimizer)
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        info = {"iteration": iteration, "world_size": world, **(meta or {})}
        (tmp / _META).write_text(json.dumps(info, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    if optimizer is None:
        model_sd, _ = get_state_dict(model, [])
        return model_sd, {}
    return get_state_dict(model, optimizer)


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / _META
    if not p.is_file():
        raise DinodistError(f"{path}: not a dinodist checkpoint (no {_META})")
    return json.loads(p.read_text())


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (any world size) and return its meta.

    RNG states are restored only when the world size matches: on a different world size each rank's random
    stream is necessarily new.
    """
    path = Path(path)
    meta = read_meta(path)
    rank, world = _rank_world()
    model_sd, optim_sd = _state(model, optimizer)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises a CheckpointException wrapping per-rank tracebacks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DinodistError(f"{path}: cannot load checkpoint ({first[:200]})") from None
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-rank{rank}.pt"
    if restore_rng and meta.get("world_size") == world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta


def load_model_only(path: str | Path, model: nn.Module, prefix: str | None = None) -> dict[str, Any]:
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
            dcp.load({"model": keyed}, checkpoint_id=str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DinodistError(f"{path}: cannot load {prefix or 'model'} ({first[:200]})") from None
    plen = len(prefix) + 1 if prefix else 0
    set_state_dict(model, [], model_state_dict={k[plen:]: v for k, v in keyed.items()}, optim_state_dict={})
    return meta
