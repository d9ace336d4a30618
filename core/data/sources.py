"""Image sources: a numbered set of images, each loaded as uint8 [3, H, W], with an optional label.

Specs accepted by `build_source`:
- `skimage`: the colour photos bundled in scikit-image's package data (no network; the demo default).
- `folder:PATH`: every jpg/jpeg/png/webp under PATH, recursively, in sorted order. If all images sit in
  first-level sub-folders, the sorted sub-folder index is the label (ImageFolder convention).
- `fashion-mnist:DIR:train|test`: the idx files of Fashion-MNIST (`.gz` or raw); DIR may be empty for
  the Debian package location. Grayscale is repeated to 3 channels.

`build_source(spec, index=PATH)` takes the file list from a dataset index (core/data/index.py) instead
of walking the tree. `fingerprint()` hashes the identity of the data (kind, files and sizes, or idx
headers) so a target store can refuse to be replayed on different data, and ranks can check that they
all read the same data (core/data/agree.py).

A file that cannot be read or decoded is retried (`DECODE_RETRY_DELAYS_S`) and then raises: another
image is never substituted, since every rank must pair the same pixels with the same row.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinodist.core.data.index import (
    FILE_LIST_KINDS,
    fashion_mnist_fingerprint,
    file_list_fingerprint,
    find_fashion_mnist,
    folder_labels,
    list_folder,
    list_skimage,
    parse_spec,
    read_idx,
    read_index,
    skimage_data_dir,
)
from dinodist.core.errors import DinodistError

log = logging.getLogger(__name__)

# Waits before each retry of a failed read/decode (so 1 + len attempts, 2.1 s in all): long enough
# to ride out a network-filesystem hiccup, short enough that a truly broken file stops the run at once.
# Read at call time, so tests can shorten it.
DECODE_RETRY_DELAYS_S: tuple[float, ...] = (0.1, 0.4, 1.6)
# How many listed files `build_source(..., index=...)` stats up front; the rest are checked as loaded.
INDEX_SPOT_CHECKS = 32

_sleep = time.sleep  # tests replace it to observe the backoff or to repair a file between attempts


class ImageSource:
    """Base: `len(src)`, `load(i) -> uint8 [3,H,W]`, `label(i) -> int | None`, `fingerprint()`, `name`."""

    name: str = "source"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def label(self, i: int) -> int | None:
        return None

    def fingerprint(self) -> str:
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range [0, {n})")
        return int(i)


def pil_to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] RGB of a decoded Pillow image (any mode)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


class FileListSource(ImageSource):
    """Images from an ordered list of files, decoded with Pillow.

    `sizes` (known when built from an index) are checked against every file as it is read, so data
    changed since the index was written stops the run instead of feeding different pixels.
    """

    def __init__(self, root: Path, files: list[Path], labels: list[int] | None, name: str, kind: str,
                 sizes: list[int] | None = None, index_path: str | None = None):
        self.kind = kind
        self.root = root
        self.files = files
        self._labels = labels
        self.name = name
        self._sizes = sizes
        self._index_path = index_path

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i: int) -> torch.Tensor:
        data = self.files[i].read_bytes()
        if self._sizes is not None and len(data) != self._sizes[i]:
            raise DinodistError(
                f"data index {self._index_path}: {self.files[i]} (sample {i}) has {len(data)} bytes, the "
                f"index says {self._sizes[i]}: the data changed since the index was written; rebuild it"
            )
        with Image.open(io.BytesIO(data)) as img:
            return pil_to_uint8_chw(img)

    def load(self, i: int) -> torch.Tensor:
        i = self._check_index(i)
        delays = tuple(DECODE_RETRY_DELAYS_S)
        for attempt in range(len(delays) + 1):
            try:
                return self._read(i)
            except DinodistError:
                raise
            except Exception as exc:  # any read or decoder failure: retry, then stop the run
                cause = exc
                if attempt < len(delays):
                    log.warning("%s: reading sample %d (%s) failed (%s); retry in %g s", self.name, i,
                                self.files[i], _one_line(exc), delays[attempt])
                    _sleep(delays[attempt])
        raise DinodistError(
            f"{self.name}: cannot read sample {i} ({self.files[i]}) after {len(delays) + 1} attempts: "
            f"{_one_line(cause)}"
        ) from cause

    def label(self, i: int) -> int | None:
        if self._labels is None:
            return None
        return self._labels[self._check_index(i)]

    def fingerprint(self) -> str:
        rel = (f.relative_to(self.root).as_posix() for f in self.files)
        return file_list_fingerprint(self.kind, zip(rel, self._sizes or map(self._size, range(len(self)))))

    def _size(self, i: int) -> int:
        try:
            return self.files[i].stat().st_size
        except OSError as exc:
            raise DinodistError(f"{self.name}: sample {i} ({self.files[i]}) vanished: "
                                f"{_one_line(exc)}") from exc


def folder_source(path: str) -> FileListSource:
    """All images under `path` (recursive, sorted); labels from first-level sub-folders when all have one."""
    root, files = list_folder(path)
    labels, _ = folder_labels([f.relative_to(root).parts for f in files])
    return FileListSource(root, files, labels, name=f"folder:{path}", kind="folder")


def skimage_source() -> FileListSource:
    """The RGB photos shipped inside scikit-image's `skimage/data` folder (read with Pillow, offline)."""
    root, files = list_skimage()
    return FileListSource(root, files, None, name="skimage", kind="skimage")


class FashionMNISTSource(ImageSource):
    """Fashion-MNIST from its idx files: 28x28 grayscale repeated to 3 channels, labels 0-9."""

    def __init__(self, directory: str, split: str):
        if split not in ("train", "test"):
            raise DinodistError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
        img_path, lbl_path = find_fashion_mnist(directory, split)
        self._img_header, img_dims, images = read_idx(img_path)
        self._lbl_header, lbl_dims, labels = read_idx(lbl_path)
        if len(img_dims) != 3 or len(lbl_dims) != 1 or img_dims[0] != lbl_dims[0]:
            raise DinodistError(
                f"{img_path}: image/label counts or ranks disagree ({img_dims}, {lbl_dims})"
            )
        self._images = torch.frombuffer(bytearray(images), dtype=torch.uint8).view(img_dims)
        self._label_bytes = labels
        self._labels = np.frombuffer(labels, dtype=np.uint8).astype(np.int64)
        self.split = split
        self.name = f"fashion-mnist:{split}"

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def load(self, i: int) -> torch.Tensor:
        i = self._check_index(i)
        return self._images[i].unsqueeze(0).expand(3, -1, -1).contiguous()

    def label(self, i: int) -> int:
        return int(self._labels[self._check_index(i)])

    def fingerprint(self) -> str:
        # Headers give kind and shape; the (small) label bytes tell two idx datasets of equal shape apart.
        return fashion_mnist_fingerprint(self.split, self._img_header, self._lbl_header, self._label_bytes)


def _from_index(spec: str, index_path: str) -> ImageSource:
    index = read_index(index_path, spec)
    kind = index["kind"]
    if kind not in FILE_LIST_KINDS:
        # idx files are read whole anyway; the index only pins which data they must be
        src = _walk(spec)
        if len(src) != index["count"] or src.fingerprint() != index["fingerprint"]:
            raise DinodistError(f"data index {index_path}: {spec} no longer matches it ({len(src)} images, "
                                f"fingerprint {src.fingerprint()}; the index says {index['count']}, "
                                f"{index['fingerprint']}); rebuild the index")
        return src
    s = parse_spec(spec)
    root = Path(s.path).expanduser() if kind == "folder" else skimage_data_dir()
    rows = index["files"]
    files = [root / r[0] for r in rows]
    sizes = [int(r[1]) for r in rows]
    labels = [int(r[2]) for r in rows] if rows and rows[0][2] is not None else None
    n, m = len(files), min(len(files), INDEX_SPOT_CHECKS)
    # Evenly spread, first and last included: a cheap check that the index belongs to this tree at all
    # (a wrong mount, a re-extracted dataset); every file's size is checked again as it is read.
    for k in sorted({(n - 1) * j // max(m - 1, 1) for j in range(m)}):
        try:
            size = files[k].stat().st_size
        except OSError as exc:
            raise DinodistError(f"data index {index_path}: listed file {files[k]} (sample {k}) is missing "
                                f"({exc.strerror or exc}); rebuild the index") from None
        if size != sizes[k]:
            raise DinodistError(f"data index {index_path}: {files[k]} (sample {k}) has {size} bytes, the "
                                f"index says {sizes[k]}; rebuild the index")
    name = "skimage" if kind == "skimage" else f"folder:{s.path}"
    return FileListSource(root, files, labels, name=name, kind=kind, sizes=sizes, index_path=str(index_path))


def _walk(spec: str) -> ImageSource:
    s = parse_spec(spec)
    if s.kind == "skimage":
        return skimage_source()
    if s.kind == "folder":
        return folder_source(s.path)
    return FashionMNISTSource(s.path, s.split)


def build_source(spec: str, index: str | os.PathLike | None = None) -> ImageSource:
    """Parse a source spec (`skimage`, `folder:PATH`, `fashion-mnist:DIR:train|test`).

    With `index` (a file from `core.data.index.write_index(spec, ...)`), the file list is read from it
    instead of walking the tree; the index must be for this very spec, and the data must still match it.
    """
    if index is not None:
        return _from_index(spec, os.fspath(index))
    return _walk(spec)
