"""Image sources: a numbered set of images, each loaded as uint8 [3, H, W], with an optional label.

Specs accepted by `build_source`:
- `skimage`: the colour photos bundled in scikit-image's package data (no network; the demo default).
- `folder:PATH`: every jpg/jpeg/png/webp under PATH, recursively, in sorted order. If all images sit in
  first-level sub-folders, the sorted sub-folder index is the label (ImageFolder convention).
- `fashion-mnist:DIR:train|test`: the idx files of Fashion-MNIST (`.gz` or raw); DIR may be empty for
  the Debian package location. Grayscale is repeated to 3 channels.

`fingerprint()` hashes the identity of the data (kind, files and sizes, or idx headers) so a target
store can refuse to be replayed on different data.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinodist.core.errors import DinodistError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


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


def _pil_to_uint8_chw(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _hash_strings(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


class FileListSource(ImageSource):
    """Images from a sorted list of files, decoded with Pillow.

    An unreadable file never stops training: it is counted, logged once, and replaced by the next
    readable file in index order (wrapping), so every process maps index i to the same pixels.
    """

    def __init__(self, root: Path, files: list[Path], labels: list[int] | None, name: str, kind: str):
        self.kind = kind
        self.root = root
        self.files = files
        self._labels = labels
        self.name = name
        self._bad: set[int] = set()
        self._redirect: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def n_unreadable(self) -> int:
        """How many files failed to decode so far."""
        return len(self._bad)

    def _decode(self, j: int) -> torch.Tensor | None:
        if j in self._bad:
            return None
        try:
            with Image.open(self.files[j]) as img:
                return _pil_to_uint8_chw(img)
        except Exception as exc:  # any decoder failure means "skip this file", never a crash
            with self._lock:
                if j not in self._bad:
                    self._bad.add(j)
                    log.warning("unreadable image %s skipped (%s: %s)", self.files[j], type(exc).__name__,
                                exc)
            return None

    def load(self, i: int) -> torch.Tensor:
        i = self._check_index(i)
        n = len(self)
        for step in range(n):
            j = (i + step) % n
            out = self._decode(j)
            if out is not None:
                if step:
                    self._redirect[i] = j
                return out
        raise DinodistError(f"{self.name}: no readable image among {n} files under {self.root}")

    def label(self, i: int) -> int | None:
        if self._labels is None:
            return None
        i = self._check_index(i)
        return self._labels[self._redirect.get(i, i)]

    def fingerprint(self) -> str:
        parts = [self.kind]
        for f in self.files:
            parts.append(f"{f.relative_to(self.root).as_posix()}:{f.stat().st_size}")
        return _hash_strings(parts)


def folder_source(path: str) -> FileListSource:
    """All images under `path` (recursive, sorted); labels from first-level sub-folders when all have one."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DinodistError(f"folder:{path}: no such directory")
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise DinodistError(f"folder:{path}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images found")
    rel = [f.relative_to(root).parts for f in files]
    labels = None
    if all(len(r) >= 2 for r in rel):
        classes = sorted({r[0] for r in rel})
        index = {c: k for k, c in enumerate(classes)}
        labels = [index[r[0]] for r in rel]
    return FileListSource(root, files, labels, name=f"folder:{path}", kind="folder")


def skimage_source() -> FileListSource:
    """The RGB photos shipped inside scikit-image's `skimage/data` folder (read with Pillow, offline)."""
    try:
        import skimage
    except ImportError as exc:
        raise DinodistError("source skimage: scikit-image is not installed") from exc
    root = Path(skimage.__file__).resolve().parent / "data"
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
    return FileListSource(root, files, None, name="skimage", kind="skimage")


_IDX_DTYPES = {0x08: np.uint8}


def _read_idx(path: Path) -> tuple[np.ndarray, bytes]:
    """Parse an idx file (optionally gzip-compressed); returns (array, header bytes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DinodistError(f"{path}: cannot read idx file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DinodistError(f"{path}: not an unsigned-byte idx file (bad magic)")
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DinodistError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    count = int(np.prod(dims)) if dims else 0
    if len(data) - header_len != count:
        raise DinodistError(f"{path}: idx payload has {len(data) - header_len} bytes, header says {count}")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
    return arr, data[:header_len]


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


class FashionMNISTSource(ImageSource):
    """Fashion-MNIST from its idx files: 28x28 grayscale repeated to 3 channels, labels 0-9."""

    def __init__(self, directory: str, split: str):
        if split not in ("train", "test"):
            raise DinodistError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
        d = Path(directory or FASHION_MNIST_DEBIAN_DIR).expanduser()
        prefix = "train" if split == "train" else "t10k"
        img_path = _find_idx(d, f"{prefix}-images-idx3-ubyte")
        lbl_path = _find_idx(d, f"{prefix}-labels-idx1-ubyte")
        if img_path is None or lbl_path is None:
            raise DinodistError(
                f"fashion-mnist: {prefix}-images/labels idx files not found in {d} "
                "(apt-get install dataset-fashion-mnist, or pass fashion-mnist:DIR:train|test)"
            )
        images, self._img_header = _read_idx(img_path)
        labels, self._lbl_header = _read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DinodistError(
                f"{img_path}: image/label counts or ranks disagree ({images.shape}, {labels.shape})"
            )
        self._images = torch.from_numpy(images.copy())
        self._labels = labels.astype(np.int64)
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
        return _hash_strings(
            ["fashion-mnist", self.split, self._img_header.hex(), self._lbl_header.hex(),
             hashlib.sha256(self._labels.tobytes()).hexdigest()]
        )


def build_source(spec: str) -> ImageSource:
    """Parse a source spec (`skimage`, `folder:PATH`, `fashion-mnist:DIR:train|test`)."""
    if not isinstance(spec, str) or not spec:
        raise DinodistError(f"data source spec must be a non-empty string, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "skimage":
        return skimage_source()
    if kind == "folder":
        if not rest:
            raise DinodistError("data source 'folder:PATH' needs a PATH")
        return folder_source(rest)
    if kind == "fashion-mnist":
        directory, sep, split = rest.rpartition(":")
        if not sep:  # "fashion-mnist:train" means the Debian package location
            directory, split = "", rest or "train"
        return FashionMNISTSource(os.path.expanduser(directory), split)
    raise DinodistError(
        f"unknown data source {spec!r} (expected skimage, folder:PATH, fashion-mnist:DIR:train|test)"
    )
