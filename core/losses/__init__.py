"""Losses: DINO + Sinkhorn-Knopp, iBOT, KoLeo (local and distributed), Gram anchoring. Float32 math."""

from dinodist.core.losses.dino import dino_loss
from dinodist.core.losses.gram import gram_loss, resize_gram_teacher
from dinodist.core.losses.ibot import ibot_loss
from dinodist.core.losses.koleo import koleo_loss, koleo_loss_distributed
from dinodist.core.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "dino_loss",
    "gram_loss",
    "ibot_loss",
    "koleo_loss",
    "koleo_loss_distributed",
    "resize_gram_teacher",
    "sinkhorn_knopp",
]

# Memory-light variants: logits over the prototypes are recomputed per chunk of rows, never held whole.
from dinodist.core.losses.chunked import (  # noqa: E402
    SinkhornScaling,
    dino_loss_chunked,
    ibot_loss_chunked,
    loss_activation_bytes,
    prototype_cross_entropy_chunked,
    sinkhorn_knopp_chunked,
)

__all__ += [
    "SinkhornScaling",
    "dino_loss_chunked",
    "ibot_loss_chunked",
    "loss_activation_bytes",
    "prototype_cross_entropy_chunked",
    "sinkhorn_knopp_chunked",
]
