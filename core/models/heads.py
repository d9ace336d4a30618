"""DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> bias-free prototype layer.

The split at the bottleneck matters for distillation: the teacher sends the normalised bottleneck
(`no_last_layer=True`) and each student group applies the teacher's `last_layer` itself
(`only_last_layer=True`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinodist.core.models.arch import HeadSpec


def _mlp(in_dim: int, spec: HeadSpec) -> nn.Sequential:
    if spec.nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, spec.bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, spec.hidden_dim), nn.GELU()]
    for _ in range(spec.nlayers - 2):
        layers += [nn.Linear(spec.hidden_dim, spec.hidden_dim), nn.GELU()]
    layers.append(nn.Linear(spec.hidden_dim, spec.bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, spec: HeadSpec) -> None:
        super().__init__()
        if spec.nlayers < 1:
            raise ValueError(f"head nlayers must be >= 1, got {spec.nlayers}")
        self.spec = spec
        self.in_dim = in_dim
        self.mlp = _mlp(in_dim, spec)
        self.last_layer = nn.Linear(spec.bottleneck_dim, spec.n_prototypes, bias=False)
        if self.last_layer.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        if not only_last_layer:
            x = self.mlp(x)
            # fp16 cannot represent 1e-12; the official head switches eps the same way.
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = F.normalize(x, dim=-1, p=2, eps=eps)
        if not no_last_layer:
            x = self.last_layer(x)
        return x


def build_head(in_dim: int, spec: HeadSpec, *, device=None) -> DINOHead:
    """Initialised head (trunc-normal .02, zero biases); on device="meta" shapes only."""
    if device is None:
        return DINOHead(in_dim, spec)
    with torch.device(device):
        return DINOHead(in_dim, spec)
