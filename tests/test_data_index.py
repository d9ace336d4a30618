"""Dataset index (core/data/index.py) and rank agreement on the data fingerprint (core/data/agree.py)."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gloo import run_gloo
from PIL import Image
from test_data import _write_idx

from dinodist.core.data import (
    agree_fingerprint,
    build_source,
    fingerprint_from_index,
    read_index,
    sources,
    write_index,
)
from dinodist.core.data import index as data_index
from dinodist.core.errors import DinodistError


def _png(path, seed, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _tree(root, names=("cat/0.png", "cat/a/1.jpg", "cat-b/2.png", "dog/3.webp", "dog/x.png")):
    # "cat-b" sorts before "cat/..." as a string but after it as a path: the index must keep walk order
    for k, name in enumerate(names):
        p = root / name
        if p.suffix == ".png":
            _png(p, k)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 9, 3), 10 * k, np.uint8)).save(p)
    (root / "dog" / "readme.txt").write_text("not an image")
    return f"folder:{root}"


def test_index_of_a_folder_round_trips_without_walking(tmp_path, monkeypatch):
    spec = _tree(tmp_path / "data")
    walked = build_source(spec)
    path = tmp_path / "idx" / "data-index.json"
    written = write_index(spec, path)
    assert [p.name for p in path.parent.iterdir()] == ["data-index.json"]  # no temporary left behind
    on_disk = json.loads(path.read_text())
    assert on_disk == written
    assert on_disk["format"] == "dinodist-data-index" and on_disk["version"] == 1
    assert on_disk["spec"] == spec and on_disk["kind"] == "folder" and on_disk["count"] == 5
    assert on_disk["classes"] == ["cat", "cat-b", "dog"]
    assert on_disk["files"][:3] == [["cat/0.png", (tmp_path / "data/cat/0.png").stat().st_size, 0],
                                    ["cat/a/1.jpg", (tmp_path / "data/cat/a/1.jpg").stat().st_size, 0],
                                    ["cat-b/2.png", (tmp_path / "data/cat-b/2.png").stat().st_size, 1]]
    assert fingerprint_from_index(on_disk) == on_disk["fingerprint"] == walked.fingerprint()

    def no_walk(*a, **k):
        raise AssertionError("walked the tree although an index was given")

    monkeypatch.setattr(sources, "list_folder", no_walk)
    monkeypatch.setattr(data_index, "list_folder", no_walk)
    indexed = build_source(spec, index=path)
    assert len(indexed) == len(walked) and indexed.name == walked.name
    assert indexed.fingerprint() == walked.fingerprint()
    for i in range(len(walked)):
        assert indexed.label(i) == walked.label(i)
        assert torch.equal(indexed.load(i), walked.load(i))


def test_index_refuses_data_that_changed(tmp_path, monkeypatch):
    spec = _tree(tmp_path / "data")
    path = tmp_path / "index.json"
    write_index(spec, path)
    slept = []
    monkeypatch.setattr(sources, "_sleep", slept.append)

    # only the first and the last file are statted up front: a changed middle file is caught as it is read
    monkeypatch.setattr(sources, "INDEX_SPOT_CHECKS", 2)
    _png(tmp_path / "data/cat-b/2.png", 2, size=(20, 10))
    src = build_source(spec, index=path)
    with pytest.raises(DinodistError, match=rf"data index {path}: .*2\.png \(sample 2\) has \d+ bytes"):
        src.load(2)
    assert slept == []  # changed data is not a transient failure: no retry
    monkeypatch.setattr(sources, "INDEX_SPOT_CHECKS", 32)
    with pytest.raises(DinodistError, match=rf"data index {path}: .*2\.png \(sample 2\) has \d+ bytes"):
        build_source(spec, index=path)

    write_index(spec, path)
    (tmp_path / "data/dog/x.png").unlink()
    missing = rf"data index {path}: listed file .*x\.png \(sample 4\) is missing"
    with pytest.raises(DinodistError, match=missing):
        build_source(spec, index=path)
    with pytest.raises(DinodistError, match=rf"data index {path}: written for source '{spec}', not "):
        build_source(spec + "/", index=path)


@pytest.mark.parametrize("edit, why", [
    (lambda d: d.update(count=4), "lists 5 files but count is 4"),
    (lambda d: d["files"][1].__setitem__(1, 1), "fingerprint .* does not match its file list"),
    (lambda d: d["files"][0].__setitem__(2, 2), "labels do not follow"),
    (lambda d: d.update(version=9), "version 9"),
    (lambda d: d.pop("files"), "malformed"),
], ids=["count", "size", "label", "version", "no-files"])
def test_index_file_is_checked_when_read(tmp_path, edit, why):
    spec = _tree(tmp_path / "data")
    path = tmp_path / "index.json"
    index = write_index(spec, path)
    edit(index)
    path.write_text(json.dumps(index))
    with pytest.raises(DinodistError, match=f"data index {path}: {why}"):
        build_source(spec, index=path)
    path.write_text("{not json")
    with pytest.raises(DinodistError, match=f"data index {path}: not valid JSON"):
        read_index(path)
    with pytest.raises(DinodistError, match=f"data index {tmp_path / 'none.json'}: cannot read"):
        build_source(spec, index=tmp_path / "none.json")


def test_skimage_index_matches_the_walk(tmp_path):
    path = tmp_path / "skimage.json"
    index = write_index("skimage", path)
    walked = build_source("skimage")
    assert index["count"] == len(walked) and index["classes"] is None
    assert all(r[2] is None for r in index["files"])
    indexed = build_source("skimage", index=path)
    assert indexed.fingerprint() == walked.fingerprint() == fingerprint_from_index(index)
    assert torch.equal(indexed.load(len(indexed) - 1), walked.load(len(walked) - 1))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_index_pins_the_fingerprint(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz)
    spec = f"fashion-mnist:{tmp_path}:test"
    index = write_index(spec, tmp_path / "index.json")
    src = build_source(spec)
    assert index["count"] == 5 and fingerprint_from_index(index) == src.fingerprint()
    # the formula stored target stores were written with (numpy int64 label bytes) still holds
    old = hashlib.sha256()
    for part in ["fashion-mnist", "test", src._img_header.hex(), src._lbl_header.hex(),
                 hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()]:
        old.update(part.encode() + b"\0")
    assert src.fingerprint() == old.hexdigest()[:32]
    assert build_source(spec, index=tmp_path / "index.json").fingerprint() == src.fingerprint()
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[::-1].copy(), gz)
    with pytest.raises(DinodistError, match=f"data index {tmp_path / 'index.json'}: .* no longer matches"):
        build_source(spec, index=tmp_path / "index.json")


_TORCH_FREE = """
import sys
refused = sys.argv[1].split(",")

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in refused:
            raise ImportError(name + " imported")

sys.meta_path.insert(0, Refuse())
from dinodist.core.data.index import write_index
for spec, out in zip(sys.argv[2::2], sys.argv[3::2]):
    write_index(spec, out)
"""


@pytest.mark.multiproc
def test_driver_writes_indexes_without_torch_numpy_or_pil(tmp_path):
    # the driver process that writes the index loads no torch; folder and idx indexes need no PIL either
    folder = _tree(tmp_path / "data")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8), gz=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8), gz=True)
    fmnist = f"fashion-mnist:{tmp_path}:test"
    runs = [("torch,numpy,PIL", [folder, tmp_path / "f.json", fmnist, tmp_path / "m.json"]),
            ("torch,numpy", ["skimage", tmp_path / "s.json"])]
    for refused, args in runs:
        out = subprocess.run([sys.executable, "-c", _TORCH_FREE, refused, *map(str, args)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    for spec, name in [(folder, "f.json"), (fmnist, "m.json"), ("skimage", "s.json")]:
        assert read_index(tmp_path / name, spec)["fingerprint"] == build_source(spec).fingerprint()


def test_agree_fingerprint_needs_a_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(DinodistError, match="not initialised"):
        agree_fingerprint("abc")


def _agree_rank(rank: int, same: str, other: str, index: str) -> None:
    import torch.distributed as dist

    # rank 1 reads the index, the others walk: the same data must give the same fingerprint
    src = build_source(same, index=index if rank == 1 else None)
    agree_fingerprint(src.fingerprint())

    mine = build_source(other if rank == 2 else same).fingerprint()
    with pytest.raises(DinodistError) as err:
        agree_fingerprint(mine)
    assert "rank 2 differs from rank 0" in str(err.value) and f"rank {rank} has '{mine}'" in str(err.value)

    # within a subgroup the ranks are named globally, against the subgroup's first rank
    sub = dist.new_group([1, 2])
    if rank in (1, 2):
        with pytest.raises(DinodistError, match="rank 2 differs from rank 1"):
            agree_fingerprint(mine, group=sub)
    pair = dist.new_group([0, 1])
    if rank in (0, 1):
        agree_fingerprint(mine, group=pair)


@pytest.mark.multiproc
def test_agree_fingerprint_fails_on_every_rank_when_one_sees_other_data(tmp_path):
    same = _tree(tmp_path / "same")
    other = _tree(tmp_path / "other", names=("cat/0.png", "cat/a/1.jpg", "cat-b/2.png", "dog/3.webp"))
    write_index(same, tmp_path / "index.json")
    run_gloo(_agree_rank, 3, tmp_path, same, other, str(tmp_path / "index.json"), timeout_s=120)
