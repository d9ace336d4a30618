"""Losses: DINO + Sinkhorn-Knopp, iBOT, KoLeo (local and distributed), Gram anchoring. Float32 math.

The chunked variants (`chunked.py`) recompute the logits over the prototypes per chunk of rows and
never hold them whole; `memory.py` is their memory estimate in plain Python (no torch), read by the
planner. Names load on first use (core/lazy.py).
"""

from dinodist.core.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "dino_loss": "dino",
    "gram_loss": "gram",
    "resize_gram_teacher": "gram",
    "ibot_loss": "ibot",
    "koleo_loss": "koleo",
    "koleo_loss_distributed": "koleo",
    "sinkhorn_knopp": "sinkhorn",
    "PRECISIONS": "chunked",
    "SinkhornScaling": "chunked",
    "dino_loss_chunked": "chunked",
    "ibot_loss_chunked": "chunked",
    "prototype_cross_entropy_chunked": "chunked",
    "resolve_precision": "chunked",
    "sinkhorn_knopp_chunked": "chunked",
    "loss_activation_bytes": "memory",
})

__all__ = [
    "PRECISIONS",
    "SinkhornScaling",
    "dino_loss",
    "dino_loss_chunked",
    "gram_loss",
    "ibot_loss",
    "ibot_loss_chunked",
    "koleo_loss",
    "koleo_loss_distributed",
    "loss_activation_bytes",
    "prototype_cross_entropy_chunked",
    "resize_gram_teacher",
    "resolve_precision",
    "sinkhorn_knopp",
    "sinkhorn_knopp_chunked",
]
