"""Figures: grids keep their images exactly, labels sit over their columns, heat maps get a labelled colour bar."""

import numpy as np
import pytest

from vdvae_sr_jax import figures


def _rows():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8) for _ in range(2)]


def test_an_unlabelled_grid_places_each_image_between_white_gutters():
    rows = _rows()
    out = figures.grid(rows, pad=2)
    assert out.shape == (2 * 22 + 2, 3 * 32 + 2, 3)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            np.testing.assert_array_equal(out[2 + i * 22 : 2 + i * 22 + 20, 2 + j * 32 : 2 + j * 32 + 30], image)
    assert (out[:2] == 255).all() and (out[:, :2] == 255).all()


def test_labels_are_drawn_over_their_columns_and_narrow_images_are_enlarged():
    rows = _rows()
    out = figures.grid(rows, labels=["LR", "bicubic", "t=0.6 mean"], pad=2)
    zoom = -(-figures.MIN_COLUMN_WIDTH // 30)  # 30-pixel images become 120 wide
    w, h = 30 * zoom, 20 * zoom
    top = out.shape[0] - 2 * (h + 2) - 2
    assert top > 8  # a header of text
    enlarged = np.repeat(np.repeat(rows[1][2], zoom, 0), zoom, 1)
    y, x = top + 2 + (h + 2), 2 + 2 * (w + 2)
    np.testing.assert_array_equal(out[y : y + h, x : x + w], enlarged)
    for j in range(3):  # dark text pixels inside each column's header, none in the gutters
        header = out[:top, 2 + j * (w + 2) : 2 + j * (w + 2) + w]
        assert (header.min(axis=-1) < 128).sum() > 10
    assert (out[:top, 2 + w : 4 + w] == 255).all()
    with pytest.raises(ValueError, match="2 labels for 3 columns"):
        figures.grid(rows, labels=["a", "b"])


def test_a_heat_map_gets_a_colour_bar_from_black_to_white_with_its_top_value():
    heat = figures.hot(np.tile(np.linspace(0, 1, 50), (40, 1)))
    assert tuple(heat[0, 0]) == (0, 0, 0) and tuple(heat[0, -1]) == (255, 255, 255)
    out = figures.with_colour_scale(heat, 12.5, "grey levels")
    np.testing.assert_array_equal(out[:40, :50], heat)
    bar = out[:, 50 + 6 : 50 + 6 + 12]
    assert tuple(bar[0, 0]) == (255, 255, 255) and tuple(bar[-1, 0]) == (0, 0, 0)
    text = out[:, 50 + 6 + 16 :]
    assert (text.min(axis=-1) < 128).sum() > 20  # the labels "12.5 grey levels" and "0"
