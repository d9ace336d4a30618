"""Dataset index: a source's file list written once, so ranks on many machines skip walking the tree.

The driver (which loads no torch) writes it with `write_index(spec, path)`; every rank then calls
`build_source(spec, index=path)` (core/data/sources.py). This module is also the one home of spec
parsing, folder listing and the fingerprint formula, so a source built by walking and one built from
an index list the same files in the same order and hash to the same fingerprint.

It imports no torch, numpy or PIL at module level (PIL loads only inside the `skimage` listing, which
must open each photo to keep the colour ones).

Index file (JSON), format `dinodist-data-index` version 1:

    {"format": "dinodist-data-index", "version": 1, "spec": "folder:/data/train", "kind": "folder",
     "root": "/data/train", "count": 2, "fingerprint": "<32 hex>", "classes": ["cat", "dog"],
     "files": [["cat/0.jpg", 5123, 0], ["dog/1.jpg", 4410, 1]]}

`files` rows are `[path relative to root (posix), size in bytes, label or null]` in sample order
(folder, skimage). A fashion-mnist index has `idx: [[name, size], [name, size]]` (images, labels)
instead of `files`.
"""

from __future__ import annotations

import array
import gzip
import hashlib
import importlib.util
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dinodist.core.errors import DinodistError

INDEX_FORMAT = "dinodist-data-index"
INDEX_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILE_LIST_KINDS = ("folder", "skimage")
SPEC_HELP = "expected skimage, folder:PATH, fashion-mnist:DIR:train|test"


@dataclass(frozen=True)
class SourceSpec:
    """A parsed spec: `kind`, plus the folder path (folder) or idx directory and split (fashion-mnist)."""

    kind: str
    path: str = ""
    split: str = ""


def parse_spec(spec: str) -> SourceSpec:
    """Parse `skimage`, `folder:PATH` or `fashion-mnist:DIR:train|test` (DIR may be empty)."""
    if not isinstance(spec, str) or not spec:
        raise DinodistError(f"data source spec must be a non-empty string, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "skimage":
        return SourceSpec("skimage")
    if kind == "folder":
        if not rest:
            raise DinodistError("data source 'folder:PATH' needs a PATH")
        return SourceSpec("folder", rest)
    if kind == "fashion-mnist":
        directory, sep, split = rest.rpartition(":")
        if not sep:  # "fashion-mnist:train" means the Debian package location
            directory, split = "", rest or "train"
        if split not in ("train", "test"):
            raise DinodistError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
        return SourceSpec("fashion-mnist", os.path.expanduser(directory), split)
    raise DinodistError(f"unknown data source {spec!r} ({SPEC_HELP})")


# ---------------------------------------------------------------- fingerprints


def hash_strings(parts: Iterable[str]) -> str:
    """32 hex chars of sha256 over NUL-terminated parts (the fingerprint formula of every source)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def file_list_fingerprint(kind: str, entries: Iterable[tuple[str, int]]) -> str:
    """Fingerprint of a file-list source from `(relative posix path, size)` pairs in sample order."""
    return hash_strings([kind, *(f"{rel}:{size}" for rel, size in entries)])


def fashion_mnist_fingerprint(split: str, img_header: bytes, lbl_header: bytes, label_bytes: bytes) -> str:
    """Fingerprint of Fashion-MNIST from the idx headers and the uint8 label payload."""
    # The labels are hashed as native int64 (what the numpy source always hashed), so old target-store
    # manifests keep matching.
    labels64 = array.array("q", list(label_bytes)).tobytes()
    return hash_strings(["fashion-mnist", split, img_header.hex(), lbl_header.hex(),
                         hashlib.sha256(labels64).hexdigest()])


def fingerprint_from_index(index: dict) -> str:
    """The fingerprint of the source an index describes, without torch and without touching the data.

    For folder and skimage it is recomputed from the listed names and sizes (equal to walking the
    same tree); a fashion-mnist index carries the fingerprint computed when it was written.
    """
    kind = index.get("kind")
    if kind in FILE_LIST_KINDS:
        return file_list_fingerprint(kind, ((row[0], row[1]) for row in index["files"]))
    if kind == "fashion-mnist":
        return str(index["fingerprint"])
    raise DinodistError(f"data index: unknown kind {kind!r}")


# ---------------------------------------------------------------- listing


def folder_labels(rel_parts: list[tuple[str, ...]]) -> tuple[list[int] | None, list[str] | None]:
    """ImageFolder labels: the sorted first-level sub-folder index, when every file sits in one."""
    if not rel_parts or not all(len(r) >= 2 for r in rel_parts):
        return None, None
    classes = sorted({r[0] for r in rel_parts})
    where = {c: k for k, c in enumerate(classes)}
    return [where[r[0]] for r in rel_parts], classes


def list_folder(path: str) -> tuple[Path, list[Path]]:
    """Every image under `path`, recursive, in sample order (sorted paths)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DinodistError(f"folder:{path}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DinodistError(f"folder:{path}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images found")
    return root, files


def skimage_data_dir() -> Path:
    """scikit-image's bundled `data` folder, found without importing scikit-image (numpy, scipy)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise DinodistError("source skimage: scikit-image is not installed")
    return Path(spec.origin).resolve().parent / "data"


def list_skimage() -> tuple[Path, list[Path]]:
    """The RGB photos in scikit-image's data folder, in sample order."""
    from PIL import Image  # lazily: only this listing needs to look inside the files

    root = skimage_data_dir()
    files = []
    for p in sorted(list(root.glob("*.png")) + list(root.glob("*.jpg"))):
        try:
            with Image.open(p) as img:
                if img.mode == "RGB":  # colour photos only: grayscale and RGBA drawings are left out
                    files.append(p)
        except Exception:
            continue
    if not files:
        raise DinodistError(f"source skimage: no colour images in {root}")
    return root, files


def find_fashion_mnist(directory: str, split: str) -> tuple[Path, Path]:
    """(images, labels) idx files of a Fashion-MNIST split; `.gz` or raw; empty DIR = Debian's location."""
    d = Path(directory or FASHION_MNIST_DEBIAN_DIR).expanduser()
    prefix = "train" if split == "train" else "t10k"
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found.append(next((d / n for n in (stem, stem + ".gz") if (d / n).is_file()), None))
    if None in found:
        raise DinodistError(
            f"fashion-mnist: {prefix}-images/labels idx files not found in {d} "
            "(apt-get install dataset-fashion-mnist, or pass fashion-mnist:DIR:train|test)"
        )
    return found[0], found[1]


_IDX_UBYTE = 0x08


def read_idx(path: Path, header_only: bool = False) -> tuple[bytes, tuple[int, ...], bytes]:
    """Parse an unsigned-byte idx file (optionally gzip): (header bytes, dims, payload bytes).

    With `header_only` the payload is not read (and comes back empty), so a fingerprint of a large
    image file costs a few bytes of decompression.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read(4) if header_only else f.read()
            if header_only and len(data) == 4 and data[:3] == b"\0\0" + bytes([_IDX_UBYTE]):
                data += f.read(4 * data[3])
    except OSError as exc:
        raise DinodistError(f"{path}: cannot read idx file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise DinodistError(f"{path}: not an unsigned-byte idx file (bad magic)")
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DinodistError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if header_only:
        return data[:header_len], dims, b""
    count = 1
    for d in dims:
        count *= d
    if len(data) - header_len != count:
        raise DinodistError(f"{path}: idx payload has {len(data) - header_len} bytes, header says {count}")
    return data[:header_len], dims, data[header_len:]


# ---------------------------------------------------------------- the index file


def _file_rows(root: Path, files: list[Path], labels: list[int] | None) -> list[list]:
    rows = []
    for k, f in enumerate(files):
        rows.append([f.relative_to(root).as_posix(), f.stat().st_size, None if labels is None else labels[k]])
    return rows


def describe(spec: str) -> dict:
    """The index of `spec` as a dict (what `write_index` writes), built by walking or reading headers."""
    s = parse_spec(spec)
    index: dict = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "spec": spec, "kind": s.kind}
    if s.kind in FILE_LIST_KINDS:
        root, files = list_folder(s.path) if s.kind == "folder" else list_skimage()
        labels, classes = (folder_labels([f.relative_to(root).parts for f in files]) if s.kind == "folder"
                           else (None, None))
        rows = _file_rows(root, files, labels)
        index.update(root=str(root.absolute()), count=len(rows), classes=classes,
                     fingerprint=file_list_fingerprint(s.kind, ((r[0], r[1]) for r in rows)), files=rows)
        return index
    img_path, lbl_path = find_fashion_mnist(s.path, s.split)
    img_header, dims, _ = read_idx(img_path, header_only=True)
    lbl_header, _, label_bytes = read_idx(lbl_path)
    index.update(root=str(img_path.parent.absolute()), count=int(dims[0]) if dims else 0,
                 fingerprint=fashion_mnist_fingerprint(s.split, img_header, lbl_header, label_bytes),
                 idx=[[p.name, p.stat().st_size] for p in (img_path, lbl_path)])
    return index


def _dumps(index: dict) -> str:
    # One file per line: a million-file index stays greppable and diffable, and loads as plain JSON.
    head = json.dumps({k: v for k, v in index.items() if k != "files"}, indent=1)
    if "files" not in index:
        return head + "\n"
    rows = ",\n".join("  " + json.dumps(r) for r in index["files"])
    return head[:-2] + ',\n "files": [\n' + rows + "\n ]\n}\n"


def write_index(spec: str, path: str | os.PathLike) -> dict:
    """List the data of `spec` into the JSON index file `path` (atomically) and return the index dict."""
    index = describe(spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(_dumps(index))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old index or the whole new one, never half of it
    finally:
        tmp.unlink(missing_ok=True)
    try:  # the rename itself survives a crash only once the directory entry is on disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the data file itself is synced
    return index


def read_index(path: str | os.PathLike, spec: str | None = None) -> dict:
    """Load and check an index file (format, count, fingerprint, labels; and that it is for `spec`).

    Touches no data file: the sizes on disk are checked by `build_source(spec, index=path)`.
    """
    where = f"data index {path}"
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except OSError as exc:
        raise DinodistError(f"{where}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise DinodistError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DinodistError(f"{where}: not a {INDEX_FORMAT} file")
    if index.get("version") != INDEX_VERSION:
        raise DinodistError(f"{where}: version {index.get('version')!r}, this code reads {INDEX_VERSION}")
    if spec is not None and index.get("spec") != spec:
        raise DinodistError(f"{where}: written for source {index.get('spec')!r}, not {spec!r}; rebuild it")
    kind = index.get("kind")
    try:
        if kind != parse_spec(index["spec"]).kind:
            raise DinodistError(f"kind {kind!r} does not match spec {index['spec']!r}")
        if kind in FILE_LIST_KINDS:
            files = index["files"]
            if len(files) != index["count"]:
                raise DinodistError(f"lists {len(files)} files but count is {index['count']}")
            if not all(isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], int)
                       for r in files):
                raise DinodistError("files rows must be [relative path, size, label]")
            if kind == "folder":
                labels, classes = folder_labels([tuple(r[0].split("/")) for r in files])
                stored = [r[2] for r in files]
                if stored != (labels or [None] * len(files)) or index.get("classes") != classes:
                    raise DinodistError("labels do not follow the first-level sub-folders")
        got = fingerprint_from_index(index)
        if got != index["fingerprint"]:
            raise DinodistError(f"fingerprint {index['fingerprint']!r} does not match its file list ({got})")
    except DinodistError as exc:
        raise DinodistError(f"{where}: {exc}") from None
    except (KeyError, TypeError, IndexError) as exc:
        raise DinodistError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None
    return index
