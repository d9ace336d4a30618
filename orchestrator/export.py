"""`dinodist export hf|safetensors`: a trained backbone (and heads) in the formats people load.

Sources: a `dinodist distill` group folder (its EMA backbone.pth; heads: the EMA student's, from the
newest valid checkpoint under ckpt/), a teacher export .pth (+ sidecar), a `dinodist train` run folder
(its EMA teacher), or an official-layout backbone .pth (`--arch` when no sidecar names it).

Every export is staged in `OUT_DIR.tmp-*` beside OUT_DIR, verified there, and renamed into place, so
OUT_DIR either holds a complete, checked export or is untouched. torch (and transformers, for the
optional check of `export hf`) are imported inside the functions: the driver loads without torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinodist.core.errors import DinodistError
from dinodist.core.train.metrics import knn_last_best, read_records

if TYPE_CHECKING:
    from torch import Tensor, nn

HEAD_NAMES = ("dino_head", "ibot_head")
VERIFY_ATOL = 1e-4  # the HF check's bound (fp32); identical weights give ~1e-7


@dataclass
class Source:
    """A loaded checkpoint: the backbone in eval mode, its heads if any, and what the model card says."""

    kind: str  # "group", "teacher", "run" or "backbone"
    path: Path
    backbone: nn.Module
    arch: str
    overrides: dict[str, Any]
    image_size: int | None = None
    heads: dict[str, nn.Module] = field(default_factory=dict)
    heads_origin: str | None = None  # where the heads come from, for the card
    info: dict[str, Any] = field(default_factory=dict)  # teacher, data, iteration, metrics
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        what = {"group": "distill group folder", "teacher": "teacher export", "run": "train run folder",
                "backbone": "backbone checkpoint"}[self.kind]
        return f"{what} {self.path} ({self.arch})"


# ---------------------------------------------------------------------------------------------- sources


def _arch_of(meta: dict | None, arch: str | None, path: Path) -> tuple[str, dict]:
    if meta is None:
        if arch is None:
            raise DinodistError(f"CHECKPOINT {path}: no {path.name}.json sidecar, so --arch is required")
        return arch, {}
    if arch is not None and arch != meta["arch"]:
        raise DinodistError(f"--arch {arch}: {path.name}.json says the checkpoint is {meta['arch']}")
    overrides = meta.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise DinodistError(f"{path}.json: 'overrides' is not a mapping")
    return meta["arch"], dict(overrides)


def head_spec_from_shapes(shapes: dict[str, tuple[int, ...]], where: str):
    """(in_dim, HeadSpec) of a DINO/iBOT head from its weight shapes (keys mlp.<i>.weight, last_layer.weight).

    Checkpoints do not record head specs, but the shapes determine them.
    """
    from dinodist.core.models.arch import HeadSpec

    mlp = sorted((int(k.split(".")[1]), v) for k, v in shapes.items()
                 if k.startswith("mlp.") and k.endswith(".weight"))
    if not mlp or "last_layer.weight" not in shapes:
        raise DinodistError(f"{where}: not a DINO head (needs mlp.*.weight and last_layer.weight)")
    in_dim = mlp[0][1][1]
    hidden = mlp[0][1][0] if len(mlp) > 1 else HeadSpec().hidden_dim
    k, bottleneck = shapes["last_layer.weight"]
    return in_dim, HeadSpec(hidden, bottleneck, k, len(mlp))


def _build_heads(state: dict[str, Tensor], where: str) -> dict[str, nn.Module]:
    """Heads present in a state dict with `dino_head.*` / `ibot_head.*` keys, strictly loaded."""
    from dinodist.core.models.heads import build_head

    heads = {}
    for name in HEAD_NAMES:
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if not sub:
            continue
        in_dim, spec = head_spec_from_shapes({k: tuple(v.shape) for k, v in sub.items()}, f"{where} {name}")
        head = build_head(in_dim, spec, device="meta")
        try:
            head.load_state_dict({k: v.float() for k, v in sub.items()}, strict=True, assign=True)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1].strip()
            raise DinodistError(f"{where}: {name} does not load ({detail[:160]})") from None
        heads[name] = head.eval()
    return heads


def _group_heads(group: Path) -> tuple[dict[str, nn.Module], str | None, int | None]:
    """The EMA student's heads from the newest valid checkpoint of a group folder (none for a
    `features` student or a group without a checkpoint)."""
    import torch.distributed.checkpoint as dcp

    from dinodist.core.checkpoint import latest_valid_checkpoint, load_model_only, read_meta
    from dinodist.core.models.heads import build_head

    ck = latest_valid_checkpoint(group / "ckpt")
    if ck is None:
        return {}, None, None
    try:
        meta = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    except Exception as exc:  # DCP raises whatever its reader hits; one line for the user
        raise DinodistError(f"{ck}: unreadable checkpoint metadata ({type(exc).__name__})") from None
    heads = {}
    for name in HEAD_NAMES:
        prefix = f"model.ema.{name}."
        shapes = {k[len(prefix):]: tuple(v.size) for k, v in meta.items() if k.startswith(prefix)}
        if not shapes:
            continue
        in_dim, spec = head_spec_from_shapes(shapes, f"{ck} ema.{name}")
        head = build_head(in_dim, spec, device="meta").to_empty(device="cpu")
        load_model_only(ck, head, prefix=f"ema.{name}")
        heads[name] = head.eval()
    it = read_meta(ck)["iteration"]
    return heads, (f"EMA student, checkpoint {ck}" if heads else None), it


def _metrics_path(folder: str | Path | None) -> Path | None:
    if not folder:
        return None
    p = Path(folder) / "metrics.jsonl"
    return p if p.is_file() else None


def _load_flat_backbone(path: Path, arch: str, overrides: dict):
    from dinodist.core.models.io import load_backbone

    return load_backbone(path, arch, **overrides).eval()


def resolve_source(checkpoint: str | Path, arch: str | None = None, heads: bool = True) -> Source:
    """Load what CHECKPOINT names (see the module doc); `heads=False` skips loading any heads."""
    from dinodist.core.models.io import read_sidecar

    path = Path(checkpoint)
    if not path.exists():
        raise DinodistError(f"CHECKPOINT {path}: no such file or folder")
    if path.is_dir() and (path / "config.yaml").is_file():
        return _run_source(path, arch, heads)
    if path.is_dir():
        bb_path = path / "backbone.pth"
        if not bb_path.is_file():
            raise DinodistError(f"CHECKPOINT {path}: neither a `dinodist distill` group folder "
                                "(backbone.pth) nor a `dinodist train` run folder (config.yaml)")
        meta = read_sidecar(bb_path, require_arch=True)
        name, overrides = _arch_of(meta, arch, bb_path)
        src = Source("group", path, _load_flat_backbone(bb_path, name, overrides), name, overrides,
                     image_size=(meta or {}).get("image_size"))
        origin = (meta or {}).get("source") or {}
        src.info = {"teacher": origin.get("teacher"), "data": origin.get("data"),
                    "iteration": origin.get("iteration"), "targets": origin.get("targets"),
                    "metrics": _metrics_path(path)}
        if heads:
            src.heads, src.heads_origin, head_it = _group_heads(path)
            src.info["heads_iteration"] = head_it
            if src.heads and head_it != src.info["iteration"]:
                src.notes.append(f"heads are from checkpoint iteration {head_it}, backbone.pth from "
                                 f"iteration {src.info['iteration']}")
        return src
    return _file_source(path, arch, heads)


def _file_source(path: Path, arch: str | None, heads: bool) -> Source:
    from dinodist.core.models.io import load_backbone_state, load_file, read_sidecar, read_state_dict
    from dinodist.core.models.vit import build_backbone

    meta = read_sidecar(path, require_arch=True)
    name, overrides = _arch_of(meta, arch, path)
    obj = load_file(path, mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        state = obj["teacher"]
        bb_state = {k[len("backbone."):]: v.float() if v.is_floating_point() else v
                    for k, v in state.items() if k.startswith("backbone.")}
        if not bb_state:
            raise DinodistError(f"CHECKPOINT {path}: 'teacher' entry has no 'backbone.*' keys")
        backbone = load_backbone_state(build_backbone(name, device="meta", **overrides), bb_state, str(path))
        src = Source("teacher", path, backbone.eval(), name, overrides,
                     image_size=(meta or {}).get("image_size"))
        if heads:
            src.heads = _build_heads(state, f"CHECKPOINT {path}")
            src.heads_origin = f"teacher export {path}" if src.heads else None
    else:
        del obj
        state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(path).items()}
        backbone = load_backbone_state(build_backbone(name, device="meta", **overrides), state, str(path))
        src = Source("backbone", path, backbone.eval(), name, overrides,
                     image_size=(meta or {}).get("image_size"))
    origin = (meta or {}).get("source") or {}
    run_dir = origin.get("run_dir")
    ck = origin.get("checkpoint")
    iteration = origin.get("iteration")
    if iteration is None and ck and Path(ck).name.isdigit():
        iteration = int(Path(ck).name)
    src.info = {"teacher": origin.get("teacher"), "data": origin.get("data") or _run_data(run_dir),
                "iteration": iteration, "stage": origin.get("stage"), "metrics": _metrics_path(run_dir)}
    return src


def _run_data(run_dir: str | None) -> str | None:
    if not run_dir or not (Path(run_dir) / "config.yaml").is_file():
        return None
    from dinodist.core.ssl.config import load_stage_config

    try:
        return load_stage_config(Path(run_dir) / "config.yaml").data.source
    except DinodistError:
        return None  # the card says "not recorded"; the export itself does not need the run's config


def _run_source(path: Path, arch: str | None, heads: bool) -> Source:
    from dinodist.core.ssl.export import load_run_model

    cfg, model, ck = load_run_model(path)
    if arch is not None and arch != cfg.model.arch:
        raise DinodistError(f"--arch {arch}: {path / 'config.yaml'} says the model is {cfg.model.arch}")
    teacher = model.teacher
    src = Source("run", path, teacher.backbone.eval(), cfg.model.arch, dict(cfg.model.overrides),
                 image_size=cfg.crops.global_size)
    if heads:
        src.heads = {n: getattr(teacher, n).eval() for n in HEAD_NAMES}
        src.heads_origin = f"EMA teacher, checkpoint {ck}"
    src.info = {"teacher": None, "data": cfg.data.source, "iteration": int(ck.name), "stage": cfg.stage,
                "metrics": _metrics_path(path)}
    return src


# ------------------------------------------------------------------------------------------ model card


def knn_summary(metrics: str | Path | None) -> dict[str, Any] | None:
    """Last and best `knn_top1` (a fraction) of a metrics.jsonl with their iterations; None: not measured
    (also when the file is damaged before its last line: the card must not stop the export)."""
    if metrics is None or not Path(metrics).is_file():
        return None
    try:
        return knn_last_best(read_records(metrics))
    except DinodistError:
        return None


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _head_text(name: str, spec: dict) -> str:
    label = {"dino_head": "DINO", "ibot_head": "iBOT"}[name]
    return (f"{label} {spec['nlayers']} layers, hidden {spec['hidden_dim']}, "
            f"bottleneck {spec['bottleneck_dim']}, {spec['n_prototypes']:,} prototypes")


def model_card(src: Source, fmt: str, files: list[str], head_specs: dict[str, dict]) -> str:
    """README.md of an export: what it is, where it comes from, how well it did, how to load it."""
    spec = src.backbone.spec
    n_params = sum(p.numel() for p in src.backbone.parameters())
    knn = knn_summary(src.info.get("metrics"))
    if knn is None:
        knn_text = "not measured"
    else:
        knn_text = (f"last {_pct(knn['last'])} (iteration {knn['last_iteration']}), "
                    f"best {_pct(knn['best'])} (iteration {knn['best_iteration']})")
    overrides = ", ".join(f"{k}={v}" for k, v in src.overrides.items()) or "none"
    rows = [
        ("arch", f"`{src.arch}` (overrides: {overrides})"),
        ("backbone", f"dim {spec.embed_dim}, depth {spec.depth}, heads {spec.num_heads}, "
                     f"{spec.ffn_layer} FFN {spec.ffn_hidden}, patch {spec.patch_size}, "
                     f"{spec.n_storage_tokens} registers"),
        ("backbone parameters", f"{n_params:,}"),
        ("source", src.description),
        ("teacher", str(src.info.get("teacher") or ("none (self-supervised)" if src.kind in ("teacher", "run")
                                                     else "not recorded"))),
        ("data", str(src.info.get("data") or "not recorded")),
        ("iterations", str(src.info.get("iteration") if src.info.get("iteration") is not None
                           else "not recorded")),
        ("k-NN top-1", knn_text),
        ("heads", "; ".join(_head_text(n, s) for n, s in head_specs.items()) + f" ({src.heads_origin})"
         if head_specs else "none"),
        ("files", ", ".join(f"`{f}`" for f in files)),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    ov_args = "".join(f", {k}={v!r}" for k, v in src.overrides.items())
    if fmt == "hf":
        load = ("```python\nfrom transformers import DINOv3ViTModel\n\n"
                "model = DINOv3ViTModel.from_pretrained(\"PATH/TO/THIS/FOLDER\").eval()\n"
                "out = model(pixel_values=images)  # [B, 3, H, W], H and W multiples of the patch size\n"
                "cls, patches = out.pooler_output, out.last_hidden_state[:, 1 + "
                f"{spec.n_storage_tokens}:]\n```\n")
    else:
        load = ("```python\nfrom safetensors.torch import load_file\n"
                "from dinodist.core.models import build_backbone\n\n"
                f"model = build_backbone({src.arch!r}{ov_args})\n"
                "model.load_state_dict(load_file(\"backbone.safetensors\"), strict=True)\n```\n\n"
                "The keys are those of the official DINOv3 `.pth` files, so the official "
                "`DinoVisionTransformer` of the same size loads them with `strict=True` as well.\n")
    notes = "".join(f"- {n}\n" for n in src.notes)
    kind = "Hugging Face" if fmt == "hf" else "safetensors"
    return (f"# {src.arch} backbone exported by dinodist ({kind})\n\n"
            f"| | |\n|---|---|\n{table}\n\n## Load\n\n{load}"
            + (f"\n## Notes\n\n{notes}" if notes else ""))


# ----------------------------------------------------------------------------------------- out dir


def check_out_dir(out: str | Path, force: bool, source: Path) -> Path:
    """OUT_DIR may be new or empty; a non-empty one only with --force, and never the source itself."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DinodistError(f"OUT_DIR {out}: exists and is not a folder")
    o, s = out.resolve(), source.resolve()
    if o == s or o in s.parents:
        raise DinodistError(f"OUT_DIR {out}: holds the CHECKPOINT being exported; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DinodistError(f"OUT_DIR {out}: exists and is not empty (--force replaces it)")
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield `OUT_DIR.tmp-*` to write into; on success it replaces OUT_DIR, on any failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            # rename the old folder aside first: at no moment is OUT_DIR half old, half new
            old = out.with_name(tmp.name.replace(".tmp-", ".old-"))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _state(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def _probe(patch: int):
    """A fixed non-square input: an H/W swap in a mapping shows up as a mismatch."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4 * patch, 6 * patch, generator=g)


# ------------------------------------------------------------------------------------------- exports


def export_safetensors(src: Source, out: Path, verify: bool = True) -> tuple[list[Path], list[str]]:
    """backbone.safetensors (official keys), heads.safetensors + heads.json (if any), config.json, README.md.

    Returns (files written, check lines). The round trip is checked in the staging folder: the written
    backbone (and heads) load strictly into freshly built modules with identical tensors and outputs.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from dinodist.core.models.arch import arch_dict
    from dinodist.core.models.io import load_backbone_state
    from dinodist.core.models.vit import build_backbone

    bb_state = _state(src.backbone)
    head_specs = {n: dataclasses.asdict(h.spec) | {"in_dim": h.in_dim} for n, h in src.heads.items()}
    checks = []
    with staged_dir(out) as tmp:
        meta = {"format": "pt", "dinodist_arch": src.arch, "dinodist_overrides": json.dumps(src.overrides)}
        save_file(bb_state, tmp / "backbone.safetensors", metadata=meta)
        files = ["backbone.safetensors"]
        if src.heads:
            head_state = {}
            for n, h in src.heads.items():
                head_state.update(_state(h, n + "."))
            save_file(head_state, tmp / "heads.safetensors",
                      metadata={"format": "pt", "dinodist_heads": json.dumps(head_specs)})
            _write_json(tmp / "heads.json", {"heads": head_specs, "origin": src.heads_origin})
            files += ["heads.safetensors", "heads.json"]
        config = {
            "format": "dinodist-safetensors-v1",
            "arch": src.arch,
            "overrides": src.overrides,
            "arch_spec": arch_dict(src.backbone.spec),
            "image_size": src.image_size,
            "heads": head_specs or None,
            "source": {"kind": src.kind, "path": str(src.path), "heads": src.heads_origin,
                       **{k: (str(v) if isinstance(v, Path) else v) for k, v in src.info.items()}},
        }
        _write_json(tmp / "config.json", config)
        files += ["config.json", "README.md"]
        (tmp / "README.md").write_text(model_card(src, "safetensors", files, head_specs))
        if verify:
            back = load_file(tmp / "backbone.safetensors")
            fresh = build_backbone(src.arch, device="meta", **src.overrides)
            load_backbone_state(fresh, back, source=str(out / "backbone.safetensors"))
            bad = [k for k, v in fresh.state_dict().items() if not torch.equal(v, bb_state[k])]
            x = _probe(src.backbone.patch_size)
            with torch.no_grad():
                a, b = src.backbone.forward_features(x), fresh.eval().forward_features(x)
            bad += [k for k in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens")
                    if not torch.equal(a[k], b[k])]
            if src.heads:
                hs = load_file(tmp / "heads.safetensors")
                for n, h in src.heads.items():
                    sub = {k[len(n) + 1:]: v for k, v in hs.items() if k.startswith(n + ".")}
                    ref = h.state_dict()
                    if sub.keys() != ref.keys() or any(not torch.equal(sub[k], ref[k]) for k in ref):
                        bad.append(n)
            if bad:
                raise DinodistError(f"OUT_DIR {out}: round trip differs at {bad[0]} (nothing written)")
            checks.append("round trip: backbone.safetensors loads strictly into build_backbone("
                          f"{src.arch!r}) with identical tensors and outputs"
                          + ("; heads identical" if src.heads else ""))
    return [out / f for f in files], checks


def export_hf(src: Source, out: Path, verify: bool = True) -> tuple[list[Path], list[str]]:
    """config.json + model.safetensors for transformers' DINOv3ViTModel (+ README.md).

    Refused in one line when the arch has no exact DINOv3ViTModel equivalent. With `verify` and
    transformers installed, the staged folder is loaded with `DINOv3ViTModel.from_pretrained` and its
    outputs compared with `forward_features` (max |diff| <= 1e-4, fp32) before it is moved into place.
    """
    from safetensors.torch import save_file

    from dinodist.core.models.hf import check_hf_exportable, hf_config, to_hf_state_dict

    spec = src.backbone.spec
    state = _state(src.backbone)
    src.notes.extend(check_hf_exportable(spec, state))
    hf_state = to_hf_state_dict(spec, state)
    config = hf_config(spec, state, image_size=src.image_size)
    checks = []
    with staged_dir(out) as tmp:
        save_file(hf_state, tmp / "model.safetensors", metadata={"format": "pt", "dinodist_arch": src.arch})
        _write_json(tmp / "config.json", config)
        files = ["config.json", "model.safetensors", "README.md"]
        (tmp / "README.md").write_text(model_card(src, "hf", files, {}))
        if verify:
            checks.append(_verify_hf(src, tmp, out))
    return [out / f for f in files], checks


def _verify_hf(src: Source, folder: Path, out: Path) -> str:
    try:
        import transformers
        from transformers import DINOv3ViTModel
    except ImportError:
        return "not checked against transformers (not installed; pip install transformers)"
    import torch

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = DINOv3ViTModel.from_pretrained(str(folder)).eval()
    x = _probe(src.backbone.patch_size)
    with torch.no_grad():
        ours = src.backbone.forward_features(x)
        theirs = model(pixel_values=x)
    ref = torch.cat([ours["x_norm_clstoken"][:, None], ours["x_storage_tokens"], ours["x_norm_patchtokens"]],
                    dim=1)
    if theirs.last_hidden_state.shape != ref.shape:
        raise DinodistError(f"OUT_DIR {out}: DINOv3ViTModel gives {list(theirs.last_hidden_state.shape)} "
                            f"tokens, dinodist {list(ref.shape)} (nothing written)")
    diff = max((theirs.last_hidden_state - ref).abs().max().item(),
               (theirs.pooler_output - ours["x_norm_clstoken"]).abs().max().item())
    if not diff <= VERIFY_ATOL:
        raise DinodistError(f"OUT_DIR {out}: DINOv3ViTModel differs from dinodist by {diff:.2e} "
                            f"(> {VERIFY_ATOL:g}; nothing written)")
    return (f"checked: DINOv3ViTModel (transformers {transformers.__version__}) matches forward_features, "
            f"max |diff| {diff:.1e}")
