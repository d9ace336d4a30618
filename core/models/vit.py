"""The DINOv3 vision transformer (`DinoVisionTransformer`) built from an `ArchSpec`.

Tokens are [cls, storage tokens (registers), patches row-major]; positions enter only through
axial RoPE inside attention. Parameter names and registration order follow the official model, so
`state_dict()` has exactly the official keys in the official order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from dinodist.core.errors import DinodistError
from dinodist.core.models.arch import ArchSpec, get_arch
from dinodist.core.models.block import Block
from dinodist.core.models.layers import LayerScale, LinearKMaskedBias, PatchEmbed
from dinodist.core.models.rope import RopePositionEmbedding


class DinoVisionTransformer(nn.Module):
    def __init__(self, spec: ArchSpec, in_chans: int = 3) -> None:
        super().__init__()
        self.spec = spec
        d = spec.embed_dim
        self.embed_dim = self.num_features = d
        self.patch_size = spec.patch_size
        self.n_storage_tokens = spec.n_storage_tokens
        self.n_blocks = spec.depth
        self.num_heads = spec.num_heads

        self.patch_embed = PatchEmbed(spec.patch_size, in_chans, d)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        if spec.n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.empty(1, spec.n_storage_tokens, d))
        else:
            self.storage_tokens = None
        self.rope_embed = RopePositionEmbedding(
            spec.head_dim,
            base=spec.rope_base,
            rescale_coords=spec.rope_rescale,
            shift_coords=spec.rope_shift,
            jitter_coords=spec.rope_jitter,
        )
        self.blocks = nn.ModuleList(
            Block(
                d,
                spec.num_heads,
                spec.ffn_layer,
                spec.ffn_hidden,
                spec.qkv_bias,
                spec.layerscale_init,
                spec.norm_eps,
                drop_path=spec.drop_path_rate,
            )
            for _ in range(spec.depth)
        )
        self.norm = nn.LayerNorm(d, eps=spec.norm_eps)
        # Train-only norm for the cls/register tokens of the local crops (list element 1).
        self.local_cls_norm = nn.LayerNorm(d, eps=spec.norm_eps) if spec.local_cls_norm else None
        self.mask_token = nn.Parameter(torch.empty(1, d))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official `init_weights`: also refills buffers, so it completes a meta build after `to_empty`."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LinearKMaskedBias):
                    m.reset_mask()
            elif isinstance(m, nn.LayerNorm | LayerScale | PatchEmbed):
                m.reset_parameters()

    def prepare_tokens_with_masks(
        self, x: Tensor, masks: Tensor | None = None
    ) -> tuple[Tensor, tuple[int, int]]:
        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise DinodistError(
                f"input shape {tuple(x.shape)}: expected [B, C, H, W] with H and W multiples of "
                f"patch_size {self.patch_size}"
            )
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise DinodistError(f"masks shape {tuple(masks.shape)}: expected {tuple(x.shape[:2])}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            # Keeps mask_token in the autograd graph when no crop is masked (DDP/FSDP need every param used).
            cls_token = self.cls_token + 0 * self.mask_token
        parts = [cls_token.expand(B, -1, -1)]
        if self.storage_tokens is not None:
            parts.append(self.storage_tokens.expand(B, -1, -1))
        parts.append(x)
        return torch.cat(parts, dim=1), (H, W)

    def _split_norm(self, x: Tensor, local: bool) -> tuple[Tensor, Tensor]:
        n_prefix = self.n_storage_tokens + 1
        if self.local_cls_norm is not None and local:
            return self.local_cls_norm(x[:, :n_prefix]), self.norm(x[:, n_prefix:])
        x_norm = self.norm(x)
        return x_norm[:, :n_prefix], x_norm[:, n_prefix:]

    def forward_features_list(self, xs: list[Tensor], masks: list[Tensor | None]) -> list[dict]:
        if len(xs) != len(masks):
            raise DinodistError(f"forward_features_list: {len(xs)} inputs but {len(masks)} masks")
        tokens, grids = [], []
        for x, m in zip(xs, masks):
            t, hw = self.prepare_tokens_with_masks(x, m)
            tokens.append(t)
            grids.append(hw)
        for blk in self.blocks:
            # Recomputed per block: while training each block draws its own RoPE coordinate augmentation.
            ropes = [self.rope_embed(H, W) for H, W in grids]
            tokens = blk(tokens, ropes)
        out = []
        for idx, (x, m) in enumerate(zip(tokens, masks)):
            # List element 1 holds the local crops by convention (official multi-crop order).
            cls_reg, patches = self._split_norm(x, local=self.training and idx == 1)
            out.append(
                {
                    "x_norm_clstoken": cls_reg[:, 0],
                    "x_storage_tokens": cls_reg[:, 1:],
                    "x_norm_patchtokens": patches,
                    "x_prenorm": x,
                    "masks": m,
                }
            )
        return out

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | list | None = None
    ) -> dict | list[dict]:
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(x, masks if masks is not None else [None] * len(x))

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (int) or of the listed 0-based blocks, as the official method."""
        depth = len(self.blocks)
        take = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        bad = sorted(i for i in take if not 0 <= i < depth)
        if bad or (isinstance(n, int) and not 0 < n <= depth):
            raise DinodistError(f"get_intermediate_layers: n={n!r} is out of range for {depth} blocks")
        tokens, (H, W) = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, self.rope_embed(H, W))
            if i in take:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        n_prefix = self.n_storage_tokens + 1
        cls = [o[:, 0] for o in outputs]
        extra = [o[:, 1:n_prefix] for o in outputs]
        patches = [o[:, n_prefix:] for o in outputs]
        if reshape:
            B = x.shape[0]
            patches = [p.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, cls, extra))
        if return_class_token:
            return tuple(zip(patches, cls))
        if return_extra_tokens:
            return tuple(zip(patches, extra))
        return tuple(patches)

    def forward(
        self, x: Tensor | list[Tensor], masks=None, is_training: bool = False
    ) -> Tensor | dict | list:
        ret = self.forward_features(x, masks)
        if is_training:
            return ret
        return ret["x_norm_clstoken"]


def resolve_spec(arch: str | ArchSpec, **overrides) -> ArchSpec:
    if isinstance(arch, str):
        return get_arch(arch, **overrides)
    allowed = {f.name for f in dataclasses.fields(ArchSpec)} - {"name"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise DinodistError(
            f"{arch.name}: unknown override {bad[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )
    return dataclasses.replace(arch, **overrides).validate() if overrides else arch.validate()


def build_backbone(arch: str | ArchSpec, *, device=None, **overrides) -> DinoVisionTransformer:
    """Build and initialise a backbone; on device="meta" only shapes exist (no init, no memory)."""
    spec = resolve_spec(arch, **overrides)
    with torch.device(device) if device is not None else nullcontext():
        model = DinoVisionTransformer(spec)
    if model.cls_token.device.type != "meta":
        model.init_weights()
    return model
