"""DINOv3 backbones, DINO/iBOT heads and official-format checkpoint I/O.

`arch` (sizes, parameter and FLOP counts) is plain Python; the other names load torch on first use
(core/lazy.py), so the planner reads the architecture table without torch.
"""

from dinodist.core.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "ArchSpec": "arch",
    "apply_activation_checkpointing": "checkpointing",
    "compile_blocks": "checkpointing",
    "HeadSpec": "arch",
    "get_arch": "arch",
    "DINOHead": "heads",
    "build_head": "heads",
    "load_backbone": "io",
    "load_backbone_state": "io",
    "read_state_dict": "io",
    "save_backbone": "io",
    "DinoVisionTransformer": "vit",
    "build_backbone": "vit",
})

__all__ = [
    "ArchSpec",
    "DINOHead",
    "DinoVisionTransformer",
    "HeadSpec",
    "build_backbone",
    "apply_activation_checkpointing",
    "build_head",
    "compile_blocks",
    "get_arch",
    "load_backbone",
    "load_backbone_state",
    "read_state_dict",
    "save_backbone",
]
