"""Figures for people: grids of images with column labels, and heat maps with a colour scale."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_COLUMN_WIDTH = 96  # narrower images are enlarged (nearest neighbour) so that labels fit and pixels show


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_block(text: str, width: int) -> np.ndarray:
    """`text` wrapped to `width` pixels and centred, black on white, as a uint8 RGB array."""
    font = _font()
    chars = max(1, width // max(1, int(font.getlength("n"))))
    lines = textwrap.wrap(text, chars) or [""]
    line_height = font.getbbox("Ag")[3] + 2
    canvas = Image.new("RGB", (width, line_height * len(lines) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text(((width - font.getlength(line)) / 2, 2 + i * line_height), line, fill="black", font=font)
    return np.asarray(canvas)


def grid(rows: list[np.ndarray], labels: list[str] | None = None, pad: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 images [n, H, W, 3] as one image with white gutters and, if given, a label over
    each column; images narrower than `MIN_COLUMN_WIDTH` are enlarged when labelled."""
    h, w = rows[0].shape[1], rows[0].shape[2]
    zoom = -(-MIN_COLUMN_WIDTH // w) if labels else 1
    rows = [np.repeat(np.repeat(row, zoom, axis=1), zoom, axis=2) for row in rows]
    n, h, w = max(len(r) for r in rows), h * zoom, w * zoom
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} columns")
    header = [_text_block(label, w) for label in labels] if labels else []
    top = max((b.shape[0] for b in header), default=0)
    out = np.full((top + len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for j, block in enumerate(header):
        out[: block.shape[0], pad + j * (w + pad) : pad + j * (w + pad) + w] = block
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = top + pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = image
    return out


def save_grid(path: str | Path, rows: list[np.ndarray], labels: list[str] | None = None, pad: int = 2) -> Path:
    """Writes `grid(rows, labels, pad)` as a PNG."""
    Image.fromarray(grid(rows, labels, pad)).save(path)
    return Path(path)


def hot(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as the 'hot' colour map (black, red, yellow, white), uint8 RGB."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)


def with_colour_scale(heat_rgb: np.ndarray, top_value: float, unit: str) -> np.ndarray:
    """A `hot` heat map with a vertical colour bar on its right, labelled 0 at the bottom and `top_value` (the value
    white stands for) at the top, in `unit`."""
    h = heat_rgb.shape[0]
    bar_height = max(h, 64)
    bar = np.repeat(hot(np.linspace(1.0, 0.0, bar_height))[:, None], 12, axis=1)
    labels = [f"{top_value:.3g} {unit}".strip(), "0"]
    width = max(int(_font().getlength(t)) for t in labels) + 6
    column = np.full((bar_height, 12 + 4 + width, 3), 255, np.uint8)
    column[:, :12] = bar
    canvas = Image.fromarray(column)
    draw = ImageDraw.Draw(canvas)
    line = _font().getbbox("Ag")[3]
    draw.text((16, 0), labels[0], fill="black", font=_font())
    draw.text((16, bar_height - line - 1), labels[1], fill="black", font=_font())
    out = np.full((max(h, bar_height), heat_rgb.shape[1] + 6 + column.shape[1], 3), 255, np.uint8)
    out[:h, : heat_rgb.shape[1]] = heat_rgb
    out[:bar_height, heat_rgb.shape[1] + 6 :] = np.asarray(canvas)
    return out
