"""Drawing for `dinodist viz` (a grid of tiles) and the PNG writing `viz` and `report` share.

Torch-free: the computation (core/eval/pca.py) hands over numpy arrays. The grid is composed with
Pillow so its size in pixels follows from the layout alone (`grid_size`), which the tests check:

    title strip (two lines)                         TITLE_H
    PAD | caption per column ...                    LABEL_H   (the input row: file names)
          tile tile tile ...                        tile
    PAD | row label (model description)             LABEL_H
          tile tile tile ...                        tile
    ... PAD at the bottom; PAD between and around the columns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dinodist.core.errors import DinodistError

PAD = 6
FONT_SIZE = 13
LINE_H = 17
TITLE_H = 2 * LINE_H + 4
LABEL_H = 20
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MARK = (0, 220, 0)
# diverging, white at 0: a similarity map reads as "like the point" (red) vs "opposite" (blue)
SIMILARITY_CMAP = "RdBu_r"


def check_png_out(out: str | os.PathLike, flag: str = "--out") -> Path:
    """The output path, checked before any work: a .png file name in an existing, writable folder."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise DinodistError(f"{flag} {path}: must be a .png file name")
    if path.is_dir():
        raise DinodistError(f"{flag} {path}: is a folder, expected a .png file name")
    folder = path.parent
    if not folder.is_dir():
        raise DinodistError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DinodistError(f"{flag} {path}: folder {folder} is not writable")
    return path


def write_atomic(path: Path, save: Callable[[Path], None]) -> None:
    """`save(tmp)` next to `path`, then rename: a reader (a viewer, a web page) never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise DinodistError(f"--out {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def grid_size(n_rows: int, n_cols: int, tile: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of n_rows x n_cols tiles of tile x tile pixels."""
    return n_cols * tile + (n_cols + 1) * PAD, TITLE_H + n_rows * (PAD + LABEL_H + tile) + PAD


def colorize_similarity(sim: np.ndarray) -> np.ndarray:
    """Cosine similarity [h, w] in [-1, 1] -> uint8 RGB [h, w, 3], on a fixed scale so rows compare."""
    from matplotlib import colormaps

    rgba = colormaps[SIMILARITY_CMAP]((np.clip(sim, -1, 1) + 1) / 2)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float [h, w, 3] in [0, 1] (a PCA map) or uint8 -> uint8."""
    if rgb.dtype == np.uint8:
        return rgb
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font, width: float) -> str:
    """`text`, shortened in the middle with an ellipsis to fit `width` (paths differ at both ends)."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        short = text[: (keep + 1) // 2] + "…" + text[len(text) - keep // 2:]
        if font.getlength(short) <= width:
            return short
    return "…"


def _mark(draw: ImageDraw.ImageDraw, x: float, y: float, tile: int) -> None:
    r = max(4, tile // 28)
    for colour, width in ((TEXT, 4), (MARK, 2)):  # a dark outline keeps the mark visible on any colour
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
        draw.line((x - 2 * r, y, x - r, y), fill=colour, width=width)
        draw.line((x + r, y, x + 2 * r, y), fill=colour, width=width)
        draw.line((x, y - 2 * r, x, y - r), fill=colour, width=width)
        draw.line((x, y + r, x, y + 2 * r), fill=colour, width=width)


def compose_grid(
    title: list[str],
    captions: list[str],
    inputs: list[np.ndarray],
    rows: list[tuple[str, list[np.ndarray]]],
    tile: int,
    marks: dict[tuple[int, int], tuple[float, float]] | None = None,
) -> Image.Image:
    """The picture: `title` (at most two lines), `inputs` (uint8 [S, S, 3]) captioned per column, then
    one labelled row per model.

    Maps of any grid size are upsampled to the tile with nearest neighbours (one flat square per patch);
    the input photos are resized smoothly. `marks[(r, c)] = (fx, fy)` draws a point at the fractions
    (fx, fy) of tile (r, c), where row 0 is the input row.
    """
    n_cols = len(inputs)
    if n_cols == 0 or len(captions) != n_cols or any(len(tiles) != n_cols for _, tiles in rows):
        raise ValueError("compose_grid: every row needs one tile per input image")
    width, height = grid_size(len(rows) + 1, n_cols, tile)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, line in enumerate(title[:2]):
        draw.text((PAD, 2 + i * LINE_H), _fit(line, font, width - 2 * PAD), fill=TEXT, font=font)
    all_rows = [("", inputs), *rows]
    for r, (label, tiles) in enumerate(all_rows):
        top = TITLE_H + r * (PAD + LABEL_H + tile) + PAD
        if r == 0:
            for c, cap in enumerate(captions):
                draw.text((PAD + c * (tile + PAD), top + 2), _fit(cap, font, tile), fill=TEXT, font=font)
        else:
            draw.text((PAD, top + 2), _fit(label, font, width - 2 * PAD), fill=TEXT, font=font)
        for c, arr in enumerate(tiles):
            img = Image.fromarray(to_uint8(arr))
            img = img.resize((tile, tile), Image.Resampling.BICUBIC if r == 0 else Image.Resampling.NEAREST)
            x0, y0 = PAD + c * (tile + PAD), top + LABEL_H
            canvas.paste(img, (x0, y0))
            if marks and (r, c) in marks:
                fx, fy = marks[(r, c)]
                _mark(draw, x0 + fx * tile, y0 + fy * tile, tile)
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
