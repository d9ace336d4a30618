"""`dinodist viz pca|similarity`: the PCA and similarity math (core/eval/pca.py), the picture's layout and
content, and the one-line errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinodist.core.errors import DinodistError
from dinodist.core.eval.backbone import load_eval_backbone
from dinodist.core.eval.pca import (
    patch_features,
    pca_basis,
    pca_rgb,
    point_to_patch,
    prepare,
    read_image,
    robust_unit,
    similarity_maps,
)
from dinodist.core.models import build_backbone, save_backbone
from dinodist.core.models.io import write_sidecar
from dinodist.orchestrator import viz
from dinodist.orchestrator.cli import main
from dinodist.orchestrator.commands.viz import parse_point, point_pixels

SIZE = 32  # 4x4 patches of 8 px
TILE = 48  # 12 px per patch: nearest upsampling repeats each patch exactly


def _image(path, seed: int, size=(40, 30)) -> str:
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 2] //= 4  # a dark top half: structure a feature map can show
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"seed{seed}.pth"
        save_backbone(build_backbone("tiny-vits", depth=2), path)
        write_sidecar(path, {"arch": "tiny-vits", "overrides": {"depth": 2}, "image_size": SIZE})
        ckpts.append(str(path))
    images = [_image(root / "a.png", 0), _image(root / "b.jpg", 1, (24, 40)), _image(root / "c.png", 2)]
    return root, ckpts, images


def _cli(*argv: str) -> int:
    return main(["viz", *argv])


def _tile(png: np.ndarray, row: int, col: int, tile: int = TILE) -> np.ndarray:
    top = viz.TITLE_H + row * (viz.PAD + viz.LABEL_H + tile) + viz.PAD + viz.LABEL_H
    left = viz.PAD + col * (tile + viz.PAD)
    return png[top:top + tile, left:left + tile]


def _expected_pca(ckpt: str, images: list[str]) -> np.ndarray:
    model, _, _ = load_eval_backbone(ckpt, None)
    x, _ = prepare([read_image(p) for p in images], SIZE)
    rgb = viz.to_uint8(pca_rgb(patch_features(model, x)).numpy())
    return rgb.repeat(TILE // (SIZE // 8), axis=1).repeat(TILE // (SIZE // 8), axis=2)


# ------------------------------------------------------------------------------------------- the math


def test_pca_components_are_orthonormal_and_sorted():
    x = torch.randn(200, 16) @ torch.randn(16, 16)
    mean, comps, var = pca_basis(x, 5)
    assert comps.shape == (5, 16)
    assert torch.allclose(comps @ comps.T, torch.eye(5), atol=1e-5)
    assert torch.allclose(mean, x.mean(0), atol=1e-5)
    assert bool((var[:-1] >= var[1:]).all())
    # the variance along each direction is what the basis reports
    assert torch.allclose(((x - mean) @ comps.T).var(0), var, rtol=1e-4)


def test_pca_recovers_a_low_rank_subspace_with_a_fixed_sign():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 2))[0].T  # two orthonormal directions in 12-D
    x = torch.randn(300, 2) * torch.tensor([5.0, 2.0]) @ basis + 3.0
    _, comps, var = pca_basis(x, 3)
    assert var[2] < 1e-6 * var[0]  # rank 2: nothing left for a third component
    # the first two components span the planted plane: projecting them onto it loses nothing
    proj = comps[:2] @ basis.T @ basis
    assert torch.allclose(proj, comps[:2], atol=1e-5)
    # negating the data flips every SVD direction; the sign convention undoes that
    assert torch.allclose(pca_basis(-x, 3)[1][:2], comps[:2], atol=1e-5)


def test_pca_rgb_colours_the_structure_of_the_features():
    # four regions of an 8x8 grid (two columns each), each a feature vector plus a little noise: four
    # points span three dimensions after centring, exactly what three colour channels show
    torch.manual_seed(0)
    centres = torch.randn(4, 32) * 4
    region = torch.arange(8).repeat(8, 1) // 2
    feats = centres[region] + 0.05 * torch.randn(8, 8, 32)
    rgb = pca_rgb(feats[None])[0]
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    means = torch.stack([rgb[region == r].mean(0) for r in range(4)])
    spread = max(float(rgb[region == r].std(0).max()) for r in range(4))
    gaps = torch.cdist(means, means)[torch.triu_indices(4, 4, 1).unbind()]
    assert spread < 0.05 and float(gaps.min()) > 0.5


def test_robust_unit_clamps_outliers_and_keeps_flat_columns_grey():
    v = torch.stack([torch.cat([torch.linspace(0, 1, 998), torch.tensor([100.0, -100.0])]),
                     torch.full((1000,), 7.0)], dim=1)
    out = robust_unit(v)
    assert out.min() == 0 and out.max() == 1
    assert torch.all(out[:, 1] == 0.5)
    # the bulk keeps its spread: one outlier does not squash it into a single value
    assert float(out[:998, 0].max() - out[:998, 0].min()) > 0.9


def test_similarity_of_a_patch_to_itself_is_one_and_maps_are_cosines():
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 5, 16)
    sims = similarity_maps(feats, 1, 2, 3)
    assert sims.shape == (2, 4, 5)
    assert float(sims.min()) >= -1 and float(sims.max()) <= 1
    assert sims[1, 2, 3] == pytest.approx(1.0, abs=1e-6)
    q = feats[1, 2, 3]
    assert float(sims[0, 1, 4]) == pytest.approx(float(torch.cosine_similarity(feats[0, 1, 4], q, dim=0)),
                                                 abs=1e-6)
    with pytest.raises(DinodistError):
        similarity_maps(feats, 2, 0, 0)


def test_points_name_pixels_or_fractions():
    assert parse_point("3,17") == (3.0, 17.0, False)
    assert point_pixels("3,17", 32) == (3, 17)
    assert point_pixels("0.5,0.25", 32) == (16, 8)
    assert point_pixels("1.0,1", 32) == (31, 31)  # the far edge is the last pixel
    assert point_to_patch(31, 8, 8, (4, 4)) == (1, 3)
    for bad in ("3", "a,b", "1,2,3", "", "1;2"):
        with pytest.raises(DinodistError, match="--point"):
            parse_point(bad)
    for bad in ("32,0", "-1,4", "1.5,0.5"):
        with pytest.raises(DinodistError, match="--point"):
            point_pixels(bad, 32)


# ---------------------------------------------------------------------------------------- the picture


def test_pca_picture_has_the_layout_size_and_each_models_maps(files, capsys):
    root, ckpts, images = files
    out = root / "pca.png"
    assert _cli("pca", *images, "--checkpoint", ckpts[0], "--checkpoint", ckpts[1],
                "--tile", str(TILE), "--out", str(out)) == 0
    assert f"{SIZE} px" in capsys.readouterr().out  # the size the sidecars record
    png = np.asarray(Image.open(out).convert("RGB"))
    width = 3 * TILE + 4 * viz.PAD
    height = viz.TITLE_H + 3 * (viz.PAD + viz.LABEL_H + TILE) + viz.PAD  # inputs + 2 model rows
    assert (png.shape[1], png.shape[0]) == (width, height) == viz.grid_size(3, 3, TILE)
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]
    for r, ckpt in enumerate(ckpts, start=1):
        expected = _expected_pca(ckpt, images)
        for c in range(3):
            assert np.array_equal(_tile(png, r, c), expected[c]), (r, c)
    # two inits of the same arch are different models: different pictures
    assert not np.array_equal(_tile(png, 1, 0), _tile(png, 2, 0))


def test_similarity_picture_marks_the_point_and_differs_between_models(files):
    root, ckpts, images = files
    out = root / "sim.png"
    tile = 160  # 40 px per patch: room for the mark inside the query patch
    assert _cli("similarity", images[0], images[1], "--checkpoint", ckpts[0], "--checkpoint", ckpts[1],
                "--point", "20,20", "--tile", str(tile), "--out", str(out)) == 0
    png = np.asarray(Image.open(out).convert("RGB"))
    assert (png.shape[1], png.shape[0]) == viz.grid_size(3, 2, tile)
    # pixel (20, 20) lies in patch (2, 2), tile pixels 80..119; the mark covers its centre, so look at
    # its corners: the query patch is itself, the top of the colour scale
    red = viz.colorize_similarity(np.array([[1.0]]))[0, 0]
    for r in (1, 2):
        for corner in (81, 118):
            assert np.array_equal(_tile(png, r, 0, tile)[corner, corner], red)
    assert not np.array_equal(_tile(png, 1, 1, tile), _tile(png, 2, 1, tile))
    # the mark is drawn on the input at the point (20.5 / 32 of the tile), not elsewhere
    is_mark = (_tile(png, 0, 0, tile) == viz.MARK).all(axis=2)
    ys, xs = np.nonzero(is_mark)
    assert len(ys) and abs(ys.mean() - 102.5) < 2 and abs(xs.mean() - 102.5) < 2


def test_random_init_rows_follow_the_seed(files):
    root, ckpts, images = files
    out = root / "rand.png"
    assert _cli("pca", images[0], "--checkpoint", ckpts[0], "--random-init", "--arch", "tiny-vits",
                "--seed", "3", "--image-size", str(SIZE), "--tile", str(TILE), "--out", str(out)) == 0
    png = np.asarray(Image.open(out).convert("RGB"))
    assert (png.shape[1], png.shape[0]) == viz.grid_size(3, 1, TILE)
    assert np.array_equal(_tile(png, 1, 0), _expected_pca(ckpts[0], images[:1])[0])
    assert not np.array_equal(_tile(png, 1, 0), _tile(png, 2, 0))


# ------------------------------------------------------------------------------------------- errors


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert _cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dinodist viz: error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_errors_are_one_line(files, tmp_path, capsys):
    root, ckpts, images = files
    out = str(tmp_path / "x.png")
    ck = ["--checkpoint", ckpts[0]]
    _one_line_error(capsys, ["pca", str(tmp_path / "missing.png"), *ck, "--out", out],
                    "missing.png", "no such")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _one_line_error(capsys, ["pca", str(broken), *ck, "--out", out], "broken.png", "cannot read")
    _one_line_error(capsys, ["pca", images[0], *ck, "--image-size", "36", "--out", out],
                    "--image-size 36", "patch size 8")
    _one_line_error(capsys, ["similarity", images[0], *ck, "--point", "12;4", "--out", out], "--point")
    _one_line_error(capsys, ["similarity", images[0], *ck, "--point", "40,4", "--out", out],
                    "--point 40,4", f"{SIZE}x{SIZE}")
    _one_line_error(capsys, ["pca", images[0], *ck, "--out", str(tmp_path / "no" / "x.png")],
                    "--out", "does not exist")
    _one_line_error(capsys, ["pca", images[0], *ck, "--out", str(tmp_path / "x.jpg")], "--out", ".png")
    _one_line_error(capsys, ["pca", images[0], "--out", out], "--arch")
    _one_line_error(capsys, ["pca", images[0], *ck, "--tile", "0", "--out", out], "--tile")
    assert not os.path.exists(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_unwritable_out_folder_is_one_line(files, tmp_path, capsys):
    _, ckpts, images = files
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_line_error(capsys, ["pca", images[0], "--checkpoint", ckpts[0], "--out", str(locked / "x.png")],
                    "not writable")


def test_help_describes_both_pictures(capsys):
    for picture, needle in (("pca", "first three components"), ("similarity", "--point X,Y")):
        with pytest.raises(SystemExit) as exc:
            _cli(picture, "--help")
        assert exc.value.code == 0
        assert needle in " ".join(capsys.readouterr().out.split())  # argparse wraps lines
