"""Backbone checkpoint I/O in the official DINOv3 format (a flat state dict, no prefix).

Reading accepts the three layouts users hand us: a released hub file (flat), a file wrapping the
state dict under "model", and an official teacher export {"teacher": {"backbone.*", "dino_head.*", ...}}.
Every problem is reported as one `DinodistError` line naming the file and the arch.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from dinodist.core.errors import DinodistError
from dinodist.core.models.arch import ArchSpec
from dinodist.core.models.vit import DinoVisionTransformer, build_backbone
from dinodist.core.target_store.format import file_sha256

_SHOW = 3  # offending keys named per category before "(+N more)"


def save_backbone(model: DinoVisionTransformer, path: str | os.PathLike) -> None:
    """Write the backbone's flat state dict (official keys, CPU tensors) atomically to `path`."""
    path = Path(path)
    if any(v.device.type == "meta" for v in model.state_dict().values()):
        raise DinodistError(f"checkpoint {path}: cannot save a model built on the meta device")
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_sidecar(path: str | os.PathLike, meta: dict) -> Path:
    """`<path>.json` describing the checkpoint at `path`, written atomically (a reader never sees half)."""
    side = Path(str(path) + ".json")
    tmp = Path(str(side) + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, side)
    return side


def read_sidecar(path: str | os.PathLike, require_arch: bool = False) -> dict | None:
    """The `<path>.json` describing the checkpoint at `path`, or None when there is none; unreadable or
    not an object (or, with `require_arch`, without an 'arch') is a one-line error naming the file."""
    side = Path(str(path) + ".json")
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DinodistError(f"{side}: unreadable sidecar ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise DinodistError(f"{side}: a sidecar must be a JSON object")
    if require_arch and not isinstance(meta.get("arch"), str):
        raise DinodistError(f"{side}: sidecar has no 'arch'")
    return meta


def _unwrap(obj: object, source: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        teacher = obj["teacher"]
        backbone = {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}
        if not backbone:
            raise DinodistError(f"checkpoint {source}: 'teacher' entry has no 'backbone.*' keys")
        obj = backbone
    if not isinstance(obj, dict):
        raise DinodistError(f"checkpoint {source}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise DinodistError(f"checkpoint {source}: entry {bad[0]!r} is not a tensor")
    return obj


def _load_failure(e: Exception) -> str:
    # torch's messages run over several paragraphs; keep the one line that says what went wrong.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    refused = [ln[ln.index("Unsupported global") :] for ln in lines if "Unsupported global" in ln]
    if refused:
        return f"refused by weights_only loading (holds more than tensors): {refused[0].split(' was not')[0]}"
    fallback = lines[0] if lines else type(e).__name__
    detail = next((ln for ln in lines if ln.startswith("Unsupported")), fallback)
    return f"cannot be read (corrupt or not a torch checkpoint): {detail}"


def load_file(path: str | os.PathLike, label: str = "checkpoint", *, mmap: bool = False) -> object:
    """torch.load on CPU with weights_only=True; any failure is one line `<label> <path>: why`.

    `mmap`: tensors are views of the file's pages (read on first touch, shared by every process that
    maps the file) instead of a private copy. Files in torch's legacy (pre-zip) format cannot be
    mapped and are read as before.
    """
    path = Path(path)
    if not path.is_file():
        raise DinodistError(f"{label} {path}: no such file")
    kwargs = {"mmap": True} if mmap and zipfile.is_zipfile(path) else {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise DinodistError(f"{label} {path}: {_load_failure(e)}") from e


def file_record(path: str | os.PathLike) -> dict:
    """What a sidecar records about the checkpoint it describes: size, mtime and sha256 (hashed once, here).

    `recorded_sha256` trusts the hash only while the file keeps this size and mtime.
    """
    st = Path(path).stat()
    digest = file_sha256(path)
    if Path(path).stat().st_mtime_ns != st.st_mtime_ns:
        raise DinodistError(f"{path}: modified while it was being hashed")
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def recorded_sha256(path: str | os.PathLike, record: object) -> str | None:
    """The "sha256:<hex>" in a sidecar `record` (a `file_record`) if it still matches the file, else None."""
    if not isinstance(record, dict):
        return None
    digest = record.get("sha256")
    if not (isinstance(digest, str) and digest.startswith("sha256:") and len(digest) == 71):
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None
    return digest


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a backbone state dict on CPU with weights_only=True, unwrapping "model"/"teacher" layouts."""
    return _unwrap(load_file(path), str(path))


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str, arch: str) -> None:
    """Raise one line naming the first missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if shapes:
        problems.append(f"wrong shape {_names(shapes)}")
    if problems:
        raise DinodistError(f"checkpoint {source} does not match arch {arch}: " + "; ".join(problems))


def load_backbone_state(
    model: DinoVisionTransformer, state: dict[str, Tensor], source: str = "state dict"
) -> DinoVisionTransformer:
    """Strictly load `state` into `model` (in place; a meta-device model takes the tensors as they are)."""
    arch = model.spec.name if isinstance(getattr(model, "spec", None), ArchSpec) else type(model).__name__
    check_state_dict(model, state, source, arch)
    on_meta = any(t.device.type == "meta" for t in model.state_dict().values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def load_backbone(
    path: str | os.PathLike, arch: str | ArchSpec, *, dtype: torch.dtype = torch.float32, **overrides
) -> DinoVisionTransformer:
    """Build `arch` without random init and fill it from the checkpoint at `path` (cast to `dtype`)."""
    model = build_backbone(arch, device="meta", **overrides)
    state = read_state_dict(path)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return load_backbone_state(model, state, source=str(path))
