"""Encodings of float target tensors on disk: fp32, bf16 bits, or int8 with one scale per row.

Targets are mostly L2-normalised bottleneck vectors (unit rows), so a per-row symmetric int8
scale keeps the relative error of every row at about 1/254 of its largest entry, for 1/4 of the
fp32 bytes. A "row" is the last dimension; a 0-d or 1-d tensor is one row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dinodist.core.errors import DinodistError
from dinodist.core.target_store.sizes import (
    DTYPE_SIZES,
    ENCODINGS,
    rows_and_dim,
)

_TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_SIZES}


def dtype_name(dtype: torch.dtype) -> str:
    """The store's name for a torch dtype ("float32", "int64", ...); refuses dtypes it cannot hold."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise DinodistError(f"target store: tensor dtype {name} is not one of {sorted(DTYPE_SIZES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in _TORCH_DTYPES:
        raise DinodistError(f"target store: dtype {name!r} is not one of {sorted(DTYPE_SIZES)}")
    return _TORCH_DTYPES[name]


def _as_bytes(t: torch.Tensor) -> memoryview:
    # numpy has no bfloat16, so every tensor goes through an integer view of the same width.
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return memoryview(np.ascontiguousarray(t.numpy()).reshape(-1).view(np.uint8))


def encode(x: torch.Tensor, enc: str) -> tuple[memoryview, memoryview | None]:
    """Bytes of a CPU tensor in encoding `enc`, and for int8 the float32 per-row scales."""
    x = x.detach().cpu().contiguous()
    if enc == "raw":
        dtype_name(x.dtype)
        return _as_bytes(x), None
    if not x.is_floating_point():
        raise DinodistError(f"target store: encoding {enc} needs a float tensor, got {x.dtype}")
    if enc == "fp32":
        return _as_bytes(x.to(torch.float32)), None
    if enc == "bf16":
        return _as_bytes(x.to(torch.bfloat16)), None
    if enc == "int8":
        rows, dim = rows_and_dim(tuple(x.shape))
        flat = x.to(torch.float32).reshape(rows, dim)
        scale = flat.abs().amax(dim=1) / 127.0 if dim else torch.zeros(rows)
        # An all-zero row keeps scale 0 (decodes to zeros); dividing by 1 there avoids 0/0.
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(flat / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return _as_bytes(q), _as_bytes(scale.to(torch.float32))
    raise DinodistError(f"target store: encoding {enc!r} is not one of {list(ENCODINGS)}")


def decode(
    data: bytearray | memoryview,
    shape: list[int],
    enc: str,
    dtype: str,
    scales: bytearray | memoryview | None = None,
) -> torch.Tensor:
    """Inverse of `encode`: float encodings (and raw floats) come back as float32, integers as stored.

    `data` must be writable (a bytearray or a view of one) so torch can wrap it without a copy.
    """
    numel = math.prod(shape)
    if enc == "fp32":
        out = _frombuffer(data, torch.float32, numel)
    elif enc == "bf16":
        out = _frombuffer(data, torch.int16, numel).view(torch.bfloat16).to(torch.float32)
    elif enc == "int8":
        rows, dim = rows_and_dim(shape)
        q = _frombuffer(data, torch.int8, numel).reshape(rows, dim)
        s = _frombuffer(scales, torch.float32, rows) if rows else torch.zeros(0)
        out = q.to(torch.float32) * s[:, None]
    elif enc == "raw":
        t = torch_dtype(dtype)
        if t in (torch.bfloat16, torch.float16):
            out = _frombuffer(data, torch.int16, numel).view(t).to(torch.float32)
        elif t == torch.bool:
            out = _frombuffer(data, torch.uint8, numel).view(torch.bool)
        else:
            out = _frombuffer(data, t, numel)
    else:
        raise DinodistError(f"target store: encoding {enc!r} is not one of {list(ENCODINGS)}")
    return out.reshape(shape)


def _frombuffer(buf: bytearray | memoryview | None, dtype: torch.dtype, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count)
