"""Load the frozen teacher: our export with heads, an official backbone, or a random init.

Accepted checkpoints:
- our export (`dinodist export-teacher`): `{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}`
  plus the `OUT.pth.json` sidecar with the arch spec and head specs (the official distillation
  loader reads the same .pth layout);
- an official backbone `.pth` (flat state dict, also `{"model": ...}`): `features` targets only,
  since released weights ship without DINO/iBOT heads;
- none: random init from the run seed, with a loud warning (demos and tests only).

A checkpoint is never copied into a freshly initialised fp32 model: the model is built on the meta
device, the file is memory-mapped (`torch.load(mmap=True)`), and each tensor goes straight to its
final device and dtype (`load_state_dict(assign=True)`). On CPU, fp32 parameters stay views of the
file's pages, shared by every rank on the node. A sharded teacher (fsdp, hsdp:
`load_sharded_teacher`) is sharded while still on meta, and each rank copies only its own rows of
each parameter out of the mapping, so no device ever holds the whole model. The checkpoint's identity
(sha256) comes from the sidecar that export-teacher wrote while it still matches the file's size and
mtime; a checkpoint without one (an official release) is hashed here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dinodist.core.errors import DinodistError
from dinodist.core.models import ArchSpec, HeadSpec, build_backbone, build_head
from dinodist.core.models.arch import get_arch
from dinodist.core.models.io import check_state_dict, load_file, read_sidecar, recorded_sha256
from dinodist.core.target_store.format import file_sha256
from dinodist.core.targets import FEATURES, HEADS

log = logging.getLogger(__name__)


class TeacherModel(nn.Module):
    """Backbone and (for `heads` targets) the DINO and iBOT heads; frozen, eval mode."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module | None, ibot_head: nn.Module | None,
                 kind: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.kind = kind

    def forward(self, crops: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # Imported here: the computation lives with the target format in teacher/targets.py, and
        # this module must stay the FSDP root (its forward is what unshards the root parameters).
        from dinodist.teacher.targets import target_tensors

        return target_tensors(self.backbone, self.dino_head, self.ibot_head, crops, masks, self.kind)


@dataclass
class LoadedTeacher:
    model: TeacherModel
    spec: ArchSpec
    dino_head: HeadSpec | None
    ibot_head: HeadSpec | None
    identity: str  # sha256 of the checkpoint file (bare hex), or "random-init:<seed>"

    def last_layer_shapes(self) -> dict[str, tuple[int, int]]:
        if self.model.kind != HEADS:
            return {}
        return {
            "dino_last_layer.weight": (self.dino_head.n_prototypes, self.dino_head.bottleneck_dim),
            "ibot_last_layer.weight": (self.ibot_head.n_prototypes, self.ibot_head.bottleneck_dim),
        }


def _head_spec(value, default: HeadSpec, where: str) -> HeadSpec:
    if value is None:
        return default
    if isinstance(value, HeadSpec):
        return value
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    try:
        return dataclasses.replace(default, **{k: v for k, v in dict(value).items() if v is not None})
    except TypeError as exc:
        raise DinodistError(f"{where}: {exc}") from None


def _spec_from_sidecar(side: dict, spec: ArchSpec, source: Path) -> ArchSpec:
    """`arch_spec` (all ArchSpec fields, as export-teacher writes) wins over `arch` + `overrides`."""
    arch = side.get("arch_spec", side.get("arch"))
    if arch is None:
        return spec
    if isinstance(arch, str):
        return get_arch(arch, **(side.get("overrides") or {}))
    fields = {f.name for f in dataclasses.fields(ArchSpec)}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise DinodistError(f"{source}.json: unknown arch field {unknown[0]!r}")
    return ArchSpec(**arch).validate()


def checkpoint_sha256(path: str | Path, side: dict | None = None) -> str:
    """"sha256:<hex>" of a teacher checkpoint (the form of a store's teacher_hash).

    Taken from the sidecar's `file` record (`side`, or read next to `path`) while the file keeps the
    size and mtime recorded at export; otherwise hashed, which reads the whole file (minutes at 7B).
    """
    path = Path(path)
    if side is None:
        side = read_sidecar(path) or {}
    recorded = recorded_sha256(path, side.get("file"))
    if recorded is not None:
        return recorded
    log.info("hashing teacher checkpoint %s (no sidecar record matching its size and mtime)", path)
    return file_sha256(path)


def inference_dtype(device: torch.device) -> torch.dtype:
    """The teacher's parameter dtype: bf16 on GPU (what FSDP's mixed precision computed in anyway),
    fp32 on CPU so CPU targets stay exact."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Kept fp32 everywhere: never used in the teacher's forward, sent to students and stored as they are.
_FP32_PARAMS = ("last_layer.",)


def _placed_dtype(key: str, t: Tensor, is_buffer: bool, dtype: torch.dtype) -> torch.dtype:
    """The dtype the teacher holds tensor `key` (relative to its part) in: the inference `dtype` for
    floating parameters, fp32 for buffers (RoPE periods lose precision in bf16, and FSDP's mixed
    precision never cast buffers either) and for the `_FP32_PARAMS`; other tensors as they are."""
    if not t.is_floating_point():
        return t.dtype
    return torch.float32 if is_buffer or key.startswith(_FP32_PARAMS) else dtype


def _placed(module: nn.Module, state: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """`state` as `module` holds it on `device`: each tensor copied at most once, none if already right.

    Copies go to the device first and are cast there (a CPU-side cast would make a second host copy of
    each tensor).
    """
    dtype = inference_dtype(device)
    buffers = {name for name, _ in module.named_buffers()}
    return {k: v.to(device).to(_placed_dtype(k, v, k in buffers, dtype)) for k, v in state.items()}


def _assign(module: nn.Module, state: dict[str, Tensor], device: torch.device) -> nn.Module:
    """Load an already checked `state` into `module` (a meta build, or a CPU one to move) by reference."""
    module.load_state_dict(_placed(module, state, device), strict=True, assign=True)
    return module


def _check_kind(kind: str) -> None:
    if kind not in (HEADS, FEATURES):
        raise DinodistError(f"teacher.targets must be 'heads' or 'features', got {kind!r}")


def load_teacher(arch: str, overrides: dict | None, checkpoint: str | None, kind: str,
                 dino_head: HeadSpec, ibot_head: HeadSpec, seed: int = 0, *,
                 device: torch.device | str | None = None) -> LoadedTeacher:
    """Build and load the frozen teacher (eval, no grad) on `device` (default CPU) in its inference
    dtype (`inference_dtype`); the caller shards it."""
    device = torch.device(device if device is not None else "cpu")
    _check_kind(kind)
    spec = get_arch(arch, **(overrides or {}))
    with_heads = kind == HEADS
    if checkpoint is None:
        log.warning(
            "\n%s\nWARNING: teacher.checkpoint is not set: the teacher %s is RANDOMLY INITIALISED "
            "(seed %d).\n"
            "Its targets carry no knowledge; use this only for demos and tests.\n%s",
            "!" * 78, spec.name, seed, "!" * 78,
        )
        # built and initialised on CPU whatever the device, so a seed gives the same weights everywhere
        torch.manual_seed(seed)
        backbone = build_backbone(spec)
        dh = build_head(spec.embed_dim, dino_head) if with_heads else None
        ih = build_head(spec.embed_dim, ibot_head) if with_heads else None
        for m in (backbone, dh, ih):
            if m is not None:
                _assign(m, m.state_dict(), device)
        return _finish(TeacherModel(backbone, dh, ih, kind), spec, dino_head if with_heads else None,
                       ibot_head if with_heads else None, f"random-init:{seed}")

    ck = _read_checkpoint(Path(checkpoint), spec, kind, dino_head, ibot_head)
    model = _meta_model(ck)
    for name, sd in ck.parts.items():
        part = getattr(model, name)
        if part is not None:
            _assign(part, sd, device)
    return _finish(model, ck.spec, ck.dino_head, ck.ibot_head, ck.identity)


@dataclass
class _Checkpoint:
    """A teacher checkpoint read (memory-mapped) and described, not yet placed anywhere."""

    path: Path
    spec: ArchSpec
    kind: str
    dino_head: HeadSpec | None
    ibot_head: HeadSpec | None
    parts: dict[str, dict[str, Tensor]]  # "backbone" / "dino_head" / "ibot_head" -> its state dict
    identity: str


def _read_checkpoint(path: Path, spec: ArchSpec, kind: str, dino_head: HeadSpec,
                     ibot_head: HeadSpec) -> _Checkpoint:
    obj = load_file(path, "teacher.checkpoint", mmap=True)
    side = read_sidecar(path) or {}
    # the bare digest: teacher/run.py adds the "sha256:" of a manifest's teacher_hash itself
    identity = checkpoint_sha256(path, side).removeprefix("sha256:")
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        spec = _spec_from_sidecar(side, spec, path)
        dino_head = _head_spec(side.get("dino_head"), dino_head, f"{path}.json dino_head")
        ibot_head = _head_spec(side.get("ibot_head"), ibot_head, f"{path}.json ibot_head")
        sd = obj["teacher"]
        parts = {p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
                 for p in ("backbone", "dino_head", "ibot_head")}
    else:
        if kind == HEADS:
            raise DinodistError(
                f"teacher.checkpoint {path}: a backbone-only checkpoint has no DINO/iBOT heads; "
                "set teacher.targets: features or export a teacher with heads (dinodist export-teacher)"
            )
        sd = obj.get("model", obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict):
            raise DinodistError(f"teacher.checkpoint {path}: expected a state dict, "
                                f"found {type(sd).__name__}")
        parts = {"backbone": sd}
    if kind != HEADS:
        dino_head = ibot_head = None
    return _Checkpoint(path, spec, kind, dino_head, ibot_head, parts, identity)


def _meta_model(ck: _Checkpoint) -> TeacherModel:
    """The teacher built on the meta device, every part checked against the file before anything moves:
    a mismatched file fails without copying gigabytes to the device first."""
    backbone = build_backbone(ck.spec, device="meta")
    check_state_dict(backbone, ck.parts["backbone"], str(ck.path), ck.spec.name)
    dh = ih = None
    if ck.kind == HEADS:
        dh = _check_head(ck.spec.embed_dim, ck.dino_head, ck.parts["dino_head"], ck.path, "dino_head")
        ih = _check_head(ck.spec.embed_dim, ck.ibot_head, ck.parts["ibot_head"], ck.path, "ibot_head")
    return TeacherModel(backbone, dh, ih, ck.kind)


def _check_head(in_dim: int, spec: HeadSpec, sd: dict, path: Path, name: str) -> nn.Module:
    """The head on the meta device, once the file's `name.*` tensors are known to fit it."""
    if not sd:
        raise DinodistError(f"teacher.checkpoint {path}: no '{name}.*' keys (needed for heads targets)")
    head = build_head(in_dim, spec, device="meta")
    want = head.state_dict()
    for k, v in want.items():
        if k not in sd:
            raise DinodistError(f"teacher.checkpoint {path}: missing {name}.{k}")
        if sd[k].shape != v.shape:
            raise DinodistError(
                f"teacher.checkpoint {path}: {name}.{k} has shape {list(sd[k].shape)}, "
                f"expected {list(v.shape)} (check teacher.{name} in the topology or the .json sidecar)"
            )
    extra = sorted(set(sd) - set(want))
    if extra:
        raise DinodistError(f"teacher.checkpoint {path}: unexpected {name}.{extra[0]}")
    return head


def _finish(model: TeacherModel, spec: ArchSpec, dino_head: HeadSpec | None, ibot_head: HeadSpec | None,
            identity: str) -> LoadedTeacher:
    """The loaded teacher, frozen: eval mode, no gradients."""
    model.eval().requires_grad_(False)
    return LoadedTeacher(model, spec, dino_head, ibot_head, identity)


TEACHER_LAYOUTS = ("fsdp", "hsdp", "replicate")


def hsdp_mesh(mesh, shard_size: int):
    """The 2-D (replicate, shard) mesh over a 1-D teacher mesh's ranks: each run of `shard_size`
    consecutive ranks (one node's, as the plan lays the teacher out from rank 0) shards one copy.

    Only the teacher's ranks run this, so the row and column groups are made with local synchronisation
    (their members alone take part): the other groups' ranks never reach this call.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if mesh.ndim != 1:
        raise DinodistError(f"teacher.shard: hsdp builds its 2-D mesh from a 1-D one, got {mesh.ndim}-D")
    ranks = mesh.mesh.tolist()
    if shard_size < 1 or len(ranks) % shard_size:
        raise DinodistError(f"teacher.shard: hsdp shard size {shard_size} does not divide the teacher's "
                            f"{len(ranks)} ranks")
    grid = [ranks[i:i + shard_size] for i in range(0, len(ranks), shard_size)]
    me = dist.get_rank()
    row = next(r for r in grid if me in r)
    column = [r[row.index(me)] for r in grid]
    # every rank creates its row's group before its column's: a row's members all do that first, then
    # each column's members have all finished their rows, so neither wait can hang
    shard_group = dist.new_group(row, use_local_synchronization=True)
    replicate_group = dist.new_group(column, use_local_synchronization=True)
    out = DeviceMesh.from_group([replicate_group, shard_group], mesh.device_type, mesh=grid,
                                mesh_dim_names=("replicate", "shard"))
    if tuple(out.shape) != (len(grid), shard_size):  # pragma: no cover - from_group checks the grid
        raise DinodistError(f"teacher.shard: hsdp mesh {tuple(out.shape)} is not {len(grid)} x {shard_size}")
    return out


def shard_teacher(model: TeacherModel, mesh, layout: str, shard_size: int | None = None) -> TeacherModel:
    """Lay the frozen teacher out over its group: `fsdp` (FSDP2 over the group's 1-D mesh), `hsdp`
    (FSDP2 over a 2-D (replicate, shard) mesh: sharded inside a node, replicated across nodes) or
    `replicate` (a full copy per rank). The plan chooses (orchestrator/cost.py:TeacherCostModel).

    hsdp takes a 2-D mesh as is, or builds it from the 1-D one with `shard_size` ranks per copy
    (plan.json's teacher_layout.shard_size, gcd(teacher ranks, devices per node)). `mesh` None: one rank.
    """
    if layout not in TEACHER_LAYOUTS:
        why = "the plan resolves it; pass the planned layout" if layout == "auto" else \
            f"not one of {', '.join(TEACHER_LAYOUTS)}"
        raise DinodistError(f"teacher.shard: {layout!r}: {why}")
    if layout == "replicate" or mesh is None:
        return model
    if layout == "hsdp" and mesh.ndim == 1:
        if shard_size is None:
            raise DinodistError("teacher.shard: hsdp needs the ranks per copy (plan.json teacher_layout."
                                "shard_size) or a 2-D (replicate, shard) mesh")
        if shard_size == 1:
            return model  # one rank per copy: a replicated teacher
        if shard_size != mesh.size():  # one copy over the whole group is fsdp on the 1-D mesh
            mesh = hsdp_mesh(mesh, shard_size)
    elif mesh.ndim != (2 if layout == "hsdp" else 1):
        raise DinodistError(f"teacher.shard: {layout} needs a {2 if layout == 'hsdp' else 1}-D mesh, "
                            f"got {mesh.ndim}-D")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if mesh.device_type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for block in model.backbone.blocks:
        fully_shard(block, **kwargs)
    for head in (model.dino_head, model.ibot_head):
        if head is not None:
            fully_shard(head, **kwargs)
    fully_shard(model, **kwargs)
    return model


def load_sharded_teacher(arch: str, overrides: dict | None, checkpoint: str | None, kind: str,
                         dino_head: HeadSpec, ibot_head: HeadSpec, seed: int = 0, *,
                         device: torch.device | str | None, mesh, layout: str,
                         shard_size: int | None = None) -> LoadedTeacher:
    """`load_teacher` then `shard_teacher`, except that a sharded layout (fsdp, hsdp) of a checkpoint
    never holds the whole model on the device: the model is built and sharded on the meta device,
    then each rank copies only its own shard of every parameter out of the mapped file (7B in bf16:
    1/n of 13.4 GB per GPU instead of all of it before FSDP splits it).

    A random init (demos, tests) and the unsharded layouts take the `load_teacher` path.
    """
    device = torch.device(device if device is not None else "cpu")
    sharded = mesh is not None and layout in ("fsdp", "hsdp") and not (layout == "hsdp" and shard_size == 1)
    if checkpoint is None or not sharded:
        loaded = load_teacher(arch, overrides, checkpoint, kind, dino_head, ibot_head, seed, device=device)
        shard_teacher(loaded.model, mesh, layout, shard_size=shard_size)
        return loaded
    _check_kind(kind)
    ck = _read_checkpoint(Path(checkpoint), get_arch(arch, **(overrides or {})), kind, dino_head, ibot_head)
    model = _meta_model(ck)
    state = {f"{part}.{k}": v for part, sd in ck.parts.items() for k, v in sd.items()}
    dtype = inference_dtype(device)
    with torch.no_grad():  # `_placed`'s dtypes, given to the meta parameters before sharding
        for name, p in model.named_parameters():
            p.data = p.data.to(_placed_dtype(name.split(".", 1)[1], p, False, dtype))
    shard_teacher(model, mesh, layout, shard_size=shard_size)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            _copy_shard(t, state[name])
    return _finish(model, ck.spec, ck.dino_head, ck.ibot_head, ck.identity)


def _copy_shard(t: Tensor, full: Tensor) -> None:
    """Fill `t` (a DTensor parameter's local shard, or a whole buffer: FSDP2 never shards those) from
    the file's full tensor, reading only the rows that land on this rank."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        t.copy_(full)
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local()
    if tuple(local.shape) != tuple(shape):  # pragma: no cover - FSDP2 and DTensor chunk alike
        raise DinodistError(f"teacher shard of shape {list(local.shape)}, expected {list(shape)}")
    if local.numel():
        local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])


def last_layers(model: TeacherModel) -> dict[str, torch.Tensor]:
    """The heads' prototype weights as full tensors (a collective over the teacher group if sharded)."""
    out = {}
    heads = (("dino_last_layer.weight", model.dino_head), ("ibot_last_layer.weight", model.ibot_head))
    for name, head in heads:
        if head is None:
            continue
        w = head.last_layer.weight.detach()
        if hasattr(w, "full_tensor"):
            w = w.full_tensor()
        out[name] = w.float()
    return out
