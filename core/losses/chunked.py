"""Memory-light prototype losses: Sinkhorn-Knopp and DINO / iBOT cross-entropy streamed over row chunks.

At paper scale a student rank would otherwise hold fp32 logits, log-softmax and gradients over
262,144 DINO / 98,304 iBOT prototypes for every row at once (tens of GiB). Here the prototype
logits `bottleneck @ weight.T` are recomputed per chunk of rows and never exist for all rows, so
the working set is O(chunk_rows x K); the results equal `core.losses.sinkhorn_knopp`, `dino_loss`
and `ibot_loss` on the full logits (float32 math, up to rounding).

Sinkhorn-Knopp in factored form. Every step of the official algorithm multiplies Q by a
per-prototype or a per-row factor, so after any number of steps

    Q[b, k] = exp((l[b, k] - m[k]) / tau) * a[k] * c[b]

and the algorithm only has to find the vectors `a` [K] and `c` [B]: a prototype step sets
a[k] = 1 / (K sum_b exp(..) c[b]) (summed over the group: the all-reduce of the unchunked version),
a row step sets c[b] = 1 / (B_total sum_k exp(..) a[k]) (local). Both sums stream over row chunks.
The initial global normaliser is cancelled by the first prototype step, and the final x B_total
turns the last row step into a plain row normalisation (rows of the result sum to 1). The 1/K and
1/B_total factors cancel too in exact arithmetic, but they keep a and c from growing or shrinking
geometrically (by B_total / K per iteration) over many iterations, so they stay.

Numerical guard: the official version computes exp(l / tau) without a max shift, which overflows
in fp32 once l / tau > 88 (and a prototype whose logits are all below -87 tau gets an all-zero
column, hence inf / NaN). We take m[k], each prototype's maximum over all rows of the group (an
all-reduced MAX), and unless 0 <= m[k] / tau <= 60 compute exp((l - m[k]) / tau) instead. A
per-prototype factor exp(-m[k] / tau) is absorbed exactly by a[k], so the shift changes nothing
mathematically; it keeps exp() <= 1 and gives the prototype one term equal to 1 in its column sum,
so nothing overflows or underflows to an all-zero column. Per prototype rather than one global max,
since a global max would still let a prototype whose logits sit far below the largest one underflow.
Where it is not needed the shift is 0, so exp() sees exactly the argument l / tau of the unshifted
version and rounds the same way (a shifted argument (l - m) / tau is larger for small
probabilities and so carries a larger absolute rounding error).

Matmul precision (`precision`, the student's `LossConfig.loss_precision`). The prototype matmuls are
the losses' FLOPs, and fp32 matmuls on a GPU run at a small fraction of its tensor-core rate:
- "fp32": every matmul in IEEE fp32, as above; what "auto" means on CPU, so CPU results are unchanged.
- "tf32": the same fp32 tensors with TF32 tensor-core matmuls (fp32 accumulation and output; 10-bit
  mantissa inputs). What "auto" means on CUDA: under FSDP's bf16 mixed precision the student's
  bottleneck and prototype weights are bf16 already, so their products are exact in TF32 and only
  the accumulation order differs from fp32; the elementwise log-sum-exp work over [chunk, K] then
  dominates the time, so bf16 logits would gain little for their rounding. On CPU it is fp32.
- "bf16": bf16 matmul inputs and bf16 logits, upcast to fp32 before the log-sum-exp, the softmax and
  every sum; the logits carry bf16 rounding (2^-9 relative), which exp() amplifies by |l| / tau.
  Runs on CPU too (slowly), so it is testable there.
The gradient matmuls of the cross-entropy follow the same mode (bf16: a [K, Db] bf16 temporary per
chunk for the weight gradient, accumulated in fp32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dinodist.core.errors import DinodistError
from dinodist.core.losses.memory import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_LOSS_CHUNK_ROWS,
    check_chunk_rows,
)

# A prototype's logits are shifted by their max m unless 0 <= m / tau <= 60: exp(60) = 1e26 leaves room
# for sums over 1e12 rows below fp32's 3e38, and a column max >= exp(0) keeps >= 87 nats above its
# smallest normal 1e-38 (the shifted case has exactly 87).
_SHIFT_ABOVE = 60.0


PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The matmul mode the chunked losses use on `device` ("fp32", "tf32" or "bf16"; see the module doc).

    "auto" is fp32 everywhere but CUDA, where it is TF32; "tf32" is fp32 off CUDA (no TF32 matmuls there).
    """
    if precision not in PRECISIONS:
        raise DinodistError(f"loss precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "tf32" if cuda else "fp32"
    if precision == "tf32" and not cuda:
        return "fp32"
    return precision


@contextlib.contextmanager
def _tf32_matmuls() -> Iterator[None]:
    # The setting is process-global: set around our own matmuls only and put back, whatever it was.
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@dataclass(frozen=True)
class _Matmul:
    """The prototype matmuls of one resolved precision mode; "fp32" is exactly the plain expressions."""

    mode: str  # "fp32" | "tf32" | "bf16"

    def scope(self) -> contextlib.AbstractContextManager:
        return _tf32_matmuls() if self.mode == "tf32" else contextlib.nullcontext()

    def weight(self, w: Tensor) -> Tensor:
        """The operand the logits multiply with, converted once per pass rather than per chunk."""
        return w.to(torch.bfloat16) if self.mode == "bf16" else w.float()

    def logits(self, x: Tensor, w: Tensor) -> Tensor:
        """fp32 [n, K] = x [n, Db] @ w.T, w from `weight`."""
        if self.mode == "bf16":
            return (x.to(torch.bfloat16) @ w.t()).float()
        return x.float() @ w.t()

    def input_grad(self, g: Tensor, w: Tensor) -> Tensor:
        """g [n, K] @ w [K, Db], w from `weight`."""
        if self.mode == "bf16":
            return g.to(torch.bfloat16) @ w
        return g @ w

    def add_weight_grad(self, dw: Tensor, g: Tensor, x_rows: Tensor) -> None:
        """dw [K, Db] (fp32) += g.T @ x_rows."""
        if self.mode == "bf16":
            dw.add_(g.t().to(torch.bfloat16) @ x_rows.to(torch.bfloat16))
        else:
            dw.addmm_(g.t(), x_rows)


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce(x: Tensor, group, op=None) -> Tensor:
    if _distributed(group):
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


def _chunks(n: int, chunk_rows: int) -> Iterator[slice]:
    for start in range(0, n, chunk_rows):
        yield slice(start, min(start + chunk_rows, n))


def _check_weight(weight: Tensor, dim: int, name: str, owner: str) -> None:
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise DinodistError(
            f"{name} must be [K, {dim}] (dim = the {owner}'s last dim), got shape {tuple(weight.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


@dataclass(frozen=True)
class SinkhornScaling:
    """Teacher probabilities over the local rows, kept as factors instead of a [B, K] matrix.

    e[b, k] = exp((bottleneck[b] . weight[k] - shift[k]) / temperature) * col[k], and
    probs[b] = e[b] / sum_k e[b, k]: the last row step of Sinkhorn-Knopp is done here, from the same
    e that is returned, so rows sum to 1 up to one rounding whatever chunking produced them (with no
    iterations there is no row step and probs[b] = e[b] * total instead).
    """

    bottleneck: Tensor  # [B, Db], the rows of this rank
    weight: Tensor  # [K, Db] float32
    temperature: float
    shift: Tensor  # [K] per-prototype max over the group's rows, 0 where no shift is needed
    col: Tensor  # [K]
    total: Tensor | None  # B_total when n_iterations == 0, else None (rows are normalised)
    precision: str = "fp32"  # resolved matmul mode (`resolve_precision`) of `probs`

    @property
    def rows(self) -> int:
        return self.bottleneck.shape[0]

    @property
    def n_prototypes(self) -> int:
        return self.weight.shape[0]

    def probs(self, rows: slice | Tensor = slice(None)) -> Tensor:
        """Float32 probabilities [n, K] of the selected rows (a slice or an index tensor)."""
        # In place: one [n, K] allocation per call.
        mm = _Matmul(self.precision)
        with mm.scope():
            q = _shifted_exp(mm, self.bottleneck[rows], mm.weight(self.weight), self.shift, self.temperature)
        q.mul_(self.col)
        if self.total is None:
            return q.div_(q.sum(-1, keepdim=True))
        return q.mul_(self.total)


def _shift(m: Tensor, temperature: float) -> Tensor:
    """The per-prototype shift for column maxima m: m outside the window, 0 inside or where m is -inf."""
    top = m / temperature
    return torch.where(torch.isfinite(m) & ((top < 0) | (top > _SHIFT_ABOVE)), m, torch.zeros_like(m))


def _shifted_exp(mm: _Matmul, x: Tensor, weight: Tensor, shift: Tensor, temperature: float) -> Tensor:
    return mm.logits(x, weight).sub_(shift).div_(temperature).exp_()


@torch.no_grad()
def sinkhorn_knopp_chunked(
    bottleneck: Tensor,
    weight: Tensor,
    temperature: float,
    n_iterations: int = 3,
    group=None,
    n_samples: int | Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    precision: str = "auto",
) -> SinkhornScaling:
    """`sinkhorn_knopp(bottleneck @ weight.T, ...)` as factors, streaming over chunks of rows.

    Same arguments and semantics as `core.losses.sinkhorn_knopp` (prototype sums all-reduced over
    `group`, the world when None and torch.distributed is up; row sums local), but the logits are
    recomputed per chunk of `chunk_rows` rows: max(n_iterations, 1) passes of a [chunk, Db] x [Db, K]
    matmul here, and one more per row when its probabilities are materialised. Every rank of the
    group must call it (collectives: the row count unless n_samples is given, one MAX and
    max(n_iterations, 1) SUMs of a [K] vector). `precision`: the matmuls' mode (module doc).
    """
    if bottleneck.dim() != 2:
        raise DinodistError(f"sinkhorn bottleneck must be [rows, dim], got shape {tuple(bottleneck.shape)}")
    _check_weight(weight, bottleneck.shape[1], "sinkhorn weight", "bottleneck")
    check_chunk_rows(chunk_rows)
    if n_iterations < 0:
        raise DinodistError(f"sinkhorn n_iterations must be >= 0, got {n_iterations}")
    if not temperature > 0:
        raise DinodistError(f"sinkhorn temperature must be > 0, got {temperature}")
    x = bottleneck.detach()
    w = weight.detach().float()
    n, k = x.shape[0], w.shape[0]
    dev = w.device
    mm = _Matmul(resolve_precision(precision, dev))
    w_mm = mm.weight(w)

    # Pass 0: per-prototype max and sum of exp((l - shift) / tau) in one pass, with the shift rule applied
    # to the running max and the running sum rescaled when a later chunk changes it (as online softmax
    # does). In the common case the shift stays 0 throughout and no rescaling rounds anything.
    m = torch.full((k,), float("-inf"), device=dev)
    ref = torch.zeros(k, device=dev)
    s = torch.zeros(k, device=dev)
    for rows in _chunks(n, chunk_rows):
        with mm.scope():
            logits = mm.logits(x[rows], w_mm)
        m = torch.maximum(m, logits.amax(0))
        new_ref = _shift(m, temperature)
        s.mul_(torch.exp((ref - new_ref) / temperature))
        s.add_(logits.sub_(new_ref).div_(temperature).exp_().sum(0))
        ref = new_ref
        del logits  # before the next chunk's logits exist, not after
    shift = _shift(_all_reduce(m.clone(), group, dist.ReduceOp.MAX), temperature)
    # A rank without rows has s = 0 (and m = -inf): its factor may overflow, its sum must stay 0.
    s = torch.where(torch.isfinite(m), s * torch.exp((ref - shift) / temperature), torch.zeros_like(s))
    s = _all_reduce(s, group)

    # Filled on the device, not copied from the host: a blocking host-to-device copy waits for the stream.
    if n_samples is None:
        total = _all_reduce(torch.full((), float(n), device=dev), group)
    elif torch.is_tensor(n_samples):
        total = n_samples.to(device=dev, dtype=torch.float32)
    else:
        total = torch.full((), float(n_samples), device=dev)
    if n_iterations == 0:
        # Only the initial global normalisation: Q = exp(l / tau) * B_total / sum(exp(l / tau)).
        top = shift.max() if k else shift.new_zeros(())
        col = torch.exp((shift - top) / temperature)
        col /= (col * s).sum()
        return SinkhornScaling(x, w, temperature, shift, col, total, mm.mode)

    # Iterations 1 .. n-1 stream the row step into the next prototype step; the last row step, a plain
    # row normalisation, is left to SinkhornScaling.probs.
    col = 1.0 / (k * s)
    for _ in range(n_iterations - 1):
        next_s = torch.zeros(k, device=dev)
        for rows in _chunks(n, chunk_rows):
            with mm.scope():
                e = _shifted_exp(mm, x[rows], w_mm, shift, temperature)
            # mv then add: addmv_ accumulating into next_s rounds ~4x worse (measured).
            next_s += e.t() @ (1.0 / (total * (e @ col)))
            del e
        col = 1.0 / (k * _all_reduce(next_s, group))
    return SinkhornScaling(x, w, temperature, shift, col, None, mm.mode)


# ---------------------------------------------------------------------------------------------
# Cross-entropy between teacher probabilities and student prototype logits


class _DenseTeacher:
    """Already materialised teacher probabilities, behind the same `probs(rows)` as SinkhornScaling."""

    def __init__(self, probs: Tensor) -> None:
        self._probs = probs.detach().reshape(-1, probs.shape[-1])

    @property
    def rows(self) -> int:
        return self._probs.shape[0]

    @property
    def n_prototypes(self) -> int:
        return self._probs.shape[1]

    def probs(self, rows: slice | Tensor = slice(None)) -> Tensor:
        return self._probs[rows].float()


Teacher = SinkhornScaling | Tensor


@dataclass(frozen=True)
class _Plan:
    teacher: SinkhornScaling | _DenseTeacher
    pair_weights: list[list[float]]  # [S][T]
    row_weights: Tensor | None  # [B]
    student_temp: float
    chunk_rows: int
    matmul: _Matmul = _Matmul("fp32")


def _chunk_targets(plan: _Plan, rows: slice, b: int) -> list[Tensor | None]:
    """Per student crop s, the target sum_t pair_weights[s][t] * probs(teacher crop t, rows).

    Teacher probabilities are computed once per chunk and shared by every student crop; crops with the
    same weight pattern (all local crops) share one mixed target.
    """
    teacher_rows: dict[int, Tensor] = {}

    def crop(t: int) -> Tensor:
        if t not in teacher_rows:
            teacher_rows[t] = plan.teacher.probs(slice(t * b + rows.start, t * b + rows.stop))
        return teacher_rows[t]

    mixed: dict[tuple[float, ...], Tensor | None] = {}
    out = []
    for pattern in map(tuple, plan.pair_weights):
        if pattern not in mixed:
            terms = [(t, wt) for t, wt in enumerate(pattern) if wt != 0.0]
            if not terms:
                target = None
            elif len(terms) == 1 and terms[0][1] == 1.0:
                target = crop(terms[0][0])
            else:
                target = crop(terms[0][0]) * terms[0][1]
                for t, wt in terms[1:]:
                    target.add_(crop(t), alpha=wt)
            mixed[pattern] = target
        out.append(mixed[pattern])
    return out


def _log_probs(mm: _Matmul, x_rows: Tensor, weight: Tensor, temp: float) -> Tensor:
    z = mm.logits(x_rows, weight).div_(temp)
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


class _ChunkedPrototypeCE(torch.autograd.Function):
    """Forward and backward both stream over row chunks; only the inputs are saved.

    This is activation checkpointing done by hand: the backward recomputes each chunk's student
    logits (and teacher probabilities) instead of storing them. Written as one Function rather than
    torch.utils.checkpoint per chunk so that a chunk's teacher probabilities are computed once for all
    student crops, in the forward and again in the backward, instead of once per (crop, teacher crop)
    pair each time: with 2 global + 8 local crops that is 2 teacher matmuls per chunk instead of 18.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, plan: _Plan) -> Tensor:
        w = plan.matmul.weight(weight)
        total = torch.zeros((), device=x.device)
        with plan.matmul.scope():
            for rows in _chunks(x.shape[1], plan.chunk_rows):
                total -= _forward_chunk(x, w, plan, rows)
        ctx.save_for_backward(x, weight)
        ctx.plan = plan
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        plan: _Plan = ctx.plan
        w = plan.matmul.weight(weight)
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        scale = grad.float() / plan.student_temp
        with torch.no_grad(), plan.matmul.scope():
            for rows in _chunks(x.shape[1], plan.chunk_rows):
                _backward_chunk(x, w, plan, rows, scale, dx, dw)
        return dx, (dw.to(weight.dtype) if dw is not None else None), None


# One chunk per call, so that the chunk's tensors are freed on return, before the next chunk allocates.


def _forward_chunk(x: Tensor, w: Tensor, plan: _Plan, rows: slice) -> Tensor:
    """sum over the chunk's rows and student crops of row_weight * sum_k target_k log_softmax_k."""
    total = torch.zeros((), device=x.device)
    for s, target in enumerate(_chunk_targets(plan, rows, x.shape[1])):
        if target is None:
            continue
        log_p = _log_probs(plan.matmul, x[s, rows], w, plan.student_temp)
        # Row-wise dot products as a batched matmul: no [rows, K] product temporary.
        ce = torch.bmm(target.unsqueeze(1), log_p.unsqueeze(2)).view(-1)
        del log_p
        if plan.row_weights is not None:
            ce = ce * plan.row_weights[rows]
        total += ce.sum()
    return total


def _backward_chunk(x: Tensor, w: Tensor, plan: _Plan, rows: slice, scale: Tensor,
                    dx: Tensor | None, dw: Tensor | None) -> None:
    if plan.row_weights is not None:
        scale = scale * plan.row_weights[rows].unsqueeze(1)
    for s, target in enumerate(_chunk_targets(plan, rows, x.shape[1])):
        if target is None:
            continue
        x_rows = x[s, rows].float()
        # d/dz of -sum_k q_k log_softmax(z)_k is softmax(z) * sum_k q_k - q, with z = logits / tau.
        g = _log_probs(plan.matmul, x_rows, w, plan.student_temp).exp_()
        g.mul_(target.sum(-1, keepdim=True)).sub_(target).mul_(scale)
        if dx is not None:
            dx[s, rows] = plan.matmul.input_grad(g, w).to(dx.dtype)
        if dw is not None:
            plan.matmul.add_weight_grad(dw, g, x_rows)
        del g


def prototype_cross_entropy_chunked(
    student_bottleneck: Tensor,
    student_weight: Tensor,
    teacher: Teacher,
    pair_weights: Tensor,
    row_weights: Tensor | None = None,
    student_temp: float = 0.1,
    chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS,
    precision: str = "auto",
) -> Tensor:
    """Weighted cross-entropy sum_{s,t,b} pair_weights[s,t] row_weights[b] CE(teacher (t,b), student (s,b)).

    CE(q, z) = -sum_k q_k log_softmax(z / student_temp)_k with student logits
    z = student_bottleneck[s, b] @ student_weight.T. `student_bottleneck` [S, B, Db] is crop-major,
    `teacher` holds T * B rows in the same crop-major order (a SinkhornScaling, or probabilities
    [T * B, K] / [T, B, K]). Differentiable w.r.t. the student bottleneck and weight; forward and
    backward keep O(chunk_rows x K) floats alive (chunks run over the B samples). `precision`: the
    matmuls' mode (module doc), resolved on the student bottleneck's device.
    """
    if student_bottleneck.dim() != 3:
        raise DinodistError(
            f"student_bottleneck must be [crops, rows, dim], got shape {tuple(student_bottleneck.shape)}"
        )
    s_crops, b, dim = student_bottleneck.shape
    _check_weight(student_weight, dim, "student_weight", "student_bottleneck")
    check_chunk_rows(chunk_rows)
    source = teacher if isinstance(teacher, SinkhornScaling) else _DenseTeacher(teacher)
    if source.n_prototypes != student_weight.shape[0]:
        raise DinodistError(
            f"teacher has {source.n_prototypes} prototypes but student_weight has {student_weight.shape[0]}"
        )
    if pair_weights.dim() != 2 or pair_weights.shape[0] != s_crops:
        raise DinodistError(
            f"pair_weights must be [{s_crops}, teacher crops], got shape {tuple(pair_weights.shape)}"
        )
    t_crops = pair_weights.shape[1]
    if source.rows != t_crops * b:
        raise DinodistError(
            f"teacher has {source.rows} rows, expected {t_crops} crops x {b} rows (crop-major)"
        )
    if row_weights is not None:
        if row_weights.shape != (b,):
            raise DinodistError(f"row_weights must be [{b}], got shape {tuple(row_weights.shape)}")
        row_weights = row_weights.detach().float()
    # pair_weights is host data (the callers build it on the CPU): reading it is no device sync
    pairs = pair_weights.detach().double().tolist()
    mm = _Matmul(resolve_precision(precision, student_bottleneck.device))
    plan = _Plan(source, pairs, row_weights, float(student_temp), int(chunk_rows), mm)
    return _ChunkedPrototypeCE.apply(student_bottleneck, student_weight, plan)


def dino_loss_chunked(
    student_bottleneck: Tensor,
    student_weight: Tensor,
    teacher: Teacher,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
    chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS,
    precision: str = "auto",
) -> Tensor:
    """`dino_loss(student_bottleneck @ student_weight.T, teacher probs, ...)` without the [S, B, K] logits.

    `student_bottleneck` [S, B, Db] (crop-major, as the logits of dino_loss), `teacher` T * B rows
    (SinkhornScaling of the teacher crops, or probabilities [T, B, K]).
    """
    if student_bottleneck.dim() != 3:
        raise DinodistError(
            f"student_bottleneck must be [crops, rows, dim], got shape {tuple(student_bottleneck.shape)}"
        )
    s_crops, b, _ = student_bottleneck.shape
    source = teacher if isinstance(teacher, SinkhornScaling) else _DenseTeacher(teacher)
    t_rows = source.rows
    if b == 0 or t_rows % b:
        raise DinodistError(f"teacher has {t_rows} rows, not a whole number of crops of {b} rows")
    t_crops = t_rows // b
    pairs = torch.ones(s_crops, t_crops)
    if ignore_diagonal:
        pairs -= torch.eye(s_crops, t_crops)
        n_pairs = s_crops * t_crops - min(s_crops, t_crops)
    else:
        n_pairs = s_crops * t_crops
    ce = prototype_cross_entropy_chunked(
        student_bottleneck, student_weight, teacher, pairs, None, student_temp, chunk_rows, precision
    )
    return ce / (b * n_pairs)


def ibot_loss_chunked(
    student_bottleneck: Tensor,
    student_weight: Tensor,
    teacher: Teacher,
    masks: Tensor,
    student_temp: float = 0.1,
    masks_weight: Tensor | None = None,
    chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS,
    precision: str = "auto",
) -> Tensor:
    """`ibot_loss(student_bottleneck @ student_weight.T, teacher probs, masks, ...)` chunk by chunk.

    `student_bottleneck` [M, Db] and `teacher` (M rows) hold the masked patches in
    `masks.flatten().nonzero()` order; `masks` [N, P] bool; `masks_weight` [M] defaults to
    1 / #masked of the patch's crop (computing that default selects by the masks, a device sync on a
    GPU, which the students avoid by passing the loader's weights).
    """
    if student_bottleneck.dim() != 2:
        raise DinodistError(
            f"ibot student_bottleneck must be [masked, dim], got shape {tuple(student_bottleneck.shape)}"
        )
    if masks.dim() != 2:
        raise DinodistError(f"ibot masks must be [crops, patches], got shape {tuple(masks.shape)}")
    m = student_bottleneck.shape[0]
    # Given weights are checked by shape only: counting the masks would read them, a device sync on a
    # GPU. The default weights select the masked patches anyway, so their count comes for free.
    if masks_weight is None:
        per_crop = masks.sum(-1, keepdim=True).clamp(min=1).float()
        masks_weight = (1.0 / per_crop).expand_as(masks)[masks]
        if masks_weight.shape[0] != m:
            raise DinodistError(f"ibot masks select {masks_weight.shape[0]} patches, student_bottleneck has "
                                f"{m} rows")
    elif masks_weight.shape != (m,):
        raise DinodistError(f"ibot masks_weight must be [{m}] (one per masked patch), got shape "
                            f"{tuple(masks_weight.shape)}")
    ce = prototype_cross_entropy_chunked(
        student_bottleneck.unsqueeze(0), student_weight, teacher, torch.ones(1, 1), masks_weight,
        student_temp, chunk_rows, precision,
    )
    return ce / masks.shape[0]
