import json
import math
from pathlib import Path

import pytest
import torch

from dinodist.core.errors import DinodistError
from dinodist.core.models import DINOHead, build_backbone, build_head, get_arch
from dinodist.core.models.arch import (
    ARCHS,
    PAPER_DINO_HEAD,
    PAPER_IBOT_HEAD,
    TINY_DINO_HEAD,
    HeadSpec,
    head_parameters,
)
from dinodist.core.models.block import Block, subset_size

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "state_dicts"


def _ref(name):
    path = REF / f"{name}.json"
    if not path.exists():
        pytest.skip("../shared/reference/state_dicts not present")
    return json.loads(path.read_text())


def _tiny(name="tiny-vits", **kw):
    torch.manual_seed(0)
    return build_backbone(name, **kw)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_meta_build_matches_official_state_dict(arch):
    ref = _ref(arch)
    model = build_backbone(arch, device="meta")
    sd = model.state_dict()
    expect = {k: v for k, v in ref.items() if not k.startswith("_")}
    assert {k: list(v.shape) for k, v in sd.items()} == expect
    assert list(sd) == list(expect)  # same order as the official module
    assert len(sd) == ref["_num_state_dict_keys"]
    assert sum(p.numel() for p in model.parameters()) == ref["_total_parameters"]
    buffers = sorted(k for k, _ in model.named_buffers())
    assert buffers == sorted(ref["_buffer_keys"])
    assert model.cls_token.device.type == "meta"


def test_paper_heads_match_official_shapes():
    ref = _ref("vit7b16_heads")
    for prefix, spec in (("dino_head.", PAPER_DINO_HEAD), ("ibot_head.", PAPER_IBOT_HEAD)):
        head = build_head(4096, spec, device="meta")
        got = {prefix + k: list(v.shape) for k, v in head.state_dict().items()}
        assert got == {k: v for k, v in ref.items() if k.startswith(prefix)}
        assert sum(p.numel() for p in head.parameters()) == head_parameters(spec, 4096)
        key = f"_{prefix[:-1]}_total_parameters"
        assert sum(p.numel() for p in head.parameters()) == ref[key]


def test_head_forward_split_and_normalisation():
    torch.manual_seed(0)
    head = DINOHead(48, TINY_DINO_HEAD)
    assert set(head.state_dict()) == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight",
    }
    x = torch.randn(5, 48)
    z = head(x, no_last_layer=True)
    assert z.shape == (5, TINY_DINO_HEAD.bottleneck_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    full = head(x)
    assert full.shape == (5, TINY_DINO_HEAD.n_prototypes)
    torch.testing.assert_close(head(z, only_last_layer=True), full)
    torch.testing.assert_close(full, z @ head.last_layer.weight.T)
    assert head(torch.zeros(2, 48), no_last_layer=True).isfinite().all()
    for m in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    w = head.last_layer.weight
    assert w.abs().max() <= 2.0 and abs(w.std().item() - 0.02) < 0.003
    deep = DINOHead(8, HeadSpec(16, 4, 10, nlayers=4))
    assert sum(isinstance(m, torch.nn.Linear) for m in deep.mlp) == 4


def test_init_as_official():
    spec = get_arch("tiny-vitb")
    model = _tiny("tiny-vitb")
    assert torch.equal(model.mask_token, torch.zeros_like(model.mask_token))
    bound = math.sqrt(1 / (3 * spec.patch_size**2))
    for t in (model.patch_embed.proj.weight, model.patch_embed.proj.bias):
        assert t.abs().max() <= bound and t.abs().max() > 0.5 * bound
    for blk in model.blocks:
        assert torch.equal(blk.ls1.gamma, torch.full_like(blk.ls1.gamma, spec.layerscale_init))
        mask = blk.attn.qkv.bias_mask
        d = spec.embed_dim
        assert torch.equal(mask[:d], torch.ones(d)) and torch.equal(mask[2 * d :], torch.ones(d))
        assert torch.equal(mask[d : 2 * d], torch.zeros(d))
        assert torch.equal(blk.attn.qkv.bias, torch.zeros(3 * d))
    w = torch.cat([b.mlp.fc1.weight.flatten() for b in model.blocks])
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
    toks = torch.cat([model.cls_token.flatten(), model.storage_tokens.flatten()])
    assert 0.01 < toks.std().item() < 0.03
    assert model.norm.eps == spec.norm_eps


def test_meta_build_then_materialise():
    model = build_backbone("tiny-vitsplus", device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    for name, t in model.state_dict().items():
        assert t.isfinite().all(), name
    ref = _tiny("tiny-vitsplus")
    torch.testing.assert_close(model.rope_embed.periods, ref.rope_embed.periods)
    torch.testing.assert_close(model.blocks[0].attn.qkv.bias_mask, ref.blocks[0].attn.qkv.bias_mask)
    out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 48)


def test_bad_overrides_and_inputs():
    with pytest.raises(DinodistError, match="depht"):
        build_backbone("tiny-vits", depht=2)
    with pytest.raises(DinodistError, match="depht"):
        build_backbone(get_arch("tiny-vits"), depht=2)
    model = _tiny(depth=1)
    with pytest.raises(DinodistError, match="patch_size 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(DinodistError, match="masks shape"):
        model.forward_features(torch.randn(1, 3, 16, 16), masks=torch.zeros(1, 3, dtype=torch.bool))


def test_variable_resolution_and_outputs():
    model = _tiny().eval()
    for h, w in ((32, 32), (24, 56), (64, 40)):
        x = torch.randn(2, 3, h, w)
        out = model.forward_features(x)
        hw = (h // 8) * (w // 8)
        assert out["x_norm_clstoken"].shape == (2, 48)
        assert out["x_storage_tokens"].shape == (2, 4, 48)
        assert out["x_norm_patchtokens"].shape == (2, hw, 48)
        assert out["x_prenorm"].shape == (2, 5 + hw, 48)
        torch.testing.assert_close(model(x), out["x_norm_clstoken"])
        normed = model.norm(out["x_prenorm"])
        torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 5:])
        (grid, cls, reg), = model.get_intermediate_layers(
            x, n=1, reshape=True, return_class_token=True, return_extra_tokens=True
        )
        assert grid.shape == (2, 48, h // 8, w // 8)
        torch.testing.assert_close(grid.flatten(2).transpose(1, 2), out["x_norm_patchtokens"])
        torch.testing.assert_close(cls, out["x_norm_clstoken"])
        torch.testing.assert_close(reg, out["x_storage_tokens"])


def test_intermediate_layers_select_blocks():
    model = _tiny().eval()
    x = torch.randn(1, 3, 16, 24)
    by_index = model.get_intermediate_layers(x, n=[0, 2], norm=False)
    last2 = model.get_intermediate_layers(x, n=2, norm=False)
    assert len(by_index) == 2 and len(last2) == 2
    torch.testing.assert_close(by_index[1], last2[0])  # block 2 of 4 is the second-to-last
    tokens, (H, W) = model.prepare_tokens_with_masks(x)
    tokens = model.blocks[0](tokens, model.rope_embed(H, W))
    torch.testing.assert_close(by_index[0], tokens[:, 5:])
    with pytest.raises(DinodistError, match="out of range"):
        model.get_intermediate_layers(x, n=[7])


def test_k_bias_is_masked():
    model = _tiny(depth=1).eval()
    x = torch.randn(2, 3, 16, 16)
    base = model(x)
    d = 48
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[d : 2 * d].normal_()
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[:d].normal_()
        model.blocks[0].ls1.gamma.fill_(1.0)
    assert not torch.allclose(model(x), base)


def test_list_forward_equals_per_crop_forward():
    model = _tiny(drop_path_rate=0.0)
    g, loc = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    m = torch.rand(4, 16) < 0.3
    for mode in ("eval", "train"):
        getattr(model, mode)()
        if mode == "train":
            model.rope_embed.rescale_coords = None  # deterministic rope for the comparison
        both = model.forward_features_list([g, loc], [m, None])
        one = model.forward_features(g, masks=m)
        two = model.forward_features(loc)
        for a, b in ((both[0], one), (both[1], two)):
            for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
                torch.testing.assert_close(a[key], b[key])


def test_packed_path_with_keep_all_equals_per_element_path():
    # 1e-17 rounds 1 - p to 1.0: the packed (token-concatenation) path runs but keeps every sample.
    assert subset_size(6, 1e-17) == 6
    packed = _tiny(drop_path_rate=1e-17, rope_rescale=None).train()
    plain = _tiny(drop_path_rate=0.0, rope_rescale=None).train()
    plain.load_state_dict(packed.state_dict())
    for blk in packed.blocks:  # make the residual branches matter
        blk.ls1.gamma.data.fill_(0.5)
        blk.ls2.gamma.data.fill_(0.5)
    plain.load_state_dict(packed.state_dict())
    xs = [torch.randn(3, 3, 32, 32), torch.randn(5, 3, 16, 24)]
    ms = [torch.rand(3, 16) < 0.4, None]
    a = packed.forward_features_list(xs, ms)
    b = plain.forward_features_list(xs, ms)
    for ea, eb in zip(a, b):
        torch.testing.assert_close(ea["x_prenorm"], eb["x_prenorm"], rtol=1e-5, atol=1e-5)
    loss_a = sum(e["x_norm_clstoken"].square().sum() for e in a)
    loss_b = sum(e["x_norm_clstoken"].square().sum() for e in b)
    loss_a.backward()
    loss_b.backward()
    for (n, pa), pb in zip(packed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=n)


def _block(p, gamma1, gamma2):
    torch.manual_seed(0)
    blk = Block(16, 2, "mlp", 32, True, 1e-5, 1e-5, drop_path=p)
    blk.ls1.gamma.data.fill_(gamma1)
    blk.ls2.gamma.data.fill_(gamma2)
    return blk


@pytest.mark.parametrize("branch", ["attn", "ffn"])
def test_sample_subset_stochastic_depth(branch):
    p, B = 0.5, 8
    blk = _block(p, 1.0 if branch == "attn" else 0.0, 1.0 if branch == "ffn" else 0.0)
    x = torch.randn(B, 7, 16)
    k = subset_size(B, p)
    with torch.no_grad():
        full = blk.eval()(x)
        residual = full - x
        blk.train()
        draws = 300
        total = torch.zeros_like(x)
        chosen = torch.zeros(B)
        for _ in range(draws):
            y = blk(x)
            # each sample gets either no update or its full residual scaled by B/k, never a mix
            updated = ((y - x).flatten(1).abs().amax(1) > 0)
            assert int(updated.sum()) == k
            torch.testing.assert_close(y[updated], x[updated] + (B / k) * residual[updated])
            torch.testing.assert_close(y[~updated], x[~updated], rtol=0, atol=0)
            total += y
            chosen += updated.float()
    mean = total / draws
    # E[y] = x + residual; the sampling error of the chosen fraction bounds the mismatch
    err = (mean - full).flatten(1).abs().amax(1) / residual.flatten(1).abs().amax(1)
    frac = chosen / draws
    torch.testing.assert_close(err, ((B / k) * frac - 1).abs(), rtol=1e-3, atol=1e-4)
    assert err.max() < 0.35 and (frac - k / B).abs().mean() < 0.06


def test_stochastic_depth_draws_per_element_and_branch():
    blk = _block(0.5, 1.0, 1.0).train()
    xs = [torch.randn(6, 5, 16), torch.randn(6, 3, 16)]
    torch.manual_seed(5)
    same_sets = 0
    for _ in range(20):
        ys = blk(xs)
        upd = [((y - x).flatten(1).abs().amax(1) > 0) for y, x in zip(ys, xs)]
        same_sets += bool(torch.equal(upd[0], upd[1]))
    assert same_sets < 10  # the two list elements draw independently


def test_masks_replace_patch_tokens():
    model = _tiny().eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    masks[1, 10] = True
    tokens, _ = model.prepare_tokens_with_masks(x, masks)
    patches = tokens[:, 5:]
    assert torch.equal(patches[masks], model.mask_token.expand(int(masks.sum()), -1))
    unmasked, _ = model.prepare_tokens_with_masks(x)
    torch.testing.assert_close(patches[~masks], unmasked[:, 5:][~masks])
    # pixels under a masked patch cannot influence any output
    x2 = x.clone()
    x2[0, :, 0:8, 8:16] = torch.randn(3, 8, 8)  # patch 1 of image 0
    a = model.forward_features(x, masks=masks)
    b = model.forward_features(x2, masks=masks)
    torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], rtol=0, atol=0)
    c = model.forward_features(x2)
    assert not torch.allclose(a["x_prenorm"][0], c["x_prenorm"][0])


def test_mask_token_in_graph_without_masks():
    model = _tiny(depth=1).train()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.mask_token.grad is not None
    assert torch.equal(model.mask_token.grad, torch.zeros_like(model.mask_token))


def test_rope_recomputed_per_block_and_element_in_training():
    model = _tiny()
    calls = []
    orig = model.rope_embed.forward
    model.rope_embed.forward = lambda H, W: calls.append((H, W)) or orig(H, W)
    model.train().forward_features_list([torch.randn(1, 3, 16, 16), torch.randn(1, 3, 8, 16)], [None, None])
    assert len(calls) == 2 * model.spec.depth
    assert calls[:2] == [(2, 2), (1, 2)]
    x = torch.randn(1, 3, 32, 32)
    del model.rope_embed.forward
    for blk in model.blocks:  # at init (gamma 1e-5) the residuals hardly move the output
        blk.ls1.gamma.data.fill_(1.0)
    assert not torch.allclose(model(x), model(x))  # random rescale while training
    model.eval()
    assert torch.equal(model(x), model(x))


def test_7b_local_cls_norm_only_for_local_crops_in_training():
    model = _tiny("tiny-vit7b", depth=2, rope_rescale=None)
    assert model.local_cls_norm is not None and not hasattr(model.blocks[0].attn.qkv, "bias_mask")
    with torch.no_grad():
        model.local_cls_norm.weight.normal_()
        model.local_cls_norm.bias.normal_()
    xs = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    for training in (True, False):
        model.train(training)
        out = model.forward_features_list(xs, [None, None])
        for idx, o in enumerate(out):
            pre = o["x_prenorm"]
            use_local = training and idx == 1
            norm = model.local_cls_norm if use_local else model.norm
            torch.testing.assert_close(o["x_norm_clstoken"], norm(pre[:, :5])[:, 0])
            torch.testing.assert_close(o["x_storage_tokens"], norm(pre[:, :5])[:, 1:])
            torch.testing.assert_close(o["x_norm_patchtokens"], model.norm(pre[:, 5:]))
            if use_local:
                assert not torch.allclose(o["x_norm_clstoken"], model.norm(pre[:, :5])[:, 0])
