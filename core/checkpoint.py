"""Training checkpoints: torch.distributed.checkpoint (DCP) of model + optimizer, iteration, RNG state.

Layout: `<root>/<iteration>/` holds the DCP shards (loadable on any number of ranks: FSDP2 and plain modules
share the same keys), `meta.json` (iteration, world size, anything JSON the caller adds), one
`rng-rank<r>.pt` per rank and the completion marker `COMPLETE.json`. Atomicity: every rank writes into
`<root>/.tmp-<iteration>/`; after all of them are done rank 0 fsyncs every file, writes the marker (each
file's size and the sha256 of DCP's `.metadata`), and renames the folder. A crash mid-save therefore leaves
the previous checkpoints untouched, and only the newest `keep` checkpoints are kept (`keep=None`: all).

Why the marker holds a checksum: DCP's `.metadata` is a pickle that torch unpickles on load, so nothing is
loaded from a folder whose marker is missing (not written by dinodist) or whose `.metadata` does not hash to
what the marker says. `verify_checkpoint` checks that and every file's size without reading the shards;
`latest_valid_checkpoint` walks back from the newest checkpoint past broken ones, warning about each, which
is what a resume after a crash (a torn `.distcp`, an empty `meta.json`) needs.

`group`: the process group that owns the model (a student group is a sub-group of the run's world); ranks,
world size, barriers and DCP's collectives are those of the group, None meaning the whole world.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
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
MARKER = "COMPLETE.json"
_DCP_METADATA = ".metadata"

log = logging.getLogger(__name__)


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
    """Checkpoints under `root` that carry a completion marker, oldest first (not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.isdigit() and (d / MARKER).is_file():
            found.append((int(d.name), d))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` with a completion marker, or None (see latest_valid_checkpoint)."""
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(folder: Path) -> None:
    """Rank 0, every rank's files written: fsync them, then write the marker (itself fsynced) last."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MARKER:
            _fsync(p)
            files[p.name] = p.stat().st_size
    marker = {"files": files, "metadata_sha256": _sha256(folder / _DCP_METADATA)}
    with open(folder / MARKER, "w") as f:
        f.write(json.dumps(marker, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint folder without loading it; returns its meta, raises DinodistError naming the
    folder and what is wrong (no marker, a missing or resized file, a `.metadata` that does not match)."""
    path = Path(path)
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise DinodistError(f"{path}: not a complete dinodist checkpoint (no {MARKER})")
    try:
        marker = json.loads(marker_path.read_text())
        files = dict(marker["files"])
        want_sha = str(marker["metadata_sha256"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DinodistError(f"{path}: unreadable {MARKER} ({_first_line(exc)})") from None
    for name, size in files.items():
        p = path / name
        if not p.is_file():
            raise DinodistError(f"{path}: {name} is missing")
        if p.stat().st_size != size:
            raise DinodistError(f"{path}: {name} has {p.stat().st_size} bytes, {MARKER} says {size}")
    if _DCP_METADATA not in files or _sha256(path / _DCP_METADATA) != want_sha:
        raise DinodistError(f"{path}: {_DCP_METADATA} does not match the checksum in {MARKER}")
    return read_meta(path)


def latest_valid_checkpoint(root: str | Path, at_most: int | None = None) -> Path | None:
    """The newest checkpoint under `root` (at iteration <= `at_most` if given) that passes
    `verify_checkpoint`; each broken newer one is skipped with a warning naming its folder."""
    for it, path in reversed(list_checkpoints(root)):
        if at_most is not None and it > at_most:
            continue
        try:
            verify_checkpoint(path)
        except DinodistError as exc:
            log.warning("skipping broken checkpoint %s: %s; falling back to the previous one", path, exc)
            continue
        return path
    return None


def valid_iterations(root: str | Path) -> list[int]:
    """Iterations of every checkpoint under `root` that passes `verify_checkpoint`, oldest first."""
    out = []
    for it, path in list_checkpoints(root):
        try:
            verify_checkpoint(path)
        except DinodistError as exc:
            log.warning("skipping broken checkpoint %s: %s", path, exc)
            continue
        out.append(it)
    return out


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
        _seal(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
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
    meta = verify_checkpoint(path)
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
    meta = verify_checkpoint(path)
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
