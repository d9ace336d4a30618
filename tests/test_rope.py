import math

import pytest
import torch

from dinodist.core.models.rope import RopePositionEmbedding, apply_rope_qk, rope_periods


def _rope(hd=16, **kw):
    return RopePositionEmbedding(hd, base=100.0, **kw)


def test_periods_formula_and_length():
    for hd in (16, 64, 128):
        p = rope_periods(hd, 100.0).double()
        assert p.shape == (hd // 4,)
        expect = torch.tensor([100.0 ** (4 * j / hd) for j in range(hd // 4)], dtype=torch.float64)
        torch.testing.assert_close(p, expect, rtol=1e-6, atol=0)
    assert "periods" in _rope().state_dict()


def test_angle_layout_y_then_x_tiled():
    rope = _rope(hd=16).eval()
    H, W = 3, 5
    ang = rope.angles(H, W)
    assert ang.shape == (H * W, 16)
    # tiled twice: dim i and i + hd/2 carry the same angle (half-split rotation pairs them)
    torch.testing.assert_close(ang[:, :8], ang[:, 8:])
    # first hd/4 angles depend on the row only, the next hd/4 on the column only
    grid = ang[:, :8].reshape(H, W, 8)
    torch.testing.assert_close(grid[:, :, :4], grid[:, :1, :4].expand(H, W, 4))
    torch.testing.assert_close(grid[:, :, 4:], grid[:1, :, 4:].expand(H, W, 4))
    # "separate" normalisation: patch (i, j) sits at y = 2(i+.5)/H - 1, x = 2(j+.5)/W - 1
    i, j = 2, 3
    y, x = 2 * (i + 0.5) / H - 1, 2 * (j + 0.5) / W - 1
    per = rope.periods
    torch.testing.assert_close(grid[i, j, :4], 2 * math.pi * y / per)
    torch.testing.assert_close(grid[i, j, 4:], 2 * math.pi * x / per)


def test_rotation_preserves_norm_and_leaves_prefix_untouched():
    torch.manual_seed(0)
    rope = _rope(hd=16).eval()
    H, W, prefix = 4, 3, 5
    sin, cos = rope(H, W)
    q = torch.randn(2, 3, prefix + H * W, 16)
    k = torch.randn(2, 3, prefix + H * W, 16)
    q2, k2 = apply_rope_qk(q, k, (sin, cos))
    assert torch.equal(q2[:, :, :prefix], q[:, :, :prefix])
    assert torch.equal(k2[:, :, :prefix], k[:, :, :prefix])
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k2.norm(dim=-1), k.norm(dim=-1))
    assert not torch.allclose(q2[:, :, prefix + 1 :], q[:, :, prefix + 1 :])


def test_score_depends_only_on_offset():
    torch.manual_seed(1)
    rope = _rope(hd=16).eval()
    H, W = 4, 5
    sin, cos = rope(H, W)
    qv, kv = torch.randn(16), torch.randn(16)
    q = qv.expand(1, 1, H * W, 16).clone()
    k = kv.expand(1, 1, H * W, 16).clone()
    q2, k2 = apply_rope_qk(q, k, (sin, cos))
    scores = (q2[0, 0] @ k2[0, 0].T).double()
    by_offset: dict[tuple[int, int], list[float]] = {}
    for a in range(H * W):
        for b in range(H * W):
            off = (a // W - b // W, a % W - b % W)
            by_offset.setdefault(off, []).append(scores[a, b].item())
    spreads = [max(v) - min(v) for v in by_offset.values()]
    assert max(spreads) < 1e-4
    means = torch.tensor([sum(v) / len(v) for v in by_offset.values()])
    assert means.std() > 1e-2  # the position actually matters


def test_training_rescale_is_one_scalar_in_range_and_eval_is_fixed():
    torch.manual_seed(2)
    rope = _rope(hd=16, rescale_coords=2.0)
    ref = rope.eval().angles(4, 6)
    assert torch.equal(ref, rope.angles(4, 6))
    rope.train()
    factors = []
    for _ in range(20):
        ang = rope.angles(4, 6)
        ratio = ang / ref
        f = ratio.flatten()[0].item()
        torch.testing.assert_close(ratio, torch.full_like(ratio, f), rtol=1e-5, atol=1e-5)
        assert 0.5 - 1e-6 <= f <= 2.0 + 1e-6
        factors.append(f)
    assert len({round(f, 6) for f in factors}) == len(factors)


@pytest.mark.parametrize("kw", [dict(shift_coords=0.5), dict(jitter_coords=1.5)])
def test_shift_and_jitter_are_per_axis_and_train_only(kw):
    torch.manual_seed(3)
    rope = _rope(hd=16, **kw)
    ref = rope.eval().coords(4, 6)  # even sizes: no coordinate is exactly 0
    rope.train()
    c = rope.coords(4, 6)
    assert not torch.allclose(c, ref)
    if "shift_coords" in kw:
        d = c - ref
        torch.testing.assert_close(d, d[:1].expand_as(d))
        assert d.abs().max() <= 0.5
    else:
        r = c / ref
        torch.testing.assert_close(r, r[:1].expand_as(r))
        assert (r >= 1 / 1.5 - 1e-6).all() and (r <= 1.5 + 1e-6).all()
