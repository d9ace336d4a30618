import colorsys
import gzip
import multiprocessing
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dinodist.core.data import (
    BatchLoader,
    CropConfig,
    build_source,
    collate,
    global_batch,
    make_crops,
    sample_masks,
    sources,
)
from dinodist.core.data import device as data_device
from dinodist.core.data.augment import (
    _gaussian_blur,
    _hsv_to_rgb,
    _resize_box,
    _rgb_to_hsv,
    distort,
    draw_params,
    normalize,
    quantize,
)
from dinodist.core.data.masking import block_mask
from dinodist.core.errors import DinodistError
from dinodist.core.losses import ibot_loss

TINY = CropConfig(global_size=32, local_size=16, n_local=3)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, 40 + 3 * i, 48 - 2 * i), dtype=torch.uint8, generator=gen) for i in range(n)
    ]


def _crops_and_masks(ids, seeds, cfg):
    crops = make_crops(_images(len(ids)), ids, seeds, cfg)
    return crops, sample_masks(ids, seeds, (cfg.global_size // 8, cfg.global_size // 8))


# ---------------------------------------------------------------- sampler


def test_sampler_covers_each_id_once_per_epoch():
    n, g = 10, 4
    seen = torch.cat([global_batch(t, g, n, seed=3)[0] for t in range(15)])  # 60 positions = 6 epochs
    for epoch in range(6):
        assert sorted(seen[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    ids, seeds = global_batch(7, g, n, seed=3)
    assert torch.equal(ids, global_batch(7, g, n, seed=3)[0]) and torch.equal(
        seeds, global_batch(7, g, n, 3)[1]
    )
    assert seeds.dtype == torch.long and (seeds >= 0).all() and len(set(seeds.tolist())) == g
    assert not torch.equal(global_batch(0, n, n, seed=4)[0], global_batch(0, n, n, seed=3)[0])
    assert not torch.equal(global_batch(8, g, n, 3)[1], seeds)
    with pytest.raises(DinodistError, match="num_samples"):
        global_batch(0, 4, 0, 0)


def test_derive_seed_is_hash_ints_on_python_ints():
    # the per-crop seeds (and so every crop, mask and stored target) must not change with the fast path
    from dinodist.core.data.sampler import derive_seed, hash_ints

    rng = np.random.default_rng(0)
    edges = [0, 1, -1, 2**63 - 1, -(2**63), 0x6D61736B]
    for n in range(2000):
        parts = [int(v) for v in rng.integers(-(2**63), 2**63 - 1, size=n % 5, endpoint=True)]
        parts += [edges[n % len(edges)]] * (n % 2)
        assert derive_seed(*parts) == int(hash_ints(*parts)[0]), parts
    assert derive_seed(np.int64(5), torch.tensor(7).item()) == int(hash_ints(5, 7)[0])
    with pytest.raises(OverflowError):
        derive_seed(2**63)


# ---------------------------------------------------------------- sources


def _write_png(path, seed, size=(12, 10)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _corrupt_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_png(tmp_path / "a" / "0.png", 0)
    (tmp_path / "a" / "1.png").write_bytes(b"not an image at all")
    _write_png(tmp_path / "b" / "2.PNG", 2)
    (tmp_path / "b" / "notes.txt").write_text("ignored")
    return build_source(f"folder:{tmp_path}")


def test_folder_source_labels_and_fingerprint(tmp_path):
    src = _corrupt_folder(tmp_path)
    assert len(src) == 3
    img = src.load(2)
    assert img.dtype == torch.uint8 and img.shape == (3, 10, 12)
    assert [src.label(i) for i in range(3)] == [0, 0, 1]  # sub-folder labels, each file its own
    fp = src.fingerprint()
    assert fp == build_source(f"folder:{tmp_path}").fingerprint()
    _write_png(tmp_path / "b" / "2.PNG", 2, size=(13, 10))
    assert build_source(f"folder:{tmp_path}").fingerprint() != fp


def test_unreadable_file_raises_after_backoff_never_substitutes(tmp_path, monkeypatch):
    # another image in its place would pair different pixels with the same row on teacher and student
    src = _corrupt_folder(tmp_path)
    assert sources.DECODE_RETRY_DELAYS_S == (0.1, 0.4, 1.6)
    slept = []
    monkeypatch.setattr(sources, "DECODE_RETRY_DELAYS_S", (0.01, 0.02, 0.03))
    monkeypatch.setattr(sources, "_sleep", slept.append)
    with pytest.raises(DinodistError) as err:
        src.load(1)
    msg = str(err.value)
    assert type(err.value) is DinodistError and "\n" not in msg
    assert "sample 1" in msg and str(tmp_path / "a" / "1.png") in msg and "4 attempts" in msg
    assert "UnidentifiedImageError" in msg  # the cause
    assert slept == [0.01, 0.02, 0.03]
    assert torch.equal(src.load(0), src.load(0)) and src.label(1) == 0
    assert not hasattr(src, "n_unreadable")


def test_transient_read_failure_is_retried(tmp_path, monkeypatch):
    _write_png(tmp_path / "0.png", 0)
    _write_png(tmp_path / "1.png", 1)
    src = build_source(f"folder:{tmp_path}")
    want = src.load(1)
    (tmp_path / "1.png").unlink()  # e.g. a network filesystem that briefly fails the open
    slept = []

    def repair(delay):
        slept.append(delay)
        if len(slept) == 2:
            _write_png(tmp_path / "1.png", 1)

    monkeypatch.setattr(sources, "_sleep", repair)
    assert torch.equal(src.load(1), want)
    assert slept == [0.1, 0.4]


@pytest.mark.timeout(60)
def test_decode_error_propagates_out_of_loader_prefetch(tmp_path, monkeypatch):
    n, g, seed = 6, 2, 5
    bad = int(global_batch(1, g, n, seed)[0][0])  # first needed by iteration 1: built by a prefetch thread
    assert bad not in global_batch(0, g, n, seed)[0].tolist()
    for k in range(n):
        _write_png(tmp_path / f"{k}.png", k)
    (tmp_path / f"{bad}.png").write_bytes(b"\x89PNG truncated")
    monkeypatch.setattr(sources, "DECODE_RETRY_DELAYS_S", (0.0,))
    loader = BatchLoader(build_source(f"folder:{tmp_path}"), TINY, g, seed, rows=slice(0, g), patch_size=8,
                         prefetch=2, threads=2)
    try:
        loader.get(0)
        failed = loader._futures[1].exception(timeout=30)
        assert type(failed) is DinodistError
        with pytest.raises(DinodistError, match=f"sample {bad} .*{bad}.png") as err:
            loader.get(1)
        assert type(err.value) is DinodistError  # the source's own error, not a wrapper
        with pytest.raises(DinodistError, match=f"sample {bad}"):  # asked again: the same error, no hang
            loader.get(1)
    finally:
        loader.close()


def test_folder_source_errors(tmp_path):
    with pytest.raises(DinodistError, match=str(tmp_path / "missing")):
        build_source(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DinodistError, match="empty"):
        build_source(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(DinodistError, match="unknown data source"):
        build_source("imagenet:/x")


def _write_idx(path, arr: np.ndarray, gz: bool):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz)
    src = build_source(f"fashion-mnist:{tmp_path}:test")
    assert len(src) == 5 and [src.label(i) for i in range(5)] == labels.tolist()
    img = src.load(2)
    assert img.shape == (3, 6, 4) and img.dtype == torch.uint8
    for c in range(3):
        assert torch.equal(img[c], torch.from_numpy(imgs[2]))
    other = tmp_path / "other"
    other.mkdir()
    _write_idx(other / "t10k-images-idx3-ubyte", imgs, gz)
    _write_idx(other / "t10k-labels-idx1-ubyte", labels[::-1].copy(), gz)
    assert build_source(f"fashion-mnist:{other}:test").fingerprint() != src.fingerprint()
    with pytest.raises(DinodistError, match="apt-get install dataset-fashion-mnist"):
        build_source(f"fashion-mnist:{tmp_path}:train")


def test_fashion_mnist_bad_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04garbage")
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8), gz=False)
    with pytest.raises(DinodistError, match="train-images-idx3-ubyte"):
        build_source(f"fashion-mnist:{tmp_path}:train")


def test_skimage_source_is_colour_photos():
    src = build_source("skimage")
    assert len(src) >= 5 and src.name == "skimage" and src.label(0) is None
    img = src.load(len(src) - 1)
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    assert src.fingerprint() == build_source("skimage").fingerprint()


# ---------------------------------------------------------------- augment


def test_make_crops_shapes_ranges_and_determinism():
    cfg = CropConfig(global_size=32, local_size=16, n_local=3, gram_size=24)
    ids, seeds = torch.tensor([4, 9]), torch.tensor([11, 12])
    out = make_crops(_images(2), ids, seeds, cfg)
    assert out["global"].shape == (2, 2, 3, 32, 32) and out["local"].shape == (2, 3, 3, 16, 16)
    assert out["gram"].shape == (2, 2, 3, 24, 24)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    for x in out.values():
        assert x.dtype == torch.float32
        assert (x >= (0 - mean) / std - 1e-5).all() and (x <= (1 - mean) / std + 1e-5).all()
    again = make_crops(_images(2), ids, seeds, cfg)
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = make_crops(_images(2), ids, torch.tensor([11, 13]), cfg)
    assert torch.equal(other["global"][0], out["global"][0]) and not torch.equal(
        other["global"][1], out["global"][1]
    )
    # Global crops do not depend on how many local crops are drawn.
    fewer = make_crops(_images(2), ids, seeds, CropConfig(global_size=32, local_size=16, n_local=1))
    assert torch.equal(fewer["global"], out["global"]) and torch.equal(
        fewer["local"][:, 0], out["local"][:, 0]
    )


def test_gram_crop_is_undistorted_global_crop():
    plain = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob_global2=0.0, solarize_prob_global2=0.0)
    cfg = CropConfig(global_size=32, local_size=16, n_local=1, gram_size=32, **plain)
    out = make_crops(_images(3), [0, 1, 2], [5, 5, 5], cfg)
    torch.testing.assert_close(out["gram"], out["global"])
    distorted = make_crops(
        _images(3), [0, 1, 2], [5, 5, 5], CropConfig(global_size=32, local_size=16, gram_size=32)
    )
    assert not torch.allclose(distorted["gram"], distorted["global"])
    torch.testing.assert_close(distorted["gram"], out["gram"])  # same box and flip, distortions or not


def test_batched_distort_equals_per_crop_loop():
    cfg = CropConfig(
        jitter_prob=1.0,
        grayscale_prob=0.3,
        blur_prob_global1=0.7,
        blur_prob_global2=0.7,
        solarize_prob_global2=0.6,
    )
    params = [draw_params(40, 40, i, 7, i % 2, cfg) for i in range(12)]
    assert (
        len({p.order for p in params}) > 1 and any(p.gray for p in params) and any(p.solarize for p in params)
    )
    x = torch.rand(12, 3, 20, 20)
    batched = distort(x, params)
    looped = torch.cat([distort(x[i : i + 1], params[i : i + 1]) for i in range(12)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched, x)


def test_colour_ops_match_references():
    x = torch.rand(2, 3, 4, 5)
    hsv = _rgb_to_hsv(x)
    for i, j in [(0, 0), (2, 3), (3, 4)]:
        r, g, b = x[1, :, i, j].tolist()
        torch.testing.assert_close(
            hsv[1, :, i, j], torch.tensor(colorsys.rgb_to_hsv(r, g, b)), rtol=1e-5, atol=1e-6
        )
    back = _hsv_to_rgb(hsv)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-6)
    shifted = hsv.clone()
    shifted[:, 0] = (shifted[:, 0] + 0.37) % 1.0
    rot = _hsv_to_rgb(shifted)
    for i, j in [(0, 1), (2, 2), (3, 0)]:
        ref = torch.tensor(colorsys.hsv_to_rgb(*shifted[0, :, i, j].tolist()))
        torch.testing.assert_close(rot[0, :, i, j], ref, rtol=1e-5, atol=1e-6)
    const = torch.full((2, 3, 12, 12), 0.3)
    torch.testing.assert_close(_gaussian_blur(const, torch.tensor([0.5, 2.0])), const)
    blurred = _gaussian_blur(x.repeat(1, 1, 3, 3), torch.tensor([1.0, 2.0]))
    assert blurred.std() < x.std()


# ---------------------------------------------------------------- masking


def test_mask_counts_ratios_and_probability():
    n = 200
    masks = sample_masks(torch.arange(n), torch.full((n,), 9), (8, 8), mask_prob=0.5, ratio=(0.1, 0.5))
    assert masks.shape == (n, 2, 64) and masks.dtype == torch.bool
    counts = masks.sum(-1).flatten()
    masked = counts[counts > 0]
    assert 140 < masked.numel() < 260  # Binomial(400, .5): ~6 sigma bounds
    assert masked.min() >= int(64 * 0.1) and masked.max() <= int(64 * 0.5)
    assert 0.25 < masked.float().mean() / 64 < 0.35  # ratio ~ U(.1, .5), minus int() truncation
    assert not sample_masks(torch.arange(10), torch.zeros(10), (8, 8), mask_prob=0.0).any()
    assert (sample_masks(torch.arange(10), torch.zeros(10), (8, 8), mask_prob=1.0).sum(-1) > 0).all()


def test_masks_are_per_sample_pure_functions():
    ids, seeds = torch.tensor([3, 1, 4, 1]), torch.tensor([10, 20, 30, 40])
    full = sample_masks(ids, seeds, (6, 6), mask_prob=1.0)
    for b in range(4):
        assert torch.equal(sample_masks(ids[b : b + 1], seeds[b : b + 1], (6, 6), mask_prob=1.0)[0], full[b])
    assert not torch.equal(full[1], full[3])  # same id, different seed
    assert not torch.equal(full[:, 0], full[:, 1])
    with pytest.raises(DinodistError, match="mask_prob"):
        sample_masks(ids, seeds, (6, 6), mask_prob=1.5)


def test_block_mask_exact_count_and_blocks():
    import random

    for n in (0, 1, 5, 20, 50):
        m = block_mask((10, 10), n, random.Random(n))
        assert int(m.sum()) == n
    # Block-wise: masked patches have masked 4-neighbours far more often than random placement would.
    m = block_mask((14, 14), 60, random.Random(0)).view(14, 14)
    neighbours = (m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum()
    assert neighbours > 60


# ---------------------------------------------------------------- collate


def test_collate_keys_and_crop_major_order():
    cfg = CropConfig(global_size=32, local_size=16, n_local=3, gram_size=16)
    ids, seeds = torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7])
    crops = make_crops(_images(3), ids, seeds, cfg)
    masks = sample_masks(ids, seeds, (4, 4), mask_prob=1.0)
    out = collate(crops, masks)
    b = 3
    for c in range(2):
        for i in range(b):
            assert torch.equal(out["collated_global_crops"][c * b + i], crops["global"][i, c])
            assert torch.equal(out["collated_masks"][c * b + i], masks[i, c])
            assert torch.equal(out["collated_gram_teacher_crops"][c * b + i], crops["gram"][i, c])
    assert torch.equal(out["collated_local_crops"][2 * b + 1], crops["local"][1, 2])
    flat = out["collated_masks"].flatten()
    assert torch.equal(out["mask_indices_list"], flat.nonzero().flatten())
    assert out["n_masked_patches"].tolist() == [int(flat.sum())]
    crop_of = out["mask_indices_list"] // 16
    per_crop = torch.zeros(2 * b).index_add_(0, crop_of, out["masks_weight"])
    torch.testing.assert_close(per_crop, torch.ones(2 * b))
    m, k = out["mask_indices_list"].numel(), 7
    s, t = torch.randn(m, k), torch.softmax(torch.randn(m, k), -1)
    torch.testing.assert_close(
        ibot_loss(s, t, out["collated_masks"], masks_weight=out["masks_weight"]),
        ibot_loss(s, t, out["collated_masks"]),
    )


# ---------------------------------------------------------------- other process, loader


def _in_child(ids, seeds):
    torch.set_num_threads(1)
    crops, masks = _crops_and_masks(torch.tensor(ids), torch.tensor(seeds), TINY)
    return {k: v.numpy() for k, v in crops.items()}, masks.numpy()


@pytest.mark.multiproc
def test_crops_and_masks_bit_identical_in_another_process():
    ids, seeds = [5, 2, 7], [123, 456, 789]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child_crops, child_masks = pool.apply(_in_child, (ids, seeds))
    crops, masks = _crops_and_masks(torch.tensor(ids), torch.tensor(seeds), TINY)
    for k, v in crops.items():
        assert np.array_equal(v.numpy(), child_crops[k]), k
    assert np.array_equal(masks.numpy(), child_masks)


class _ListSource:
    name = "list"

    def __init__(self, images):
        self.images = images
        self.loads = 0

    def __len__(self):
        return len(self.images)

    def load(self, i):
        self.loads += 1
        return self.images[i]

    def label(self, i):
        return i % 3


def test_loader_rows_prefetch_and_cache():
    src = _ListSource(_images(6))
    full = BatchLoader(src, TINY, global_batch_size=4, seed=1, rows=slice(0, 4), patch_size=8, prefetch=2)
    halves = [BatchLoader(src, TINY, 4, 1, rows=slice(r, r + 2), patch_size=8, prefetch=0) for r in (0, 2)]
    try:
        for t in range(4):
            whole = full.get(t)
            assert torch.equal(whole["collated_global_crops"], full.build(t)["collated_global_crops"])
            parts = [h.get(t) for h in halves]
            assert torch.equal(torch.cat([p["sample_ids"] for p in parts]), whole["sample_ids"])
            assert torch.equal(whole["labels"], whole["sample_ids"] % 3)
            g = whole["collated_global_crops"].view(2, 4, 3, 32, 32)
            pg = torch.cat([p["collated_global_crops"].view(2, 2, 3, 32, 32) for p in parts], dim=1)
            assert torch.equal(g, pg)
            pm = torch.cat([p["collated_masks"].view(2, 2, -1) for p in parts], dim=1)
            assert torch.equal(whole["collated_masks"].view(2, 4, -1), pm)
        assert full.cache.hits > 0 and src.loads <= 3 * 6  # each image decoded once per loader
    finally:
        full.close()
        for h in halves:
            h.close()
    with pytest.raises(DinodistError, match="patch_size"):
        BatchLoader(src, TINY, 4, 1, rows=slice(0, 4), patch_size=5)
    with pytest.raises(DinodistError, match="rows"):
        BatchLoader(src, TINY, 4, 1, rows=slice(3, 3), patch_size=8)


def test_mask_counter_equals_the_loaders_masks():
    # a receiver derives a peer's iBOT counts without loading a pixel: they must be the loader's
    from dinodist.core.targets import MaskCounter, ibot_counts, masks_from_collated

    src = _ListSource(_images(7))
    loader = BatchLoader(src, TINY, global_batch_size=6, seed=3, rows=slice(2, 5), patch_size=8, prefetch=0,
                         mask_prob=0.9, mask_ratio=(0.2, 0.6))
    counter = MaskCounter(6, len(src), 3, loader.grid, 0.9, (0.2, 0.6))
    try:
        for t in range(5):
            want = ibot_counts(masks_from_collated(loader.build(t)["collated_masks"]))
            assert torch.equal(counter(t, 2, 5), want)
            assert want.sum() > 0
        other = MaskCounter(6, len(src), 4, loader.grid, 0.9, (0.2, 0.6))
        assert not all(torch.equal(other(t, 2, 5), counter(t, 2, 5)) for t in range(5))
    finally:
        loader.close()


# ---------------------------------------------------------------- uint8 crops, pinned batches, device copies

PLAIN = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob_global2=0.0, blur_prob_local=0.0,
             solarize_prob_global2=0.0)


def test_uint8_crops_normalised_on_device_equal_the_float_path():
    cfg = CropConfig(global_size=32, local_size=16, n_local=3, gram_size=24)
    ids, seeds = torch.tensor([4, 9, 1]), torch.tensor([11, 12, 13])
    flt = make_crops(_images(3), ids, seeds, cfg)
    u8 = make_crops(_images(3), ids, seeds, cfg, uint8=True)
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    for k in flt:
        assert u8[k].dtype == torch.uint8 and u8[k].shape == flt[k].shape, k
        flat = u8[k].flatten(0, 1)
        got = data_device.normalize_uint8(flat, mean, std)
        # the uint8 crop is the float crop before normalisation, rounded: within half a step of it
        torch.testing.assert_close(got.view_as(flt[k]), flt[k], rtol=0, atol=data_device.UINT8_ATOL)
        # and its normalisation is exactly the float path's ops on the rounded values
        assert torch.equal(got, normalize(flat.float().div_(255.0), cfg)), k
        bf16 = data_device.normalize_uint8(flat, mean, std, torch.bfloat16)
        assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, got.to(torch.bfloat16)), k
    # undistorted Gram crops are the resize's own uint8: bit-identical to the float path
    assert torch.equal(data_device.normalize_uint8(u8["gram"].flatten(0, 1), mean, std).view_as(flt["gram"]),
                       flt["gram"])
    # without photometric distortions every crop is bit-identical
    plain = CropConfig(global_size=32, local_size=16, n_local=2, **PLAIN)
    flt, u8 = make_crops(_images(3), ids, seeds, plain), make_crops(_images(3), ids, seeds, plain, uint8=True)
    for k in flt:
        got = data_device.normalize_uint8(u8[k].flatten(0, 1), mean, std)
        assert torch.equal(got.view_as(flt[k]), flt[k]), k
    # what quantize rounds is what the float path normalises
    params = draw_params(40, 48, 4, 11, 1, cfg)
    x = distort(_resize_box(_images(1)[0], params.box, params.flip, 32).unsqueeze(0), [params])
    assert (quantize(x).float() - x * 255).abs().max() <= 0.5 + 1e-4
    with pytest.raises(DinodistError, match="uint8"):
        data_device.normalize_uint8(flt["global"], mean, std)


def test_uint8_loader_batch_and_prepare_batch():
    src = _ListSource(_images(6))
    cfg = CropConfig(global_size=32, local_size=16, n_local=2, gram_size=16)
    with BatchLoader(src, cfg, 4, 1, rows=slice(1, 3), patch_size=8, prefetch=0) as flt, \
            BatchLoader(src, cfg, 4, 1, rows=slice(1, 3), patch_size=8, prefetch=0, uint8=True) as u8:
        a, b = flt.get(2), u8.get(2)
        assert set(b) == set(a) | {"crop_mean", "crop_std"}
        assert torch.equal(b["crop_mean"], torch.tensor(cfg.mean)) and b["crop_std"].dtype == torch.float32
        for k in a:
            if k not in data_device.CROP_KEYS:
                assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k
        ready = data_device.prepare_batch(b, "cpu")
        for k in data_device.CROP_KEYS:
            assert b[k].dtype == torch.uint8 and ready[k].dtype == torch.float32
            torch.testing.assert_close(ready[k], a[k], rtol=0, atol=data_device.UINT8_ATOL)
        # float batches pass through untouched: the default loader's callers see no change
        same = data_device.prepare_batch(a, "cpu")
        assert all(same[k] is a[k] for k in a)
        half = data_device.prepare_batch(b, "cpu", torch.bfloat16)
        assert half["collated_global_crops"].dtype == torch.bfloat16
        # what a teacher needs: one crop tensor, not the whole batch
        for x in (a, b):
            assert torch.equal(data_device.device_crops(x, "collated_global_crops", "cpu"),
                               data_device.prepare_batch(x, "cpu")["collated_global_crops"])
    with pytest.raises(DinodistError, match="crop_mean"):
        data_device.normalize_crops({k: v for k, v in b.items() if k != "crop_mean"})


def test_cuda_consumer_gets_pinned_batches_and_non_blocking_copies(monkeypatch):
    # no GPU here: CUDA is mocked, so this checks which path is chosen, not the copy itself
    src = _ListSource(_images(4))
    assert not data_device.wants_pinned(None) and not data_device.wants_pinned("cpu")
    assert data_device.wants_pinned("cuda") and data_device.wants_pinned(torch.device("cuda", 1))
    with pytest.raises(DinodistError, match="pin_memory"):
        BatchLoader(src, TINY, 2, 0, rows=slice(0, 2), patch_size=8, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pinned: list[torch.Tensor] = []  # kept alive, so their ids stay unique

    def fake_pin(self, *args, **kwargs):
        pinned.append(self.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    with BatchLoader(src, TINY, 2, 0, rows=slice(0, 2), patch_size=8, device="cuda:0", prefetch=1) as ld:
        assert ld.pin_memory
        for t in range(2):  # built and pinned in the calling thread, then by the prefetch thread
            batch = ld.get(t)
            ids = {id(x) for x in pinned}
            assert all(id(v) in ids for v in batch.values() if torch.is_tensor(v)), t
            assert torch.equal(batch["collated_global_crops"], ld.build(t)["collated_global_crops"])
    with BatchLoader(src, TINY, 2, 0, rows=slice(0, 2), patch_size=8, device="cpu", prefetch=0) as ld:
        assert not ld.pin_memory
    with BatchLoader(src, TINY, 2, 0, rows=slice(0, 2), patch_size=8, device="cuda", pin_memory=False) as ld:
        assert not ld.pin_memory

    copies = []

    def fake_to(self, device, non_blocking=False):
        copies.append((torch.device(device).type, non_blocking, self.dtype))
        return self

    pinned_ids = set()
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: id(self) in pinned_ids)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    batch = {"collated_global_crops": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "labels": torch.zeros(2),
             "crop_mean": torch.zeros(3), "crop_std": torch.ones(3), "global_batch_size": 2}
    pinned_ids.update({id(batch["collated_global_crops"]), id(batch["crop_mean"]), id(batch["crop_std"])})
    out = data_device.to_device(batch, "cuda:0")
    assert copies == [("cuda", True, torch.uint8), ("cuda", False, torch.float32),
                      ("cuda", True, torch.float32), ("cuda", True, torch.float32)]
    assert out["global_batch_size"] == 2
    copies.clear()
    data_device.to_device(batch, "cpu")  # never non-blocking off CUDA, pinned or not
    assert all(not nb for _, nb, _ in copies) and len(copies) == 4
