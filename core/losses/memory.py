"""Memory of the chunked prototype losses (core/losses/chunked.py), as plain arithmetic.

The planner sizes every rank's memory with `loss_activation_bytes` without loading torch, and the
topology's `train.loss_chunk_rows` default is `DEFAULT_CHUNK_ROWS`: both live here, once.
"""

from __future__ import annotations

from dinodist.core.errors import DinodistError

# Rows per chunk. Sinkhorn-Knopp holds ~2 x chunk x K floats, the cross-entropies ~4 x chunk x K (DINO:
# chunks of the images, each with its teacher crops and one student crop), so the losses default to a
# smaller chunk: 256 x 262,144 prototypes x 4 x 4 bytes = 1 GiB.
DEFAULT_CHUNK_ROWS = 4096
DEFAULT_LOSS_CHUNK_ROWS = 256
FP32_BYTES = 4
# K-wide fp32 tensors alive at once per chunk row (see `loss_activation_bytes`). DINO global crops: the
# two teacher crops' probabilities, the student log-probabilities and logsumexp's temporary (the
# gradient of the backward reuses the log-probabilities' memory); local crops: the mixed target of both
# teacher crops replaces them (3 while it is formed). iBOT: one teacher row instead of two.
# Sinkhorn-Knopp: the chunk's logits / exp plus a reduction temporary (2 per row of at most 2x the rows).
_DINO_WIDE_PER_ROW = 2 + 2
_IBOT_WIDE_PER_ROW = 1 + 2


def check_chunk_rows(chunk_rows: int) -> None:
    if int(chunk_rows) < 1:
        raise DinodistError(f"chunk_rows must be >= 1, got {chunk_rows}")


def loss_activation_bytes(rows_dino: int, rows_ibot: int, k_dino: int, k_ibot: int,
                          chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS) -> int:
    """Upper estimate of the peak bytes the chunked DINO + iBOT losses allocate on one rank.

    `rows_dino`: the DINO batch per crop (images on the rank; the teacher has 2x, the student
    (2 + n_local)x rows), over which the DINO chunks run; passing all DINO rows instead only
    over-estimates. `rows_ibot`: masked patches on the rank.

    The terms run one after another (teacher Sinkhorn-Knopp, DINO global, DINO local, iBOT, and the
    same in the backward), so the peak is the largest phase, not their sum. Per chunk row a phase holds
    K-wide fp32 tensors: DINO 4 (2 teacher crops' probabilities, the student log-probabilities and
    logsumexp's temporary; local crops hold one mixed target instead of the two crops), iBOT 3,
    Sinkhorn-Knopp 2 over at most twice the rows, so never more than DINO. Added on top: the [K]
    factor vectors and per-row factors / weights. Not included: the prototype weights, their gradient,
    the student bottleneck and its gradient, which are parameter- / activation-sized and counted
    elsewhere by the cost model (with bf16 prototype weights the losses add an fp32 copy and an fp32
    gradient of each, K x Db). The "bf16" matmul precision stays within the same count (its bf16 logits
    or gradient copy, half a row, exist while the phase holds fewer than its peak rows) but adds a
    [K, Db] bf16 product per chunk to the weight gradient.
    """
    check_chunk_rows(chunk_rows)
    dino = min(chunk_rows, rows_dino) * k_dino * _DINO_WIDE_PER_ROW
    ibot = min(chunk_rows, rows_ibot) * k_ibot * _IBOT_WIDE_PER_ROW
    vectors = 4 * (k_dino + k_ibot) + 4 * (rows_dino + rows_ibot)
    return FP32_BYTES * (max(dino, ibot) + vectors)
