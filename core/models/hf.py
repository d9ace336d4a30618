"""A dinodist backbone as a Hugging Face `DINOv3ViTModel` (config.json + state dict), and back.

Pure torch and dicts: transformers is not imported here (the `export hf` command and the tests load
the result with it). Keys are written as transformers' own `save_pretrained` writes them (`layer.<i>.…`,
the layout before v5 moved the layers under `model.`; v5 renames them on load).

What maps exactly (so the HF outputs equal `forward_features` in fp32):
- qkv is split into q/k/v projections; the official masked K bias (`attn.qkv.bias_mask`) is folded
  into the biases, so `key_bias` is false exactly when the effective K bias is zero (the released
  models) and true otherwise: no mask value is lost.
- the SwiGLU hidden size is written as `intermediate_size`, so any alignment (8, 64) is exact.
- RoPE: `rope_base` -> `rope_theta`; the train-only coordinate augmentations map to the same-named
  `pos_embed_*` fields. transformers recomputes the frequencies from `rope_theta`, so stored periods
  that differ from that, or a head_dim its float `arange` miscounts, are refused.

Dropped, because only training uses them: the 7B's `local_cls_norm` (applied to the local crops' cls
and register tokens while training; inference uses `norm`, as the HF model does) and the drop-path
rate (transformers' per-sample drop path is not DINOv3's sample-subset one).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from dinodist.core.errors import DinodistError
from dinodist.core.models.arch import ArchSpec
from dinodist.core.models.rope import rope_periods

HF_MODEL_TYPE = "dinov3_vit"
HF_ARCHITECTURE = "DINOv3ViTModel"

# ArchSpec fields the mapping represents (exactly, or as train-only settings it documents). A field
# added to ArchSpec later is refused when it is not at its default, instead of being exported wrong.
_MAPPED = {
    "name", "embed_dim", "depth", "num_heads", "ffn_layer", "ffn_ratio", "swiglu_align", "qkv_bias",
    "local_cls_norm", "patch_size", "n_storage_tokens", "layerscale_init", "norm_eps", "rope_base",
    "rope_rescale", "rope_shift", "rope_jitter", "drop_path_rate",
}
_TRAIN_ONLY_KEYS = ("local_cls_norm.",)
# official FFN linear -> transformers' name, per ArchSpec.ffn_layer
_FFN_NAMES = {"mlp": {"fc1": "up_proj", "fc2": "down_proj"},
              "swiglu": {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}}
_BUFFERS = ("rope_embed.periods",)


def _hf_inv_freq(head_dim: int, base: float) -> Tensor:
    # transformers' formula, reproduced to check that it yields the periods the weights were trained with
    return 1 / base ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)


def check_hf_exportable(spec: ArchSpec, state: dict[str, Tensor]) -> list[str]:
    """Raise a one-line DinodistError naming the option DINOv3ViTModel cannot represent exactly;
    otherwise return notes on the train-only settings the export leaves out."""
    defaults = {f.name: f.default for f in dataclasses.fields(ArchSpec)}
    for f in dataclasses.fields(spec):
        if f.name not in _MAPPED and getattr(spec, f.name) != defaults.get(f.name):
            raise DinodistError(
                f"arch {spec.name}: option {f.name}={getattr(spec, f.name)!r} has no DINOv3ViTModel "
                "equivalent; not exporting to Hugging Face format"
            )
    hd = spec.head_dim
    inv = _hf_inv_freq(hd, spec.rope_base)
    if inv.numel() != hd // 4:
        raise DinodistError(
            f"arch {spec.name}: head_dim {hd} (embed_dim {spec.embed_dim} / num_heads {spec.num_heads}) "
            f"gives transformers' RoPE {inv.numel()} frequencies instead of {hd // 4}; not exportable exactly"
        )
    periods = state.get("rope_embed.periods")
    if periods is not None:
        ours = periods.detach().float().cpu()
        if ours.shape != inv.shape or not torch.allclose(ours, 1 / inv, rtol=1e-5, atol=0):
            raise DinodistError(
                f"arch {spec.name}: rope_embed.periods differ from rope_base {spec.rope_base} "
                "(DINOv3ViTModel recomputes them from rope_theta); not exportable exactly"
            )
    notes = []
    if spec.local_cls_norm:
        notes.append("local_cls_norm left out (train-only: local crops' cls/registers; inference uses norm)")
    if spec.drop_path_rate:
        notes.append(f"drop_path_rate {spec.drop_path_rate} not carried (train-only; config says 0.0)")
    return notes


def hf_config(spec: ArchSpec, state: dict[str, Tensor], image_size: int | None = None) -> dict:
    """config.json of the DINOv3ViTModel equivalent to `spec` with weights `state` (official keys)."""
    key_bias = spec.qkv_bias and any(_has_k_bias(state, i, spec.embed_dim) for i in range(spec.depth))
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "hidden_size": spec.embed_dim,
        "intermediate_size": spec.ffn_hidden,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "hidden_act": "gelu" if spec.ffn_layer == "mlp" else "silu",
        "use_gated_mlp": spec.ffn_layer == "swiglu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_base,
        # bookkeeping only in transformers: inputs of any multiple of the patch size work
        "image_size": image_size or 224,
        "patch_size": spec.patch_size,
        "num_channels": int(state["patch_embed.proj.weight"].shape[1]),
        "query_bias": spec.qkv_bias,
        "key_bias": key_bias,
        "value_bias": spec.qkv_bias,
        "proj_bias": True,
        "mlp_bias": True,
        "layerscale_value": spec.layerscale_init,
        "drop_path_rate": 0.0,
        "num_register_tokens": spec.n_storage_tokens,
        "pos_embed_shift": spec.rope_shift,
        "pos_embed_jitter": spec.rope_jitter,
        "pos_embed_rescale": spec.rope_rescale,
        "apply_layernorm": True,
        "reshape_hidden_states": True,
    }


def _effective_qkv_bias(state: dict[str, Tensor], i: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    bias = state[f"blocks.{i}.attn.qkv.bias"]
    mask = state.get(f"blocks.{i}.attn.qkv.bias_mask")
    eff = bias * mask.to(bias.dtype) if mask is not None else bias
    return eff[:d], eff[d : 2 * d], eff[2 * d :]


def _has_k_bias(state: dict[str, Tensor], i: int, d: int) -> bool:
    return bool(_effective_qkv_bias(state, i, d)[1].ne(0).any())


def to_hf_state_dict(spec: ArchSpec, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official-layout backbone weights -> DINOv3ViTModel weights (hub key layout, contiguous copies)."""
    check_hf_exportable(spec, state)
    d = spec.embed_dim
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in state:
            raise DinodistError(f"arch {spec.name}: backbone weights have no {key!r}")
        used.add(key)
        return state[key]

    key_bias = hf_config(spec, state)["key_bias"]
    out: dict[str, Tensor] = {
        "embeddings.cls_token": take("cls_token").reshape(1, 1, d),
        "embeddings.mask_token": take("mask_token").reshape(1, 1, d),
        # without registers dinodist has no storage_tokens; transformers keeps an empty [1, 0, D] parameter
        "embeddings.register_tokens": take("storage_tokens").reshape(1, spec.n_storage_tokens, d)
        if spec.n_storage_tokens else torch.zeros(1, 0, d, dtype=state["cls_token"].dtype),
        "embeddings.patch_embeddings.weight": take("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.bias": take("patch_embed.proj.bias"),
        "norm.weight": take("norm.weight"),
        "norm.bias": take("norm.bias"),
    }
    for i in range(spec.depth):
        src, dst = f"blocks.{i}.", f"layer.{i}."
        for n in ("norm1", "norm2"):
            out[f"{dst}{n}.weight"] = take(f"{src}{n}.weight")
            out[f"{dst}{n}.bias"] = take(f"{src}{n}.bias")
        q, k, v = take(f"{src}attn.qkv.weight").chunk(3, dim=0)
        out[f"{dst}attention.q_proj.weight"] = q
        out[f"{dst}attention.k_proj.weight"] = k
        out[f"{dst}attention.v_proj.weight"] = v
        if spec.qkv_bias:
            take(f"{src}attn.qkv.bias")
            if f"{src}attn.qkv.bias_mask" in state:
                take(f"{src}attn.qkv.bias_mask")
            qb, kb, vb = _effective_qkv_bias(state, i, d)
            out[f"{dst}attention.q_proj.bias"] = qb
            out[f"{dst}attention.v_proj.bias"] = vb
            if key_bias:
                out[f"{dst}attention.k_proj.bias"] = kb
        out[f"{dst}attention.o_proj.weight"] = take(f"{src}attn.proj.weight")
        out[f"{dst}attention.o_proj.bias"] = take(f"{src}attn.proj.bias")
        out[f"{dst}layer_scale1.lambda1"] = take(f"{src}ls1.gamma")
        out[f"{dst}layer_scale2.lambda1"] = take(f"{src}ls2.gamma")
        for ours, theirs in _FFN_NAMES[spec.ffn_layer].items():
            out[f"{dst}mlp.{theirs}.weight"] = take(f"{src}mlp.{ours}.weight")
            out[f"{dst}mlp.{theirs}.bias"] = take(f"{src}mlp.{ours}.bias")
    left = sorted(k for k in state
                  if k not in used and k not in _BUFFERS and not k.startswith(_TRAIN_ONLY_KEYS))
    if left:
        # a weight nobody maps would silently vanish from the export: refuse instead
        raise DinodistError(f"arch {spec.name}: no Hugging Face equivalent for weight {left[0]!r}"
                            + (f" (+{len(left) - 1} more)" if len(left) > 1 else ""))
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(spec: ArchSpec, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse: DINOv3ViTModel weights (hub or transformers-v5 `model.layer.` keys) -> official keys.

    The qkv bias comes back with its effective value and the standard K mask (a zero K bias when the
    HF model has none); the 7B's train-only `local_cls_norm` is not in HF weights and is not returned.
    """
    hf = {(k[len("model."):] if k.startswith("model.layer.") else k): v for k, v in hf_state.items()}
    d = spec.embed_dim
    out: dict[str, Tensor] = {
        "cls_token": hf["embeddings.cls_token"].reshape(1, 1, d),
        "mask_token": hf["embeddings.mask_token"].reshape(1, d),
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": rope_periods(spec.head_dim, spec.rope_base),
    }
    if spec.n_storage_tokens:
        out["storage_tokens"] = hf["embeddings.register_tokens"].reshape(1, spec.n_storage_tokens, d)
    names = _FFN_NAMES[spec.ffn_layer]
    for i in range(spec.depth):
        src, dst = f"layer.{i}.", f"blocks.{i}."
        out[f"{dst}norm1.weight"] = hf[f"{src}norm1.weight"]
        out[f"{dst}norm1.bias"] = hf[f"{src}norm1.bias"]
        a = f"{src}attention."
        out[f"{dst}attn.qkv.weight"] = torch.cat([hf[f"{a}{p}_proj.weight"] for p in "qkv"])
        if spec.qkv_bias:
            qb, vb = hf[f"{a}q_proj.bias"], hf[f"{a}v_proj.bias"]
            kb = hf.get(f"{a}k_proj.bias", torch.zeros_like(qb))
            out[f"{dst}attn.qkv.bias"] = torch.cat([qb, kb, vb])
            mask = torch.ones(3 * d, dtype=qb.dtype)
            if f"{a}k_proj.bias" not in hf:
                mask[d : 2 * d] = 0
            out[f"{dst}attn.qkv.bias_mask"] = mask
        out[f"{dst}attn.proj.weight"] = hf[f"{a}o_proj.weight"]
        out[f"{dst}attn.proj.bias"] = hf[f"{a}o_proj.bias"]
        out[f"{dst}ls1.gamma"] = hf[f"{src}layer_scale1.lambda1"]
        out[f"{dst}norm2.weight"] = hf[f"{src}norm2.weight"]
        out[f"{dst}norm2.bias"] = hf[f"{src}norm2.bias"]
        for ours, theirs in names.items():
            out[f"{dst}mlp.{ours}.weight"] = hf[f"{src}mlp.{theirs}.weight"]
            out[f"{dst}mlp.{ours}.bias"] = hf[f"{src}mlp.{theirs}.bias"]
        out[f"{dst}ls2.gamma"] = hf[f"{src}layer_scale2.lambda1"]
    out["norm.weight"] = hf["norm.weight"]
    out["norm.bias"] = hf["norm.bias"]
    return out
