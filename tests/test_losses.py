import math

import pytest
import torch
import torch.nn.functional as F

from dinodist.core.errors import DinodistError
from dinodist.core.losses import (
    dino_loss,
    gram_loss,
    ibot_loss,
    koleo_loss,
    koleo_loss_distributed,
    resize_gram_teacher,
    sinkhorn_knopp,
)


def _sk_reference(logits, temp, iters):
    """Plain-Python Sinkhorn-Knopp in float64 on nested lists (independent of the tensor code)."""
    b, k = len(logits), len(logits[0])
    q = [[math.exp(logits[i][j] / temp) for i in range(b)] for j in range(k)]  # [K][B]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        col = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / col[i] / b for i in range(b)] for j in range(k)]
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


def test_sinkhorn_matches_plain_python_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 7) * 0.3
    ref = torch.tensor(_sk_reference(logits.double().tolist(), 0.07, 3), dtype=torch.float32)
    out = sinkhorn_knopp(logits, 0.07)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_sinkhorn_rows_are_distributions_and_columns_equipartitioned():
    torch.manual_seed(1)
    logits = torch.randn(32, 8)
    out = sinkhorn_knopp(logits, 1.0, n_iterations=200)
    torch.testing.assert_close(out.sum(1), torch.ones(32), rtol=0, atol=1e-5)
    # Converged: every prototype receives B/K of the mass.
    torch.testing.assert_close(out.sum(0), torch.full((8,), 32 / 8), rtol=1e-4, atol=1e-4)
    assert (out >= 0).all()
    # After only 3 iterations rows are exact but columns are only approximately balanced.
    out3 = sinkhorn_knopp(logits, 1.0)
    torch.testing.assert_close(out3.sum(1), torch.ones(32), rtol=0, atol=1e-5)
    assert (out3.sum(0) - 4).abs().max() < (F.softmax(logits, -1).sum(0) - 4).abs().max()


def test_sinkhorn_invariances():
    torch.manual_seed(2)
    logits = torch.randn(6, 10)
    base = sinkhorn_knopp(logits, 0.1)
    # Temperature only scales the logits.
    torch.testing.assert_close(sinkhorn_knopp(logits * 2, 0.2), base)
    # A per-prototype shift is a per-row scaling of Q, removed by the first prototype normalisation.
    shift = torch.randn(1, 10) * 0.05
    torch.testing.assert_close(sinkhorn_knopp(logits + shift, 0.1), base, rtol=1e-4, atol=1e-6)
    # The output is E * a_k * c_b: log(out) - logits/temp is a sum of a row and a column term.
    resid = torch.log(base.double()) - logits.double() / 0.1
    centred = resid - resid.mean(0, keepdim=True) - resid.mean(1, keepdim=True) + resid.mean()
    assert centred.abs().max() < 1e-4
    # Float32 math and no gradient, whatever comes in.
    out = sinkhorn_knopp(logits.double().requires_grad_(), 0.1)
    assert out.dtype == torch.float32 and not out.requires_grad


def test_sinkhorn_n_samples_overrides_row_count():
    torch.manual_seed(3)
    logits = torch.randn(4, 5)
    out = sinkhorn_knopp(logits, 0.5, n_samples=4)
    torch.testing.assert_close(out, sinkhorn_knopp(logits, 0.5))
    # an int, a tensor and the row count itself are the same float32 B_total (filled on the device)
    for n in (torch.tensor(4), torch.tensor(4.0, dtype=torch.float64)):
        assert torch.equal(sinkhorn_knopp(logits, 0.5, n_samples=n), out)
    assert not torch.equal(sinkhorn_knopp(logits, 0.5, n_samples=7), out)


def _dino_manual(student, teacher, temp, ignore_diagonal):
    total, pairs = 0.0, 0
    for s in range(student.shape[0]):
        for t in range(teacher.shape[0]):
            if ignore_diagonal and s == t:
                continue
            log_p = F.log_softmax(student[s] / temp, dim=-1)
            total = total + (-(teacher[t] * log_p).sum(-1)).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dino_loss_equals_manual_loop(ignore_diagonal):
    torch.manual_seed(4)
    student = torch.randn(2, 3, 11)
    teacher = F.softmax(torch.randn(2, 3, 11), dim=-1)
    got = dino_loss(student, teacher, 0.1, ignore_diagonal=ignore_diagonal)
    torch.testing.assert_close(got, _dino_manual(student, teacher, 0.1, ignore_diagonal))
    # Local crops: 8 students vs 2 teachers, no diagonal.
    student = torch.randn(8, 3, 11)
    torch.testing.assert_close(dino_loss(student, teacher), _dino_manual(student, teacher, 0.1, False))


def test_dino_loss_hand_values():
    teacher = F.softmax(torch.randn(2, 4, 16), dim=-1)
    # Uniform student: cross-entropy is log K against any distribution.
    got = dino_loss(torch.zeros(3, 4, 16), teacher, ignore_diagonal=True)
    assert got.item() == pytest.approx(math.log(16), rel=1e-6)
    # One-hot teacher and very confident matching student: loss close to 0.
    onehot = F.one_hot(torch.tensor([[1, 2]] * 2), 5).float()
    assert dino_loss(onehot * 100, onehot).item() < 1e-6


def test_ibot_loss_per_crop_mean():
    torch.manual_seed(5)
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, [0, 2]] = True
    masks[2, [1, 3, 4, 5]] = True  # crops 1 and 3 unmasked: they still count in the divisor
    m, k = int(masks.sum()), 9
    student = torch.randn(m, k)
    teacher = F.softmax(torch.randn(m, k), dim=-1)
    ce = -(teacher * F.log_softmax(student / 0.1, -1)).sum(-1)
    manual = (ce[:2].mean() + ce[2:].mean()) / 4
    torch.testing.assert_close(ibot_loss(student, teacher, masks), manual)
    weight = torch.tensor([0.5, 0.5, 0.25, 0.25, 0.25, 0.25])
    torch.testing.assert_close(ibot_loss(student, teacher, masks, masks_weight=weight), manual)
    uniform = ibot_loss(torch.zeros(m, k), teacher, masks)
    assert uniform.item() == pytest.approx(2 * math.log(k) / 4, rel=1e-6)


def test_koleo_hand_value_and_brute_force():
    # Four points at 90 degrees on a circle: every nearest neighbour is sqrt(2) away.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    torch.manual_seed(6)
    x = torch.randn(10, 5)
    xn = F.normalize(x, dim=-1)
    d = torch.cdist(xn, xn) + torch.eye(10) * 10
    torch.testing.assert_close(koleo_loss(x), -torch.log(d.min(1).values).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(koleo_loss(x * 7.0), koleo_loss(x))
    x.requires_grad_()
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_koleo_distributed_without_process_group_is_local():
    x = torch.randn(6, 4)
    torch.testing.assert_close(koleo_loss_distributed(x), koleo_loss(x))


def _gram_manual(s, t):
    total = 0.0
    for i in range(s.shape[0]):
        a, b = F.normalize(s[i], dim=-1), F.normalize(t[i], dim=-1)
        total = total + ((a @ a.T - b @ b.T) ** 2).mean()
    return total / s.shape[0]


def test_gram_loss_identities():
    torch.manual_seed(7)
    s, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert gram_loss(s, s).item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(gram_loss(s, t), _gram_manual(s, t))
    torch.testing.assert_close(gram_loss(s * 4.0, t * 0.25), gram_loss(s, t))
    # Batch-level Gram of a single image is its image-level Gram.
    torch.testing.assert_close(gram_loss(s[:1], t[:1], img_level=False), gram_loss(s[:1], t[:1]))
    assert not torch.allclose(gram_loss(s, t, img_level=False), gram_loss(s, t))
    sn, tn = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    clamp = F.mse_loss((sn @ sn.mT).clamp(min=0), (tn @ tn.mT).clamp(min=0))
    torch.testing.assert_close(gram_loss(s, t, remove_neg=True), clamp)
    s.requires_grad_()
    t.requires_grad_()
    gram_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_gram_loss_takes_the_flattened_batch():
    # the official loss is called on [B*N, D] patch features: same loss and gradient as [B, N, D]
    torch.manual_seed(9)
    for kwargs in ({}, {"remove_neg": True}, {"remove_only_teacher_neg": True}):
        s3 = torch.randn(3, 5, 4, requires_grad=True)
        s2 = s3.detach().reshape(15, 4).requires_grad_()
        t = torch.randn(3, 5, 4)
        l3 = gram_loss(s3, t, img_level=False, **kwargs)
        l2 = gram_loss(s2, t.reshape(15, 4), img_level=False, **kwargs)
        assert torch.equal(l3, l2)
        l3.backward()
        l2.backward()
        assert torch.equal(s3.grad.reshape(15, 4), s2.grad)
    # image-level Grams need the image axis: a flattened batch is refused in one line
    with pytest.raises(DinodistError, match=r"img_level=True.*\[B, P, D\], got \[15, 4\]") as err:
        gram_loss(s2, t.reshape(15, 4), img_level=True)
    assert "\n" not in str(err.value)


def test_resize_gram_teacher():
    torch.manual_seed(8)
    feats = torch.randn(2, 16, 3)
    assert torch.equal(resize_gram_teacher(feats, (4, 4), (4, 4)), feats)
    out = resize_gram_teacher(feats, (4, 4), (2, 2))
    loop = torch.stack(
        [
            F.interpolate(feats[b].T.reshape(1, 3, 4, 4), size=(2, 2), mode="bicubic", align_corners=False)
            .reshape(3, 4).T
            for b in range(2)
        ]
    )
    torch.testing.assert_close(out, loop)
    const = torch.ones(1, 32 * 32, 5) * 0.7
    torch.testing.assert_close(resize_gram_teacher(const, (32, 32), (16, 16)), torch.full((1, 256, 5), 0.7))
    with pytest.raises(DinodistError, match="4x5"):
        resize_gram_teacher(feats, (4, 5), (2, 2))
