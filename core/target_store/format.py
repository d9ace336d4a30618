"""On-disk layout of a target store: file names, index-record framing, checksums, manifest schema.

A store is a directory (spec: docs/target-store.md):

    manifest.json        what produced the targets; written once, atomically
    last_layers.bin      the teacher heads' prototype layers, one framed blob, written atomically
    shard-00000.bin      raw tensor bytes of consecutive iterations, append-only
    shard-00000.idx      one framed msgpack record per iteration of that shard, append-only
    retention.json       lowest shard / iteration retention kept, once it has deleted any
    writer.lock          host, pid and start time of the one writer that has the store open
    CLOSED               present once the writer has closed the store; names the last iteration

An index record is appended only after its data bytes are in the shard, and is framed as
MAGIC | u32 payload length | u32 crc32(length + payload) | msgpack payload, so a reader takes
records up to the first one that is short or whose data lies past the end of the .bin file, and
a crash at any point leaves a readable prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from dinodist.core.errors import DinodistError
from dinodist.core.target_store.sizes import (
    DTYPE_SIZES,
    ENCODINGS,
    FLOAT_DTYPES,
    FLOAT_ENCODINGS,
    encoded_nbytes,
    row_nbytes,
)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LAST_LAYERS_FILE = "last_layers.bin"
CLOSED_FILE = "CLOSED"
RETENTION_FILE = "retention.json"
LOCK_FILE = "writer.lock"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.idx$")
SHARD_FILE_RE = re.compile(r"^shard-(\d{5,})\.(idx|bin)$")
INDEX_MAGIC = b"DDIX"
LAST_LAYERS_MAGIC = b"DDLL"
FRAME = struct.Struct("<4sII")  # magic, payload length, crc32 of (length bytes + payload)
ALIGN = 64  # every tensor segment starts 64-byte aligned so decoded views are aligned too
MAX_RECORD_BYTES = 16 << 20  # an index payload holds metadata only; anything bigger is corruption
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
MAX_NDIM = 8

TARGET_KINDS = ("heads", "features")
# Fields every manifest must carry (name -> accepted types); the writer adds the rest.
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "teacher_hash": (str,),
    "teacher_arch": (str,),
    "data_fingerprint": (str,),
    "crop_config": (dict,),
    "target_kind": (str,),
    "topology": (str,),
    "global_batch_size": (int,),
}
# check_compatible compares these first, in this order, then any other expected field.
COMPAT_ORDER = ("teacher_hash", "teacher_arch", "data_fingerprint", "crop_config", "target_kind")


def shard_name(k: int, ext: str) -> str:
    return f"shard-{k:05d}.{ext}"


def pad_to(n: int) -> int:
    return -n % ALIGN


def digest(chunks: list[memoryview | bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.digest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, the form a manifest's teacher_hash takes for a checkpoint."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise DinodistError(f"{path}: cannot hash teacher checkpoint ({e.strerror})") from e
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------- manifest


def _jsonable(value: Any) -> Any:
    # Dataclasses (CropConfig) and tuples are compared as their JSON form, which is what is stored.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, sort_keys=True))


def validate_manifest(manifest: dict, where: str = "manifest") -> dict:
    """A JSON-normalised copy of `manifest`, or DinodistError naming the first bad field."""
    if not isinstance(manifest, dict):
        raise DinodistError(f"{where}: must be a mapping, got {type(manifest).__name__}")
    try:
        m = _jsonable(manifest)
    except (TypeError, ValueError) as e:
        raise DinodistError(f"{where}: not JSON-serialisable ({e})") from e
    for field, types in REQUIRED_FIELDS.items():
        if field not in m:
            raise DinodistError(f"{where}: missing field '{field}'")
        if not isinstance(m[field], types) or isinstance(m[field], bool):
            raise DinodistError(f"{where}: field '{field}' must be {types[0].__name__}, got {m[field]!r}")
    if m["target_kind"] not in TARGET_KINDS:
        raise DinodistError(f"{where}: field 'target_kind' must be one of {list(TARGET_KINDS)}")
    if m["global_batch_size"] <= 0:
        raise DinodistError(f"{where}: field 'global_batch_size' must be positive")
    if "format_version" in m and m["format_version"] != FORMAT_VERSION:
        raise DinodistError(
            f"{where}: field 'format_version' is {m['format_version']!r}, "
            f"this dinodist reads {FORMAT_VERSION}"
        )
    if "dtype" in m and m["dtype"] not in FLOAT_ENCODINGS:
        raise DinodistError(f"{where}: field 'dtype' must be one of {list(FLOAT_ENCODINGS)}")
    return m


def check_compatible(manifest: dict, expected: dict) -> None:
    """Raise DinodistError naming the first field where the store differs from what a run expects."""
    m = _jsonable(manifest)
    e = _jsonable(expected)
    for field in [f for f in COMPAT_ORDER if f in e] + [f for f in e if f not in COMPAT_ORDER]:
        if field not in m:
            raise DinodistError(f"target store manifest: missing field '{field}' (expected {e[field]!r})")
        if m[field] != e[field]:
            raise DinodistError(
                f"target store manifest: field '{field}' is {_short(m[field])} but this run expects "
                f"{_short(e[field])}"
            )


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------- state files


def _read_state(path: Path) -> dict | None:
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DinodistError(f"{path}: cannot read ({e.strerror})") from e
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise DinodistError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise DinodistError(f"{path}: must be a JSON object")
    return d


def _nonneg(d: dict, key: str, path: Path, allow_none: bool = False) -> int | None:
    v = d.get(key)
    if v is None and allow_none:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise DinodistError(f"{path}: field '{key}' must be a non-negative int, got {v!r}")
    return v


def read_retention(store: Path) -> tuple[int, int]:
    """(first_shard, first_iteration) that retention kept: shards and iterations below them were
    deleted on purpose. (0, 0) when retention never deleted anything."""
    path = store / RETENTION_FILE
    d = _read_state(path)
    if d is None:
        return 0, 0
    return _nonneg(d, "first_shard", path), _nonneg(d, "first_iteration", path)


def read_closed(store: Path) -> tuple[bool, int | None]:
    """(whether CLOSED exists, the last iteration it names; None for a store closed empty)."""
    path = store / CLOSED_FILE
    d = _read_state(path)
    if d is None:
        return False, None
    if "last_iteration" not in d:
        raise DinodistError(f"{path}: missing field 'last_iteration'")
    return True, _nonneg(d, "last_iteration", path, allow_none=True)


# ---------------------------------------------------------------- framing


def frame(payload: bytes, magic: bytes = INDEX_MAGIC) -> bytes:
    n = struct.pack("<I", len(payload))
    return FRAME.pack(magic, len(payload), zlib.crc32(n + payload)) + payload


@dataclass
class Unframed:
    """Result of reading one frame at a position: a payload, or why there is none."""

    payload: bytes | None
    end: int  # byte just past the frame (only meaningful with a payload)
    status: str  # "ok", "short" (frame runs past the end of the bytes), "bad" (crc/magic mismatch)


def unframe(buf: bytes | memoryview, pos: int, magic: bytes = INDEX_MAGIC) -> Unframed:
    if len(buf) - pos < FRAME.size:
        return Unframed(None, pos, "short")
    got_magic, n, crc = FRAME.unpack_from(buf, pos)
    if got_magic != magic or n > MAX_RECORD_BYTES:
        return Unframed(None, pos, "bad")
    end = pos + FRAME.size + n
    if end > len(buf):
        return Unframed(None, pos, "short")
    payload = bytes(buf[pos + FRAME.size : end])
    if zlib.crc32(struct.pack("<I", n) + payload) != crc:
        return Unframed(None, pos, "bad")
    return Unframed(payload, end, "ok")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack(payload: bytes) -> Any:
    # msgpack bounds its own allocations by the input length; no pickle, no extension types.
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_no_ext)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # source dtype (what `raw` decodes to; floats otherwise decode to float32)
    enc: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard (or blob)
    nbytes: int
    scale_offset: int  # int8 only; 0 and scale_nbytes 0 otherwise
    scale_nbytes: int

    def to_msg(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "enc": self.enc,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "scale_offset": self.scale_offset,
            "scale_nbytes": self.scale_nbytes,
        }


@dataclass(frozen=True)
class Record:
    iteration: int
    shard: int
    start: int  # data bytes [start, end) of the shard belong to this record
    end: int
    tensors: tuple[TensorEntry, ...]
    meta: dict
    digest: bytes


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DinodistError(
            f"target store: tensor name {name!r} must match {NAME_RE.pattern} (letters, digits, _ . -)"
        )
    return name


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what} must be a non-negative int, got {v!r}")
    return v


def parse_tensor_entry(d: Any, lo: int, hi: int) -> TensorEntry:
    """Validate one index tensor entry: whitelisted name/dtype/encoding, sizes consistent with the
    shape, and byte ranges inside the record's [lo, hi)."""
    if not isinstance(d, dict):
        raise ValueError("tensor entry is not a map")
    if not isinstance(d.get("name"), str) or not NAME_RE.match(d["name"]):
        raise ValueError(f"tensor name {d.get('name')!r} must match {NAME_RE.pattern}")
    dtype, enc = d.get("dtype"), d.get("enc")
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"dtype {dtype!r} not allowed")
    if enc not in ENCODINGS or (enc != "raw" and dtype not in FLOAT_DTYPES):
        raise ValueError(f"encoding {enc!r} not allowed for dtype {dtype}")
    shape = d.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ValueError("shape must be a list of at most 8 ints")
    shape_t = tuple(_int(s, "shape entry") for s in shape)
    offset, nbytes = _int(d.get("offset"), "offset"), _int(d.get("nbytes"), "nbytes")
    soff, snb = _int(d.get("scale_offset"), "scale_offset"), _int(d.get("scale_nbytes"), "scale_nbytes")
    want, want_scale = encoded_nbytes(shape_t, enc, dtype)
    if nbytes != want or snb != want_scale:
        raise ValueError(f"tensor {d['name']}: sizes {nbytes}/{snb} do not match shape {list(shape_t)} {enc}")
    if not (lo <= offset and offset + nbytes <= hi) or (snb and not (lo <= soff and soff + snb <= hi)):
        raise ValueError(f"tensor {d['name']}: byte range outside its record")
    return TensorEntry(d["name"], dtype, enc, shape_t, offset, nbytes, soff, snb)


def parse_record(payload: bytes, shard: int) -> Record:
    """Decode and validate an index payload (raises ValueError; callers name the file)."""
    d = unpack(payload)
    if not isinstance(d, dict):
        raise ValueError("record is not a map")
    it = _int(d.get("iteration"), "iteration")
    start, end = _int(d.get("start"), "start"), _int(d.get("end"), "end")
    if end < start:
        raise ValueError("record end before start")
    tensors = d.get("tensors")
    if not isinstance(tensors, list):
        raise ValueError("tensors must be a list")
    entries = tuple(parse_tensor_entry(t, start, end) for t in tensors)
    if len({e.name for e in entries}) != len(entries):
        raise ValueError("duplicate tensor names")
    meta = d.get("meta")
    if not isinstance(meta, dict):
        raise ValueError("meta must be a map")
    dg = d.get("digest")
    if not isinstance(dg, bytes) or len(dg) != 16:
        raise ValueError("digest must be 16 bytes")
    return Record(it, shard, start, end, entries, meta, dg)


def record_payload(
    iteration: int, start: int, end: int, entries: list[TensorEntry], meta: dict, dg: bytes
) -> bytes:
    return pack(
        {
            "iteration": iteration,
            "start": start,
            "end": end,
            "tensors": [e.to_msg() for e in entries],
            "meta": meta,
            "digest": dg,
        }
    )


# ---------------------------------------------------------------- cost model


def bytes_per_image(
    targets: str = "heads",
    dino_dim: int = 512,
    ibot_dim: int = 384,
    n_global: int = 2,
    patches_per_crop: int = 256,
    masked_fraction: float = 0.5 * 0.3,
    dtype: str = "bf16",
    feature_dim: int = 4096,
    patch_fraction: float = 1.0,
) -> float:
    """Expected store bytes per image per iteration.

    heads: one DINO bottleneck row per global crop, one iBOT bottleneck row per masked patch
    (`masked_fraction` of the patches on average: the official collate masks half of the crops
    with ratios spread evenly over [0.1, 0.5], i.e. 0.5 * 0.3), plus the per-crop masked counts.
    features: one CLS row per global crop plus `patch_fraction` of the patch rows, `feature_dim` wide.
    Both add the sample id and seed (two int64).
    """
    if dtype not in FLOAT_ENCODINGS:
        raise DinodistError(f"store cost: dtype {dtype!r} is not one of {list(FLOAT_ENCODINGS)}")
    ids = 2 * 8
    if targets == "heads":
        dino = n_global * row_nbytes(dino_dim, dtype)
        ibot = n_global * patches_per_crop * masked_fraction * row_nbytes(ibot_dim, dtype)
        return dino + ibot + n_global * 8 + ids
    if targets == "features":
        cls = n_global * row_nbytes(feature_dim, dtype)
        patch = n_global * patches_per_crop * patch_fraction * row_nbytes(feature_dim, dtype)
        return cls + patch + ids
    raise DinodistError(f"store cost: targets {targets!r} is not one of {list(TARGET_KINDS)}")


# Index record + alignment padding per iteration, measured on small stores (a few hundred bytes,
# dominated by the msgpack tensor entries); negligible beside the data at any real batch size.
RECORD_OVERHEAD_BYTES = 1024


def bytes_per_million_iterations(global_batch: int, **kwargs: Any) -> float:
    """Store bytes for 10^6 iterations of `global_batch` images; kwargs as in bytes_per_image."""
    if global_batch <= 0:
        raise DinodistError(f"store cost: global_batch must be positive, got {global_batch}")
    return 1e6 * (global_batch * bytes_per_image(**kwargs) + RECORD_OVERHEAD_BYTES)
