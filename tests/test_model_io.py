
from pathlib import Path

import pytest
import torch

from dinodist.core.errors import DinodistError
from dinodist.core.models import (
    build_backbone,
    load_backbone,
    load_backbone_state,
    read_state_dict,
    save_backbone,
)
from dinodist.core.models.io import file_record, load_file, recorded_sha256
from dinodist.core.target_store import file_sha256


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def _model(name="tiny-vits", **kw):
    torch.manual_seed(0)
    model = build_backbone(name, **kw)
    with torch.no_grad():  # make every tensor distinctive so a mix-up cannot go unnoticed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", ["tiny-vits", "tiny-vit7b"])
def test_save_load_round_trip_is_bit_exact(tmp_path, name):
    model = _model(name, depth=2)
    path = tmp_path / "backbone.pth"
    save_backbone(model, path)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == list(model.state_dict())  # flat, official keys, no prefix
    loaded = load_backbone(path, name, depth=2)
    assert loaded.spec == model.spec
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 24)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x), loaded(x))


def test_load_into_existing_model_and_wrappers(tmp_path):
    model = _model()
    sd = model.state_dict()
    wrapped = {
        "model.pth": {"model": sd, "iteration": 3},
        "teacher.pth": {
            "teacher": {
                **{"backbone." + k: v for k, v in sd.items()},
                "dino_head.last_layer.weight": torch.zeros(4, 2),
            }
        },
    }
    for name, obj in wrapped.items():
        torch.save(obj, tmp_path / name)
        state = read_state_dict(tmp_path / name)
        assert list(state) == list(sd)
        target = build_backbone("tiny-vits")
        load_backbone_state(target, state, source=name)
        for k, v in sd.items():
            assert torch.equal(target.state_dict()[k], v), (name, k)


def test_bf16_checkpoint_is_cast(tmp_path):
    model = _model()
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / "bf16.pth")
    loaded = load_backbone(tmp_path / "bf16.pth", "tiny-vits")
    assert loaded.cls_token.dtype == torch.float32
    assert torch.equal(loaded.cls_token, model.cls_token.detach().to(torch.bfloat16).float())


def test_wrong_checkpoint_names_keys_and_arch(tmp_path):
    small = _model(depth=2)
    path = tmp_path / "x.pth"
    save_backbone(small, path)
    with pytest.raises(DinodistError) as e:
        load_backbone(path, "tiny-vits", depth=3)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint {path} does not match arch tiny-vits: missing blocks.2.norm1.weight")
    assert "unexpected" not in msg
    with pytest.raises(DinodistError, match=r"unexpected blocks\.1\.norm1\.weight"):
        load_backbone(path, "tiny-vits", depth=1)
    match = r"arch tiny-vitsplus: missing blocks\.0\.mlp\.w1\.weight.*unexpected"
    with pytest.raises(DinodistError, match=match):
        load_backbone(path, "tiny-vitsplus", depth=2)
    with pytest.raises(DinodistError, match=r"wrong shape cls_token \[1, 1, 48\] \(expected \[1, 1, 64\]\)"):
        load_backbone(path, "tiny-vits", depth=2, embed_dim=64, num_heads=4)
    with pytest.raises(DinodistError, match=r"\(\+\d+ more\)"):
        load_backbone(path, "tiny-vits", depth=4)
    # a 7B-style model has no qkv bias: the error names the extra bias keys
    match = r"does not match arch tiny-vits: unexpected blocks\.0\.attn\.qkv\.bias"
    with pytest.raises(DinodistError, match=match):
        load_backbone_state(build_backbone("tiny-vits", depth=2, qkv_bias=False), small.state_dict(), "x.pth")


def test_unreadable_files(tmp_path):
    with pytest.raises(DinodistError, match="no such file"):
        read_state_dict(tmp_path / "missing.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DinodistError, match=r"garbage.pth: cannot be read \(corrupt"):
        read_state_dict(bad)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"obj": Payload()}, unsafe)
    with pytest.raises(DinodistError, match=r"unsafe.pth: refused by weights_only loading .*Payload$"):
        read_state_dict(unsafe)
    torch.save({"cls_token": 3}, tmp_path / "scalar.pth")
    with pytest.raises(DinodistError, match="entry 'cls_token' is not a tensor"):
        read_state_dict(tmp_path / "scalar.pth")
    torch.save({"teacher": {"dino_head.x": torch.zeros(1)}}, tmp_path / "nobb.pth")
    with pytest.raises(DinodistError, match="no 'backbone"):
        read_state_dict(tmp_path / "nobb.pth")


def test_meta_model_cannot_be_saved(tmp_path):
    with pytest.raises(DinodistError, match="meta"):
        save_backbone(build_backbone("tiny-vits", device="meta"), tmp_path / "m.pth")


def test_load_file_mmap_and_legacy_fallback(tmp_path):
    sd = _model().state_dict()
    path = tmp_path / "b.pth"
    torch.save(sd, path)
    mapped = load_file(path, mmap=True)
    assert all(torch.equal(mapped[k], v) for k, v in sd.items())
    maps = Path("/proc/self/maps")
    if maps.is_file():  # Linux: the tensors live in the file's mapping, not in private memory
        ranges = [tuple(int(x, 16) for x in ln.split()[0].split("-")) for ln in maps.read_text().splitlines()
                  if ln.endswith(" " + str(path.resolve()))]
        assert ranges and all(any(lo <= v.data_ptr() < hi for lo, hi in ranges) for v in mapped.values())
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)  # cannot be mapped: read as before
    assert all(torch.equal(v, sd[k]) for k, v in load_file(legacy, mmap=True).items())
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DinodistError, match=r"^teacher.checkpoint .*bad.pth: cannot be read"):
        load_file(bad, "teacher.checkpoint", mmap=True)


def test_file_record_is_trusted_only_while_the_file_is_unchanged(tmp_path):
    path = tmp_path / "b.pth"
    save_backbone(_model(), path)
    rec = file_record(path)
    assert rec["sha256"] == file_sha256(path) and rec["size"] == path.stat().st_size
    assert recorded_sha256(path, rec) == rec["sha256"]
    for bad in (None, "x", {}, {**rec, "sha256": "md5:00"}, {**rec, "size": rec["size"] + 1},
                {**rec, "mtime_ns": rec["mtime_ns"] - 1}):
        assert recorded_sha256(path, bad) is None, bad
    assert recorded_sha256(tmp_path / "gone.pth", rec) is None
