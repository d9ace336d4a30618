"""Teacher startup: meta build + memory-mapped checkpoint + assign, identity from the export's sidecar;
and `students[].compile`."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from dinodist.core.errors import DinodistError
from dinodist.core.models import build_backbone, build_head, compile_blocks, load_backbone_state
from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD, arch_dict, get_arch
from dinodist.core.models.io import file_record
from dinodist.core.target_store import file_sha256
from dinodist.teacher.model import checkpoint_sha256, load_teacher
from dinodist.teacher.targets import target_tensors

OVERRIDES = {"depth": 2}


def _export(tmp_path: Path, seed: int = 11, sidecar_file: bool = True, name: str = "teacher.pth") -> Path:
    """A tiny export as `dinodist export-teacher` writes it: the .pth and its sidecar with the file record."""
    torch.manual_seed(seed)
    spec = get_arch("tiny-vit7b", **OVERRIDES)
    parts = {"backbone": build_backbone(spec), "dino_head": build_head(spec.embed_dim, TINY_DINO_HEAD),
             "ibot_head": build_head(spec.embed_dim, TINY_IBOT_HEAD)}
    with torch.no_grad():  # distinctive values everywhere (init leaves zeros and ones a mix-up would keep)
        for m in parts.values():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    sd = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}
    path = tmp_path / name
    torch.save({"teacher": sd}, path)
    side = {"format": "dinodist-teacher-v1", "arch": "tiny-vit7b", "overrides": OVERRIDES,
            "arch_spec": arch_dict(spec), "dino_head": dataclasses.asdict(TINY_DINO_HEAD),
            "ibot_head": dataclasses.asdict(TINY_IBOT_HEAD), "layout": "teacher"}
    if sidecar_file:
        side["file"] = file_record(path)
    Path(str(path) + ".json").write_text(json.dumps(side))
    return path


def _old_load(path: Path, kind: str):
    """The previous load_teacher: an fp32 model built and initialised on CPU, the whole file read into
    memory, then copied in; the file hashed."""
    spec = get_arch("tiny-vit7b", **OVERRIDES)
    sd = torch.load(path, map_location="cpu", weights_only=True)["teacher"]
    parts = {p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
             for p in ("backbone", "dino_head", "ibot_head")}
    backbone = load_backbone_state(build_backbone(spec), parts["backbone"], source=str(path))
    heads = []
    if kind == "heads":
        for name, hs in (("dino_head", TINY_DINO_HEAD), ("ibot_head", TINY_IBOT_HEAD)):
            h = build_head(spec.embed_dim, hs)
            h.load_state_dict(parts[name])
            heads.append(h.eval())
    return backbone.eval(), heads, file_sha256(path).removeprefix("sha256:")


def _file_ranges(path: Path) -> list[tuple[int, int]]:
    target = str(path.resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.parametrize("kind", ["heads", "features"])
def test_mmap_load_is_bit_identical_to_the_old_path(tmp_path, kind):
    path = _export(tmp_path)
    new = load_teacher("tiny-vit7b", {}, str(path), kind, TINY_DINO_HEAD, TINY_IBOT_HEAD)
    backbone, heads, identity = _old_load(path, kind)
    assert new.identity == identity and new.spec.depth == 2
    want = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    for name, h in zip(("dino_head", "ibot_head"), heads):
        want.update({f"{name}.{k}": v for k, v in h.state_dict().items()})
    got = new.model.state_dict()
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == torch.float32 and v.device.type == "cpu" and torch.equal(v, want[k]), k
    assert not any(p.requires_grad for p in new.model.parameters()) and not new.model.training
    crops = torch.randn(6, 3, 32, 32)
    masks = torch.rand(3, 2, 16) < 0.4
    masks = masks if kind == "heads" else None
    out = new.model(crops, masks)
    with torch.no_grad():
        ref = target_tensors(backbone, *(heads or [None, None]), crops, masks, kind)
    assert out.keys() == ref.keys()
    for k in out:
        assert torch.equal(out[k], ref[k]), k


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings (Linux)")
@pytest.mark.parametrize("layout", ["teacher", "backbone"])
def test_no_private_copy_of_the_weights(tmp_path, layout):
    # Every parameter and buffer of the loaded CPU teacher lies inside the checkpoint's file mapping:
    # nothing was copied to private memory (the old path's torch.load and fp32 model were both copies).
    path = _export(tmp_path)
    kind = "heads"
    if layout == "backbone":
        sd = torch.load(path, weights_only=True)["teacher"]
        path = tmp_path / "backbone.pth"
        torch.save({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, path)
        kind = "features"
    loaded = load_teacher("tiny-vit7b", OVERRIDES, str(path), kind, TINY_DINO_HEAD, TINY_IBOT_HEAD)
    ranges = _file_ranges(path)
    assert ranges, "the checkpoint is not memory-mapped"
    tensors = dict(loaded.model.named_parameters()) | dict(loaded.model.named_buffers())
    assert len(tensors) > 20
    for name, t in tensors.items():
        ptr = t.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), f"{name} was copied out of the mapped file"


def test_identity_comes_from_the_sidecar(tmp_path, monkeypatch):
    path = _export(tmp_path)
    real = file_sha256(path)
    assert json.loads(Path(str(path) + ".json").read_text())["file"]["sha256"] == real

    def refuse(p):
        raise AssertionError(f"hashed {p} although the sidecar records its sha256")

    monkeypatch.setattr("dinodist.teacher.model.file_sha256", refuse)
    loaded = load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    assert loaded.identity == real.removeprefix("sha256:")
    assert checkpoint_sha256(path) == real  # the form a store manifest's teacher_hash takes

    # same weights, one more (ignored) entry: another size at the recorded mtime -> hashed again
    st = path.stat()
    sd = torch.load(path, weights_only=True)
    torch.save({**sd, "note": torch.zeros(64)}, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size != st.st_size
    with pytest.raises(AssertionError, match="hashed"):
        load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    monkeypatch.undo()
    assert load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD,
                        TINY_IBOT_HEAD).identity == file_sha256(path).removeprefix("sha256:")


def test_rewritten_file_of_the_same_size_is_hashed(tmp_path):
    path = _export(tmp_path, seed=11)
    side = Path(str(path) + ".json").read_text()
    _export(tmp_path, seed=12)  # other weights, same shapes: same size, newer mtime
    Path(str(path) + ".json").write_text(side)  # a stale sidecar from the first export
    stale = json.loads(side)["file"]
    assert path.stat().st_size == stale["size"]
    loaded = load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    assert loaded.identity == file_sha256(path).removeprefix("sha256:") != stale["sha256"][len("sha256:"):]


def test_without_a_file_record_the_checkpoint_is_hashed(tmp_path):
    path = _export(tmp_path, sidecar_file=False)
    loaded = load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    assert loaded.identity == file_sha256(path).removeprefix("sha256:")


def test_export_writes_the_file_record(tmp_path, monkeypatch):
    from dinodist.core.ssl import export
    from dinodist.core.ssl.config import load_stage_config
    from dinodist.core.ssl.loop import build_for_export

    cfg = load_stage_config(Path(__file__).resolve().parents[1] / "configs" / "stages" / "demo-teacher.yaml")
    model = build_for_export(cfg)
    monkeypatch.setattr(export, "load_run_model", lambda run: (cfg, model, Path(run) / "ckpt" / "3"))
    for backbone_only in (False, True):
        out, side = export.export_teacher(tmp_path, tmp_path / f"t{int(backbone_only)}.pth", backbone_only)
        on_disk = json.loads(Path(str(out) + ".json").read_text())
        st = out.stat()
        assert on_disk["file"] == side["file"] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                   "sha256": file_sha256(out)}
        assert checkpoint_sha256(out) == file_sha256(out)
    assert not list(tmp_path.glob("*.tmp"))


def test_mismatches_are_still_one_line(tmp_path):
    path = _export(tmp_path)
    side = json.loads(Path(str(path) + ".json").read_text())
    side["dino_head"]["n_prototypes"] = 32
    Path(str(path) + ".json").write_text(json.dumps(side))
    with pytest.raises(DinodistError) as e:
        load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"teacher.checkpoint {path}: dino_head.last_layer.weight has shape")
    flat = tmp_path / "flat.pth"
    sd = torch.load(path, weights_only=True)["teacher"]
    torch.save({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, flat)
    with pytest.raises(DinodistError) as e:
        load_teacher("tiny-vit7b", {"depth": 3}, str(flat), "features", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"checkpoint {flat} does not match arch tiny-vit7b: missing blocks.2.")


def _fsdp_rank(rank: int, path: str, want: str) -> None:
    import torch.distributed as dist

    from dinodist.core.distributed import group_mesh
    from dinodist.teacher.model import shard_teacher

    loaded = load_teacher("tiny-vit7b", {}, path, "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    model = shard_teacher(loaded.model, group_mesh(dist.group.WORLD, [0, 1], "cpu"), "fsdp")
    assert_targets_match(model, want)


def assert_targets_match(model, ref_path: str) -> None:
    """A sharded teacher's targets and last layers equal the unsharded one's, saved at `ref_path`."""
    from dinodist.teacher.model import last_layers

    ref = torch.load(ref_path, weights_only=True)
    with torch.no_grad():
        out = model(ref["crops"], ref["masks"])
    for k in ("dino", "ibot", "ibot_counts"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    for k, w in last_layers(model).items():
        assert torch.equal(w, ref[k]), k


@pytest.mark.multiproc
def test_fsdp_shards_a_mapped_teacher(tmp_path):
    # FSDP2 copies each rank's shard out of the file-backed parameters; targets as one unsharded rank
    from tests.gloo import run_gloo

    path, ref = _export_with_reference(tmp_path)
    run_gloo(_fsdp_rank, 2, tmp_path, str(path), ref, timeout_s=120)


def _export_with_reference(tmp_path: Path) -> tuple[Path, str]:
    """A tiny export, and the unsharded teacher's targets and last layers on fixed inputs saved beside it
    (the file `assert_targets_match` compares a sharded teacher with)."""
    from dinodist.teacher.model import last_layers

    path = _export(tmp_path)
    loaded = load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    crops, masks = torch.randn(4, 3, 32, 32), torch.rand(2, 2, 16) < 0.4
    with torch.no_grad():
        ref = {**loaded.model(crops, masks), **last_layers(loaded.model), "crops": crops, "masks": masks}
    torch.save(ref, tmp_path / "ref.pt")
    return path, str(tmp_path / "ref.pt")


def _sharded_load_rank(rank: int, path: str, want: str, layout: str, shard_size: int, bf16: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import dinodist.teacher.model as tm
    from dinodist.core.distributed import group_mesh

    def whole_placement(*args, **kwargs):
        raise AssertionError("the sharded load placed a whole part of the model")

    tm._placed = whole_placement  # the unsharded path's copy of every tensor must not run
    if bf16:  # the GPU rule, checked on CPU
        tm.inference_dtype = lambda device: torch.bfloat16
    mesh = group_mesh(dist.group.WORLD, list(range(dist.get_world_size())), "cpu")
    loaded = tm.load_sharded_teacher("tiny-vit7b", {}, path, "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD,
                                     device="cpu", mesh=mesh, layout=layout, shard_size=shard_size)
    file = torch.load(path, weights_only=True, mmap=True)["teacher"]
    shard_rank = rank % shard_size
    n_params = 0
    for name, p in loaded.model.named_parameters():
        assert isinstance(p, DTensor), name
        fp32 = ".last_layer." in name
        assert p.dtype == (torch.float32 if fp32 or not bf16 else torch.bfloat16), name
        local, full = p.to_local(), file[name]
        # this rank holds its chunk of dim 0, and only that
        chunk = torch.chunk(full, shard_size, dim=0)
        want_rows = chunk[shard_rank] if shard_rank < len(chunk) else full[:0]
        assert torch.equal(local, want_rows.to(local.dtype)), name
        n_params += 1
    assert n_params > 20
    for name, b in loaded.model.named_buffers():
        assert b.dtype == torch.float32 and torch.equal(b, file[name]), name
    if not bf16:
        assert_targets_match(loaded.model, want)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_sharded_load_reads_only_each_ranks_shard(tmp_path):
    """fsdp and hsdp: built and sharded on meta, each rank copies its own rows out of the mapped file
    (never the whole model), in the inference dtype, and computes the unsharded teacher's targets."""
    from tests.gloo import run_gloo

    path, ref = _export_with_reference(tmp_path)
    run_gloo(_sharded_load_rank, 2, tmp_path, str(path), ref, "fsdp", 2, False, timeout_s=120)
    run_gloo(_sharded_load_rank, 4, tmp_path, str(path), ref, "hsdp", 2, True, timeout_s=180)


def test_bf16_placement_keeps_buffers_and_prototypes_fp32(tmp_path, monkeypatch):
    # the GPU rule, checked on CPU: parameters cast once, RoPE periods and last layers left exact
    path = _export(tmp_path)
    ref = load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    monkeypatch.setattr("dinodist.teacher.model.inference_dtype", lambda device: torch.bfloat16)
    for ckpt in (str(path), None):
        loaded = load_teacher("tiny-vit7b", {}, ckpt, "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
        want = ref.model.state_dict() if ckpt else None
        buffers = {n for n, _ in loaded.model.named_buffers()}
        assert buffers
        for name, t in loaded.model.state_dict().items():
            fp32 = name in buffers or ".last_layer." in name
            assert t.dtype == (torch.float32 if fp32 else torch.bfloat16), name
            if want is not None:
                assert torch.equal(t, want[name].to(t.dtype)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_load_is_bf16_in_place(tmp_path):
    path = _export(tmp_path)
    cuda = torch.device("cuda")
    loaded = load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD, device=cuda)
    ref = load_teacher("tiny-vit7b", {}, str(path), "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD)
    for name, p in loaded.model.named_parameters():
        want = torch.float32 if "last_layer" in name else torch.bfloat16
        assert p.device.type == "cuda" and p.dtype == want, name
    for name, b in loaded.model.named_buffers():
        assert b.device.type == "cuda" and b.dtype == torch.float32, name
    from dinodist.teacher.model import last_layers
    from dinodist.teacher.targets import compute_targets

    for k, w in last_layers(loaded.model).items():  # the prototypes students receive stay exact
        assert torch.equal(w.cpu(), last_layers(ref.model)[k]), k
    batch = {"collated_global_crops": torch.randn(4, 3, 32, 32),
             "collated_masks": torch.rand(4, 16) < 0.4}
    got = compute_targets(loaded.model, batch, 0, 0, "heads", cuda)
    want = compute_targets(ref.model, batch, 0, 0, "heads", torch.device("cpu"))
    for k in ("dino", "ibot"):
        torch.testing.assert_close(got.tensors[k].cpu(), want.tensors[k], atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------------------- compile


def _topology(path: Path, compile_: bool) -> Path:
    topo = {
        "name": "compile",
        "backend": "gloo",
        "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 1, "embed_dim": 64, "num_heads": 4},
                    "checkpoint": None, "targets": "heads", "shard": "replicate", "devices": 1},
        "students": [{"name": "tiny-vits", "arch": "tiny-vits", "overrides": {"depth": 2}, "devices": 1,
                      "compile": compile_}],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2},
        "train": {"global_batch_size": 4, "iterations": 2, "seed": 5, "lr": 2e-3},
        "metrics": {"port": 0},
        "output": str(path.parent / "unused"),
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def test_compiled_student_trains_like_eager(tmp_path, monkeypatch):
    # aot_eager: dynamo's graph capture and AOT autograd, eager kernels. Inductor on this 2-core CPU
    # spends about a minute compiling a tiny student's blocks, and starts compile workers.
    pytest.importorskip("torch._dynamo")
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    import dinodist.students.run as student_run
    from dinodist.orchestrator.runtime.inline import run_inline
    from dinodist.orchestrator.runtime.jobs import student_job
    from dinodist.orchestrator.topology import load_topology

    for name, flag in (("c.yaml", True), ("e.yaml", False)):
        topo = load_topology(_topology(tmp_path / name, flag))
        assert student_job(topo, "tiny-vits", tmp_path).compile is flag
    compiled = []

    def compile_aot_eager(backbone, **kw):
        compiled.append(backbone)
        return compile_blocks(backbone, backend="aot_eager", **kw)

    monkeypatch.setattr(student_run, "compile_blocks", compile_aot_eager)
    torch._dynamo.reset()
    try:
        run_inline(tmp_path / "e.yaml", "tiny-vits", tmp_path / "eager")
        assert not compiled
        run_inline(tmp_path / "c.yaml", "tiny-vits", tmp_path / "compiled")
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch._dynamo.reset()
    assert len(compiled) == 1 and all(b._compiled_call_impl is not None for b in compiled[0].blocks)
    assert graphs >= 1 and breaks == 0, (graphs, dict(counters["graph_break"]))  # the blocks ran compiled
    rows = {}
    for run in ("eager", "compiled"):
        lines = (tmp_path / run / "tiny-vits" / "metrics.jsonl").read_text().splitlines()
        rows[run] = [json.loads(x) for x in lines if x.strip()]
    assert len(rows["eager"]) == len(rows["compiled"]) == 2
    for e, c in zip(rows["eager"], rows["compiled"]):
        for term in ("loss", "dino_global", "dino_local", "ibot", "koleo"):
            assert abs(e[term] - c[term]) <= 1e-5, (e["iteration"], term, e[term], c[term])
    assert rows["eager"][0]["loss"] != rows["eager"][1]["loss"]  # it trained: not one repeated number
