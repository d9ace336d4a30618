"""Chunked Sinkhorn-Knopp and prototype cross-entropies equal the unchunked losses, in values and
gradients, on one process and on 2 gloo ranks, while no tensor larger than chunk x K is ever created."""

import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo import run_gloo
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dinodist.core.errors import DinodistError
from dinodist.core.losses import (
    SinkhornScaling,
    dino_loss,
    dino_loss_chunked,
    ibot_loss,
    ibot_loss_chunked,
    loss_activation_bytes,
    prototype_cross_entropy_chunked,
    resolve_precision,
    sinkhorn_knopp,
    sinkhorn_knopp_chunked,
)

# Loss values: fp32 sums in two orders, a few ulps apart.
TOL = {"rtol": 2e-6, "atol": 1e-7}
EPS = torch.finfo(torch.float32).eps


def _condition(logits, tau, col_max=None):
    """How much exp() amplifies rounding, per entry: the relative error of exp(u) is eps * |u| for the
    argument u = l / tau (the unshifted version) or (l - max) / tau (a shifted prototype), and the
    last-bit differences of l between a chunk's matmul and the whole batch's are scaled by |l| / tau."""
    col_max = logits.amax(0) if col_max is None else col_max
    return 1 + (logits / tau).abs() + ((logits - col_max) / tau).abs()


def _assert_probs_close(got, ref, cond):
    """Elementwise relative error within 8 roundings amplified by exp() (see _condition): the unchunked
    implementation carries the same error, so no tighter elementwise bound can hold."""
    if got.numel() == 0:
        return
    ratio = ((got - ref).abs() / ref) / (8 * EPS * cond)
    assert float(ratio.max()) <= 1.0, f"relative error {float(ratio.max()):.3g} x the allowed rounding"


def _assert_grad_close(got, ref, rel=1e-5):
    """Gradients: within rel of the largest entry (tiny entries carry the absolute error of the large)."""
    err, top = float((got - ref).abs().max()), float(ref.abs().max())
    assert err <= rel * top, f"gradient error {err:.3g} vs largest entry {top:.3g}"


def _heads(gen, rows, dim, k, weight_std=0.1):
    """L2-normalised bottleneck rows (as the heads produce) and a prototype layer of the given scale."""
    x = F.normalize(torch.randn(rows, dim, generator=gen), dim=-1)
    w = torch.randn(k, dim, generator=gen) * weight_std
    return x, w


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_sinkhorn_chunked_equals_unchunked(chunk, iters):
    gen = torch.Generator().manual_seed(0)
    x, w = _heads(gen, 50, 24, 70)
    logits = x @ w.t()
    ref = sinkhorn_knopp(logits, 0.04, n_iterations=iters)
    scaling = sinkhorn_knopp_chunked(x, w, 0.04, n_iterations=iters, chunk_rows=chunk)
    assert isinstance(scaling, SinkhornScaling)
    _assert_probs_close(scaling.probs(), ref, _condition(logits, 0.04))
    # Chunks materialised on demand are rows of the same matrix, by slice or by index.
    _assert_probs_close(scaling.probs(slice(9, 23)), ref[9:23], _condition(logits, 0.04)[9:23])
    idx = torch.tensor([49, 0, 17, 17])
    _assert_probs_close(scaling.probs(idx), ref[idx], _condition(logits, 0.04)[idx])
    # B_total scales an iteration-free result; with iterations it cancels, in both implementations.
    ref_n = sinkhorn_knopp(logits, 0.04, n_iterations=iters, n_samples=80)
    got_n = sinkhorn_knopp_chunked(x, w, 0.04, n_iterations=iters, n_samples=80, chunk_rows=chunk).probs()
    _assert_probs_close(got_n, ref_n, _condition(logits, 0.04))


def _sinkhorn_float64(logits, tau, iters=3):
    """The official algorithm, in float64: the reference both fp32 implementations are measured against."""
    q = torch.exp(logits.double() / tau).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).t()


def test_sinkhorn_chunked_within_1e6_and_as_accurate_at_head_statistics():
    # Initialised heads: unit bottleneck, prototypes trunc-normal(0.02) with the paper's bottleneck dim.
    gen = torch.Generator().manual_seed(12)
    x, w = _heads(gen, 300, 256, 1024, weight_std=0.02)
    logits = x @ w.t()
    ref = sinkhorn_knopp(logits, 0.04)
    got = sinkhorn_knopp_chunked(x, w, 0.04, chunk_rows=64).probs()
    assert float(((got - ref).abs() / ref).max()) <= 1e-6
    exact = _sinkhorn_float64(logits, 0.04)
    err_chunked = float(((got.double() - exact).abs() / exact).max())
    err_unchunked = float(((ref.double() - exact).abs() / exact).max())
    assert err_chunked <= 1.25 * err_unchunked


def test_sinkhorn_chunked_marginals():
    gen = torch.Generator().manual_seed(1)
    x, w = _heads(gen, 40, 16, 8, weight_std=1.0)
    converged = sinkhorn_knopp_chunked(x, w, 1.0, n_iterations=300, chunk_rows=6).probs()
    torch.testing.assert_close(converged.sum(1), torch.ones(40), rtol=0, atol=1e-6)
    # Converged: each prototype gets B/K of the mass.
    torch.testing.assert_close(converged.sum(0), torch.full((8,), 40 / 8), rtol=1e-4, atol=1e-4)
    # After 3 iterations: rows exact, columns as (im)balanced as the unchunked result's.
    q = sinkhorn_knopp_chunked(x, w, 1.0, chunk_rows=6).probs()
    ref = sinkhorn_knopp(x @ w.t(), 1.0)
    torch.testing.assert_close(q.sum(1), torch.ones(40), rtol=0, atol=1e-6)
    torch.testing.assert_close(q.sum(0), ref.sum(0), rtol=1e-6, atol=1e-6)
    assert (q.sum(0) - 5).abs().max() > 1e-3  # not yet equipartitioned: the check above is not vacuous


def test_sinkhorn_chunked_survives_logits_that_overflow_the_unchunked_one():
    gen = torch.Generator().manual_seed(2)
    x, w = _heads(gen, 30, 16, 12, weight_std=2.0)
    logits = x @ w.t()
    assert (logits / 0.04).max() > 88  # exp overflows in fp32
    assert not torch.isfinite(sinkhorn_knopp(logits, 0.04)).all()
    got = sinkhorn_knopp_chunked(x, w, 0.04, chunk_rows=4).probs()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(1), torch.ones(30), rtol=0, atol=1e-6)
    # A per-prototype shift of the logits is exactly cancelled by Sinkhorn-Knopp: the shifted problem
    # is safe for the unchunked implementation and is the reference.
    shifted = logits - logits.amax(0)
    ref = sinkhorn_knopp(shifted, 0.04)
    # Where exp() lands in fp32's subnormal range (e^-87) both versions lose digits: compare above it.
    visible = shifted / 0.04 > -80
    _assert_probs_close(got[visible], ref[visible], _condition(logits, 0.04)[visible])
    assert float((got - ref).abs().max()) < 1e-6


def test_sinkhorn_chunked_bf16_inputs_use_fp32_math():
    gen = torch.Generator().manual_seed(3)
    x, w = _heads(gen, 20, 16, 30)
    xb, wb = x.bfloat16(), w.bfloat16()
    ref = sinkhorn_knopp(xb.float() @ wb.float().t(), 0.07)
    got = sinkhorn_knopp_chunked(xb, wb, 0.07, chunk_rows=7).probs()
    assert got.dtype == torch.float32
    _assert_probs_close(got, ref, _condition(xb.float() @ wb.float().t(), 0.07))


# ---------------------------------------------------------------------------------------------
# DINO / iBOT cross-entropies


def _dino_case(seed, b=10, n_local=3, dim=12, k=96):
    gen = torch.Generator().manual_seed(seed)
    t_x, t_w = _heads(gen, 2 * b, dim, k)
    s_x, s_w = _heads(gen, (2 + n_local) * b, dim, k)
    return t_x, t_w, s_x.view(2 + n_local, b, dim), s_w


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("chunk", [1, 3, 10, 64])
def test_dino_loss_chunked_equals_unchunked(chunk):
    t_x, t_w, s_x, s_w = _dino_case(4)
    b, k = s_x.shape[1], s_w.shape[0]
    teacher = sinkhorn_knopp(t_x @ t_w.t(), 0.04).view(2, b, k)
    scaling = sinkhorn_knopp_chunked(t_x, t_w, 0.04, chunk_rows=chunk)
    for crops, diag in ((slice(0, 2), True), (slice(2, None), False)):
        x = s_x[crops].clone().requires_grad_()
        w = s_w.clone().requires_grad_()
        ref = dino_loss(x @ w.t(), teacher, 0.1, ignore_diagonal=diag)
        ref_gx, ref_gw = _grads(ref, x, w)
        for source in (scaling, teacher):  # factored teacher, or probabilities already materialised
            got = dino_loss_chunked(x, w, source, 0.1, ignore_diagonal=diag, chunk_rows=chunk)
            torch.testing.assert_close(got, ref, **TOL)
            gx, gw = _grads(got, x, w)
            _assert_grad_close(gx, ref_gx)
            _assert_grad_close(gw, ref_gw)


def _masks(gen, n, p, counts):
    masks = torch.zeros(n, p, dtype=torch.bool)
    for i, c in enumerate(counts):
        masks[i, torch.randperm(p, generator=gen)[:c]] = True
    return masks


@pytest.mark.parametrize("chunk", [1, 4, 17, 100])
def test_ibot_loss_chunked_equals_unchunked(chunk):
    gen = torch.Generator().manual_seed(5)
    masks = _masks(gen, 4, 9, [3, 0, 9, 5])  # one crop without masked patches still counts in N
    m = int(masks.sum())
    t_x, t_w = _heads(gen, m, 12, 80)
    s_x, s_w = _heads(gen, m, 12, 80)
    teacher = sinkhorn_knopp(t_x @ t_w.t(), 0.07)
    scaling = sinkhorn_knopp_chunked(t_x, t_w, 0.07, chunk_rows=chunk)
    custom = torch.rand(m, generator=gen)
    for weights in (None, custom):
        x, w = s_x.clone().requires_grad_(), s_w.clone().requires_grad_()
        ref = ibot_loss(x @ w.t(), teacher, masks, 0.1, masks_weight=weights)
        ref_gx, ref_gw = _grads(ref, x, w)
        got = ibot_loss_chunked(x, w, scaling, masks, 0.1, masks_weight=weights, chunk_rows=chunk)
        torch.testing.assert_close(got, ref, **TOL)
        gx, gw = _grads(got, x, w)
        _assert_grad_close(gx, ref_gx)
        _assert_grad_close(gw, ref_gw)


def test_general_pair_and_row_weights_match_the_formula():
    gen = torch.Generator().manual_seed(6)
    s, t, b, dim, k = 3, 2, 7, 10, 40
    t_x, t_w = _heads(gen, t * b, dim, k)
    s_x, s_w = _heads(gen, s * b, dim, k)
    pairs = torch.rand(s, t, generator=gen)
    pairs[1, 0] = 0.0
    rows = torch.rand(b, generator=gen)
    x, w = s_x.view(s, b, dim).clone().requires_grad_(), s_w.clone().requires_grad_()
    q = sinkhorn_knopp(t_x @ t_w.t(), 0.05).view(t, b, k)
    log_p = F.log_softmax((x @ w.t()) / 0.2, dim=-1)
    ref = -torch.einsum("st,b,sbk,tbk->", pairs, rows, log_p, q)
    teacher = sinkhorn_knopp_chunked(t_x, t_w, 0.05, chunk_rows=5)
    got = prototype_cross_entropy_chunked(x, w, teacher, pairs, rows, student_temp=0.2, chunk_rows=3)
    torch.testing.assert_close(got, ref, **TOL)
    for g, r in zip(_grads(got, x, w), _grads(ref, x, w)):
        _assert_grad_close(g, r)


def test_gradients_follow_input_dtypes_and_requires_grad():
    t_x, t_w, s_x, s_w = _dino_case(7, n_local=0)
    scaling = sinkhorn_knopp_chunked(t_x, t_w, 0.04)
    x = s_x.bfloat16().requires_grad_()
    w = s_w.bfloat16().requires_grad_()
    ref = dino_loss(x.float() @ w.float().t(), scaling.probs().view(2, -1, w.shape[0]), ignore_diagonal=True)
    got = dino_loss_chunked(x, w, scaling, ignore_diagonal=True, chunk_rows=4)
    torch.testing.assert_close(got, ref, **TOL)
    got.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # Frozen prototype layer: only the bottleneck gets a gradient.
    x32, w32 = s_x.clone().requires_grad_(), s_w.clone()
    dino_loss_chunked(x32, w32, scaling, chunk_rows=4).backward()
    assert x32.grad is not None and w32.grad is None


# ---------------------------------------------------------------------------------------------
# Matmul precision: fp32 on CPU whatever is asked but bf16, TF32 by default on CUDA


def test_precision_is_chosen_by_device_type():
    cuda, cpu = torch.device("cuda", 3), torch.device("cpu")  # a device object needs no GPU
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", "meta") == "fp32"
    assert resolve_precision("auto", cuda) == "tf32" and resolve_precision("auto", "cuda") == "tf32"
    assert resolve_precision("tf32", cpu) == "fp32"  # no TF32 matmuls off CUDA
    assert resolve_precision("fp32", cuda) == "fp32"
    assert resolve_precision("bf16", cpu) == resolve_precision("bf16", cuda) == "bf16"
    with pytest.raises(DinodistError, match="loss precision must be one of auto, fp32, tf32, bf16"):
        resolve_precision("fp16", cpu)
    from dinodist.students.loss import LossConfig

    with pytest.raises(DinodistError, match="loss precision"):
        LossConfig(teacher_temp=0.07, student_temp=0.1, ibot_weight=1.0, koleo_weight=0.1, loss_chunk_rows=8,
                   loss_precision="half")


def _all_outputs(precision: str) -> list[torch.Tensor]:
    """SK probabilities, DINO global/local and iBOT losses and all their gradients, in one precision."""
    t_x, t_w, s_x, s_w = _dino_case(12, n_local=2)
    scaling = sinkhorn_knopp_chunked(t_x, t_w, 0.04, chunk_rows=3, precision=precision)
    outs = [scaling.probs()]
    for crops, diag in ((slice(0, 2), True), (slice(2, None), False)):
        x, w = s_x[crops].clone().requires_grad_(), s_w.clone().requires_grad_()
        loss = dino_loss_chunked(x, w, scaling, 0.1, ignore_diagonal=diag, chunk_rows=3, precision=precision)
        outs += [loss, *_grads(loss, x, w)]
    gen = torch.Generator().manual_seed(3)
    masks = _masks(gen, 4, 9, [3, 0, 9, 5])
    m = int(masks.sum())
    ti_x, ti_w = _heads(gen, m, 12, 40)
    x, w = (t.clone().requires_grad_() for t in _heads(gen, m, 12, 40))
    teacher = sinkhorn_knopp_chunked(ti_x, ti_w, 0.07, chunk_rows=4, precision=precision)
    loss = ibot_loss_chunked(x, w, teacher, masks, 0.1, chunk_rows=5, precision=precision)
    return outs + [teacher.probs(), loss, *_grads(loss, x, w)]


def test_cpu_results_are_fp32_bit_for_bit_unless_bf16_is_asked():
    fp32 = _all_outputs("fp32")
    for precision in ("auto", "tf32"):
        for got, want in zip(_all_outputs(precision), fp32):
            assert torch.equal(got, want), precision
    # and fp32 is the plain formula: the chunked path's matmul is x.float() @ w.T, nothing else
    t_x, t_w = _heads(torch.Generator().manual_seed(1), 9, 8, 30)
    assert torch.equal(sinkhorn_knopp_chunked(t_x, t_w, 0.04, chunk_rows=100).probs(),
                       sinkhorn_knopp_chunked(t_x, t_w, 0.04, chunk_rows=100, precision="fp32").probs())


def test_bf16_logits_round_the_matmul_and_nothing_else():
    fp32, bf16 = _all_outputs("fp32"), _all_outputs("bf16")
    assert not any(torch.equal(a, b) for a, b in zip(fp32, bf16))  # the bf16 path really ran
    for got, want in zip(bf16, fp32):
        assert got.dtype == want.dtype == torch.float32  # log-sum-exp, softmax and sums stay fp32
        # logits within 2^-9 relative; exp() at tau 0.04 and 0.1 turns that into < 1 % here
        err = float((got - want).abs().max().detach()) / max(float(want.abs().max().detach()), 1e-12)
        assert err < 2e-2, err


def test_tf32_scope_sets_the_matmul_setting_only_inside():
    from dinodist.core.losses.chunked import _Matmul

    before = torch.get_float32_matmul_precision()
    with _Matmul("tf32").scope():
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with _Matmul("fp32").scope(), _Matmul("bf16").scope():
        assert torch.get_float32_matmul_precision() == before


# ---------------------------------------------------------------------------------------------
# Memory: the largest tensor any op produces, and the live K-wide bytes


class _AllocationRecorder(TorchDispatchMode):
    """Every tensor an aten op returns: the largest numel, and the peak of live [rows, K] storage bytes.

    Live bytes are tracked through weakref finalizers on the returned tensors, keyed by storage, so
    in-place ops and views of a storage are counted once, and views of `existing` tensors (the
    prototype weights' transpose) not at all.
    """

    def __init__(self, k: int, existing=()) -> None:
        super().__init__()
        self.k, self.max_numel, self.current, self.peak = k, 0, 0, 0
        self.live = {t.untyped_storage().data_ptr(): 0 for t in existing}

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            self.max_numel = max(self.max_numel, t.numel())
            if t.dim() == 2 and t.shape[-1] == self.k:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(t, self._free, key)
        return out


def test_peak_allocations_are_chunk_sized():
    b, n_local, dim, k, chunk = 60, 8, 8, 512, 16
    t_x, t_w, s_x, s_w = _dino_case(8, b=b, n_local=n_local, dim=dim, k=k)
    gen = torch.Generator().manual_seed(9)
    masks = _masks(gen, 2 * b, 10, [int(v) for v in torch.randint(0, 6, (2 * b,), generator=gen)])
    m = int(masks.sum())
    ti_x, ti_w = _heads(gen, m, dim, k)
    si_x = _heads(gen, m, dim, k)[0]
    # Sizes chosen so that everything that is not K-wide stays below one chunk: the bound is tight.
    assert s_x.numel() <= chunk * k and s_w.numel() <= chunk * k

    def leaves():
        return s_x.clone().requires_grad_(), s_w.clone().requires_grad_(), si_x.clone().requires_grad_()

    def chunked(x, w, xi):
        dino_t = sinkhorn_knopp_chunked(t_x, t_w, 0.04, chunk_rows=chunk)
        ibot_t = sinkhorn_knopp_chunked(ti_x, ti_w, 0.04, chunk_rows=chunk)
        loss = dino_loss_chunked(x[:2], w, dino_t, ignore_diagonal=True, chunk_rows=chunk)
        loss = loss + dino_loss_chunked(x[2:], w, dino_t, chunk_rows=chunk)
        loss = loss + ibot_loss_chunked(xi, w, ibot_t, masks, chunk_rows=chunk)
        loss.backward()

    def unchunked(x, w, xi):
        dino_t = sinkhorn_knopp(t_x @ t_w.t(), 0.04).view(2, b, k)
        ibot_t = sinkhorn_knopp(ti_x @ ti_w.t(), 0.04)
        logits = x @ w.t()
        loss = dino_loss(logits[:2], dino_t, ignore_diagonal=True) + dino_loss(logits[2:], dino_t)
        loss = loss + ibot_loss(xi @ w.t(), ibot_t, masks)
        loss.backward()

    estimate = loss_activation_bytes(b, m, k, k, chunk)
    peaks, largest = [], []
    for run in (chunked, unchunked):
        inputs = leaves()
        # Transposed weights are views of storage that exists before the losses run: not counted.
        recorder = _AllocationRecorder(k, existing=(inputs[1], t_w, ti_w))
        with recorder:
            run(*inputs)
        peaks.append(recorder.peak)
        largest.append(recorder.max_numel)
    assert largest[0] <= chunk * k
    assert largest[1] >= (2 + n_local) * b * k  # the recorder does see whole-batch logits
    assert peaks[0] <= estimate < peaks[1]
    assert peaks[0] >= 2 * chunk * k * 4  # and the estimate is not loose by orders of magnitude


def test_loss_activation_bytes_scales_with_the_chunk_not_the_rows():
    k_dino, k_ibot = 262_144, 98_304
    base = loss_activation_bytes(2560, 20_000, k_dino, k_ibot, 256)
    assert loss_activation_bytes(2560, 20_000, k_dino, k_ibot, 512) > 1.9 * base
    # Past one chunk, rows enter only through per-row factor vectors: linearly, and a tiny share.
    more = [loss_activation_bytes(2560 * f, 20_000 * f, k_dino, k_ibot, 256) for f in (2, 3)]
    assert more[1] - more[0] == more[0] - base > 0
    assert more[1] < 1.01 * base
    # Fewer rows than a chunk: only the rows that exist are held.
    few = loss_activation_bytes(10, 10, k_dino, k_ibot, 4096)
    assert few == loss_activation_bytes(10, 10, k_dino, k_ibot, 10) < base
    with pytest.raises(DinodistError, match="chunk_rows"):
        loss_activation_bytes(10, 10, 8, 8, 0)


# ---------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_argument():
    t_x, t_w, s_x, s_w = _dino_case(10)
    scaling = sinkhorn_knopp_chunked(t_x, t_w, 0.04)
    cases = [
        (lambda: sinkhorn_knopp_chunked(t_x[0], t_w, 0.04), "sinkhorn bottleneck"),
        (lambda: sinkhorn_knopp_chunked(t_x, t_w[:, :5], 0.04), "sinkhorn weight"),
        (lambda: sinkhorn_knopp_chunked(t_x, t_w, 0.04, chunk_rows=0), "chunk_rows"),
        (lambda: sinkhorn_knopp_chunked(t_x, t_w, 0.0), "temperature"),
        (lambda: dino_loss_chunked(s_x[0], s_w, scaling), "student_bottleneck"),
        (lambda: dino_loss_chunked(s_x, s_w[:, :3], scaling), "student_weight"),
        (lambda: dino_loss_chunked(s_x, s_w[:50], scaling), "prototypes"),
        (lambda: dino_loss_chunked(s_x[:, :7], s_w, scaling), "teacher has 20 rows"),
        (lambda: ibot_loss_chunked(s_x[0], s_w, scaling, torch.ones(2, 3, dtype=torch.bool)), "ibot masks"),
        (lambda: prototype_cross_entropy_chunked(s_x, s_w, scaling, torch.ones(2, 2)), "pair_weights"),
        (lambda: prototype_cross_entropy_chunked(s_x[:2], s_w, scaling, torch.ones(2, 2), torch.ones(3)),
         "row_weights"),
    ]
    for call, field in cases:
        with pytest.raises(DinodistError, match=field) as info:
            call()
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Distributed: 2 gloo ranks with unequal row counts equal one process on the concatenated batch

WORLD = 2
TIMEOUT_S = 60


def _check_distributed(rank: int) -> None:
    group = dist.new_group(list(range(WORLD)))
    # The single-process reference must not all-reduce: group=None would mean the world.
    alone = [dist.new_group([r]) for r in range(WORLD)][rank]
    gen = torch.Generator().manual_seed(11)
    for sizes, weight_std in (([9, 4], 0.1), ([6, 0], 0.1), ([5, 8], 2.0)):
        x, w = _heads(gen, sum(sizes), 16, 24, weight_std)
        local = x.split(sizes)[rank]
        logits = x @ w.t()
        if weight_std > 1:
            # Logits that overflow the unchunked fp32 exp: the per-prototype max must be all-reduced.
            ref = sinkhorn_knopp(logits - logits.amax(0), 0.04, group=alone).split(sizes)[rank]
        else:
            ref = sinkhorn_knopp(logits, 0.04, group=alone).split(sizes)[rank]
        cond = _condition(logits, 0.04).split(sizes)[rank]
        shifted = (logits - logits.amax(0)).split(sizes)[rank]
        got = sinkhorn_knopp_chunked(local, w, 0.04, group=group, chunk_rows=3).probs()
        given = sinkhorn_knopp_chunked(local, w, 0.04, group=group, n_samples=sum(sizes), chunk_rows=2)
        for probs in (got, given.probs()):
            assert probs.shape == ref.shape
            visible = shifted / 0.04 > -80  # above fp32's subnormal range for exp()
            _assert_probs_close(probs[visible], ref[visible], cond[visible])
    # No iterations: the global normaliser and the row count are the only group quantities.
    x, w = _heads(gen, 11, 16, 24)
    ref = sinkhorn_knopp(x @ w.t(), 0.07, n_iterations=0, group=alone).split([7, 4])[rank]
    got = sinkhorn_knopp_chunked(x.split([7, 4])[rank], w, 0.07, n_iterations=0, group=group, chunk_rows=3)
    _assert_probs_close(got.probs(), ref, _condition(x @ w.t(), 0.07).split([7, 4])[rank])




@pytest.mark.multiproc
def test_distributed_chunked_sinkhorn_matches_single_process(tmp_path):
    run_gloo(_check_distributed, WORLD, tmp_path, timeout_s=TIMEOUT_S)
