"""Sizes of stored target tensors per encoding, as plain arithmetic (no torch).

The encodings themselves are in quant.py; the manifest/record format (format.py) and the planner's
store-cost estimate only need the byte counts, so they read them here without loading torch.
"""

from __future__ import annotations

import math

from dinodist.core.errors import DinodistError

FLOAT_ENCODINGS = ("fp32", "bf16", "int8")
# "raw": the tensor's own bytes (integer/bool tensors, and the teacher's last layers).
ENCODINGS = FLOAT_ENCODINGS + ("raw",)

# Element sizes of the dtypes a store may hold; anything else is refused on write and on read.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT8_SCALE_BYTES = 4  # float32 scale per row


def rows_and_dim(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, row length) of a tensor viewed as [-1, last dim]."""
    if len(shape) == 0:
        return 1, 1
    dim = int(shape[-1])
    return (math.prod(shape[:-1]) if dim else 0), dim


def encoded_nbytes(shape: tuple[int, ...] | list[int], enc: str, dtype: str) -> tuple[int, int]:
    """(data bytes, scale bytes) of a tensor of `shape` and source `dtype` stored as `enc`."""
    numel = math.prod(shape)
    if enc == "fp32":
        return 4 * numel, 0
    if enc == "bf16":
        return 2 * numel, 0
    if enc == "int8":
        rows, _ = rows_and_dim(shape)
        return numel, INT8_SCALE_BYTES * rows
    if enc == "raw":
        return DTYPE_SIZES[dtype] * numel, 0
    raise DinodistError(f"target store: encoding {enc!r} is not one of {list(ENCODINGS)}")


def row_nbytes(dim: int, enc: str) -> float:
    """Bytes one row of `dim` floats takes when stored as `enc` (the int8 scale included)."""
    if enc not in FLOAT_ENCODINGS:
        raise DinodistError(f"target store: dtype {enc!r} is not one of {list(FLOAT_ENCODINGS)}")
    data, scale = encoded_nbytes((1, dim), enc, "float32")
    return float(data + scale)
