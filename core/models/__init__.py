"""DINOv3 backbones, DINO/iBOT heads and official-format checkpoint I/O."""

from dinodist.core.models.arch import ArchSpec, HeadSpec, get_arch
from dinodist.core.models.heads import DINOHead, build_head
from dinodist.core.models.io import load_backbone, load_backbone_state, read_state_dict, save_backbone
from dinodist.core.models.vit import DinoVisionTransformer, build_backbone

__all__ = [
    "ArchSpec",
    "DINOHead",
    "DinoVisionTransformer",
    "HeadSpec",
    "build_backbone",
    "build_head",
    "get_arch",
    "load_backbone",
    "load_backbone_state",
    "read_state_dict",
    "save_backbone",
]
