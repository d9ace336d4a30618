"""Architecture table: every released DINOv3 ViT size, tiny CPU presets, and analytic cost.

This module is the single source of model sizes for the model code (`core.models`), the cost
model and allocator (`orchestrator`), and the configs. It imports nothing heavier than stdlib.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from dinodist.core.errors import DinodistError


@dataclass(frozen=True)
class ArchSpec:
    """Hyper-parameters of one DINOv3 vision transformer (official names in comments)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn_layer: str = "mlp"  # "mlp" (GELU) or "swiglu"
    ffn_ratio: float = 4.0
    swiglu_align: int = 8  # "swiglu" aligns the hidden size to 8, "swiglu64" to 64
    qkv_bias: bool = True  # with mask_k_bias: the K third of the bias is masked to zero
    local_cls_norm: bool = False  # untie_global_and_local_cls_norm (7B)
    patch_size: int = 16
    n_storage_tokens: int = 4
    layerscale_init: float = 1e-5
    norm_eps: float = 1e-5
    rope_base: float = 100.0
    rope_rescale: float | None = 2.0  # train-time coordinate rescale factor (None: off)
    rope_shift: float | None = None
    rope_jitter: float | None = None
    drop_path_rate: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn_layer == "mlp":
            return hidden
        d = int(2 * hidden / 3)
        return d + (-d % self.swiglu_align)

    def validate(self) -> ArchSpec:
        if self.ffn_layer not in ("mlp", "swiglu"):
            raise DinodistError(f"{self.name}: ffn_layer must be 'mlp' or 'swiglu', got {self.ffn_layer!r}")
        if self.embed_dim % self.num_heads:
            raise DinodistError(
                f"{self.name}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise DinodistError(f"{self.name}: head_dim {self.head_dim} must be a multiple of 4 (axial RoPE)")
        for f in ("embed_dim", "depth", "num_heads", "patch_size"):
            if getattr(self, f) <= 0:
                raise DinodistError(f"{self.name}: {f} must be positive")
        return self


@dataclass(frozen=True)
class HeadSpec:
    """A DINO or iBOT head: 3-layer MLP -> L2-normalised bottleneck -> bias-free prototypes."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_prototypes: int = 65536
    nlayers: int = 3


ARCHS: dict[str, ArchSpec] = {
    "vits16": ArchSpec("vits16", 384, 12, 6),
    "vits16plus": ArchSpec("vits16plus", 384, 12, 6, ffn_layer="swiglu", ffn_ratio=6),
    "vitb16": ArchSpec("vitb16", 768, 12, 12),
    "vitl16": ArchSpec("vitl16", 1024, 24, 16),
    "vitl16plus": ArchSpec("vitl16plus", 1024, 24, 16, ffn_layer="swiglu", ffn_ratio=6),
    "vith16plus": ArchSpec("vith16plus", 1280, 32, 20, ffn_layer="swiglu", ffn_ratio=6),
    "vit7b16": ArchSpec(
        "vit7b16", 4096, 40, 32, ffn_layer="swiglu", ffn_ratio=3, swiglu_align=64,
        qkv_bias=False, local_cls_norm=True,
    ),
}

# Heads of the paper's 7B recipe (and the distilled students, with their own in_dim).
PAPER_DINO_HEAD = HeadSpec(8192, 512, 262144)
PAPER_IBOT_HEAD = HeadSpec(4096, 384, 98304)

# Tiny members of each family for CPU work: patch 8 so 64 px crops give an 8x8 grid; widths and
# depths keep the paper family's ordering (S < S+ < B < L < H+ << 7B) and each family's FFN type.
PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-vits": ("vits16", dict(embed_dim=48, depth=4, num_heads=3, patch_size=8)),
    "tiny-vitsplus": ("vits16plus", dict(embed_dim=48, depth=4, num_heads=3, patch_size=8)),
    "tiny-vitb": ("vitb16", dict(embed_dim=96, depth=4, num_heads=6, patch_size=8)),
    "tiny-vitl": ("vitl16", dict(embed_dim=128, depth=8, num_heads=8, patch_size=8)),
    "tiny-vithplus": ("vith16plus", dict(embed_dim=160, depth=8, num_heads=10, patch_size=8)),
    "tiny-vit7b": ("vit7b16", dict(embed_dim=256, depth=8, num_heads=8, patch_size=8)),
}
TINY_DINO_HEAD = HeadSpec(256, 64, 1024)
TINY_IBOT_HEAD = HeadSpec(256, 64, 1024)

_OVERRIDABLE = {f.name for f in fields(ArchSpec)} - {"name"}


def known_archs() -> list[str]:
    return list(ARCHS) + list(PRESETS)


def get_arch(name: str, **overrides) -> ArchSpec:
    """Spec of a released arch or a tiny preset, with field overrides (e.g. `depth=2`)."""
    if name in ARCHS:
        spec = ARCHS[name]
    elif name in PRESETS:
        base, preset = PRESETS[name]
        spec = replace(ARCHS[base], name=name, **preset)
    else:
        raise DinodistError(f"unknown arch {name!r}; known: {', '.join(known_archs())}")
    bad = sorted(set(overrides) - _OVERRIDABLE)
    if bad:
        raise DinodistError(
            f"{name}: unknown override {bad[0]!r}; allowed: {', '.join(sorted(_OVERRIDABLE))}"
        )
    if overrides:
        spec = replace(spec, **overrides)
    return spec.validate()


def arch_dict(spec: ArchSpec) -> dict:
    return asdict(spec)


def num_tokens(spec: ArchSpec, img_size: int | tuple[int, int]) -> int:
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return (h // spec.patch_size) * (w // spec.patch_size) + 1 + spec.n_storage_tokens


def forward_flops(spec: ArchSpec, img_size: int | tuple[int, int]) -> int:
    """Backbone forward FLOPs for one image (reference formula; 1 MAC = 2 FLOPs).

    F = L*[2N*4D^2 + 4N^2*D + 2N*m*D*h] + 2P*(3*p^2)*D, m = 2 (MLP) or 3 (SwiGLU).
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    p = (h // spec.patch_size) * (w // spec.patch_size)
    n = p + 1 + spec.n_storage_tokens
    d, hid = spec.embed_dim, spec.ffn_hidden
    m = 2 if spec.ffn_layer == "mlp" else 3
    per_block = 2 * n * 4 * d * d + 4 * n * n * d + 2 * n * m * d * hid
    return spec.depth * per_block + 2 * p * (3 * spec.patch_size**2) * d


def head_flops(head: HeadSpec, in_dim: int, with_last_layer: bool = True) -> int:
    h = head.hidden_dim
    flops = 2 * (in_dim * h + h * h + h * head.bottleneck_dim)
    if with_last_layer:
        flops += 2 * head.bottleneck_dim * head.n_prototypes
    return flops


def num_parameters(spec: ArchSpec, include_local_cls_norm: bool = True) -> int:
    """Trainable parameters of the backbone (buffers such as rope periods and bias_mask excluded)."""
    d, hid, p = spec.embed_dim, spec.ffn_hidden, spec.patch_size
    embed = d * 3 * p * p + d  # patch conv
    tokens = d * (1 + spec.n_storage_tokens) + d  # cls + storage + mask token
    attn = 3 * d * d + (3 * d if spec.qkv_bias else 0) + d * d + d
    if spec.ffn_layer == "mlp":
        ffn = d * hid + hid + hid * d + d
    else:
        ffn = 2 * (d * hid + hid) + hid * d + d
    block = attn + ffn + 4 * d + 2 * d  # two LayerNorms (w, b) and two LayerScales
    norms = 2 * d + (2 * d if spec.local_cls_norm and include_local_cls_norm else 0)
    return embed + tokens + spec.depth * block + norms


CHECKPOINTING_MODES = ("none", "full", "selective")


def checkpointing_mode(value: bool | str | None) -> str:
    """A topology's `activation_checkpointing` (true / false / "selective") as one of CHECKPOINTING_MODES.

    Plain Python: the planner reads it without torch; `core.models.checkpointing` applies it.
    """
    if value is True or value in ("full", "true"):
        return "full"
    if value is False or value is None or value in ("none", "false"):
        return "none"
    if value == "selective":
        return "selective"
    raise DinodistError(f"activation_checkpointing: {value!r} is not one of true, false, selective")


def head_parameters(head: HeadSpec, in_dim: int, with_last_layer: bool = True) -> int:
    n = in_dim * head.hidden_dim + head.hidden_dim
    n += head.hidden_dim * head.hidden_dim + head.hidden_dim
    n += head.hidden_dim * head.bottleneck_dim + head.bottleneck_dim
    if with_last_layer:
        n += head.bottleneck_dim * head.n_prototypes
    return n
