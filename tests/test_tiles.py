"""Tiling and blending: exact round trips, exact x4 shapes, constant images, and seams cut by the blend."""

from pathlib import Path

import numpy as np
import pytest
import skimage

from vdvae_sr_jax.data import read_image
from vdvae_sr_jax.resize import bicubic_upscale
from vdvae_sr_jax.tiles import TileBlender, axis_windows, blend_tiles, extract_tiles, pad_to_tile, tile_grid

SCALE = 4


def nearest(x: np.ndarray) -> np.ndarray:
    """Nearest-neighbour x4 of [..., H, W, C], a model whose tiles agree exactly wherever they overlap."""
    return np.repeat(np.repeat(x, SCALE, axis=-3), SCALE, axis=-2)


def upscale_tiled(image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """Tiles, nearest x4 per tile, then blended back."""
    grid = tile_grid(*image.shape[:2], tile, overlap)
    return blend_tiles(nearest(extract_tiles(image, grid).astype(np.float64)), grid)


def test_grid_positions_cover_the_image_with_the_last_tile_flush():
    grid = tile_grid(13, 7, tile=8, overlap=3)
    assert grid.tops == (0, 5) and grid.lefts == (0,) and grid.padded_shape == (13, 8)
    grid = tile_grid(40, 20, tile=8, overlap=2)
    assert grid.tops == (0, 6, 12, 18, 24, 30, 32) and grid.lefts == (0, 6, 12)
    assert grid.positions[:4] == [(0, 0), (0, 6), (0, 12), (6, 0)] and len(grid) == 21
    assert tile_grid(16, 16, tile=16, overlap=4).positions == [(0, 0)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=10, width=10, tile=8, overlap=8), "overlap=8"),
        (dict(height=10, width=10, tile=8, overlap=-1), "overlap=-1"),
        (dict(height=10, width=10, tile=0, overlap=0), "tile=0"),
        (dict(height=0, width=10, tile=8, overlap=2), "height=0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tile_grid(**kwargs)


def test_blend_rejects_tiles_of_the_wrong_shape():
    grid = tile_grid(20, 20, tile=8, overlap=2)
    with pytest.raises(ValueError, match=r"expected 9 HR tiles"):
        blend_tiles(np.zeros((8, 32, 32, 3)), grid)
    with pytest.raises(ValueError, match=r"expected 9 HR tiles"):
        blend_tiles(np.zeros((9, 30, 30, 3)), grid)


@pytest.mark.parametrize(
    "shape, tile, overlap",
    [((13, 7, 3), 8, 3), ((37, 29, 3), 8, 2), ((37, 29, 1), 8, 6), ((50, 41, 3), 16, 5), ((5, 3, 2), 8, 4),
     ((1, 1, 3), 8, 0), ((16, 16, 3), 16, 4), ((70, 9, 3), 16, 0)],
)
def test_nearest_tiles_blend_back_exactly(shape, tile, overlap):
    image = np.random.default_rng(0).uniform(0, 255, shape)
    out = upscale_tiled(image, tile, overlap)
    assert out.shape == (shape[0] * SCALE, shape[1] * SCALE, shape[2])
    np.testing.assert_allclose(out, nearest(image), rtol=0, atol=1e-10)


def test_single_tile_reproduces_its_content_bit_exactly():
    tile = np.random.default_rng(1).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    out = blend_tiles(tile, tile_grid(16, 16, tile=16, overlap=4))
    assert out.dtype == np.float32 and np.array_equal(out, tile[0])


@pytest.mark.parametrize("height, width", [(13, 7), (1, 31), (33, 17), (9, 9)])
def test_output_is_exactly_four_times_the_input(height, width):
    grid = tile_grid(height, width, tile=8, overlap=3)
    tiles = extract_tiles(np.zeros((height, width, 3), np.uint8), grid)
    assert tiles.shape == (len(grid), 8, 8, 3)
    assert blend_tiles(nearest(tiles), grid).shape == (4 * height, 4 * width, 3)


def test_constant_image_stays_constant():
    image = np.full((29, 19, 3), 117.25, np.float32)
    out = upscale_tiled(image, tile=8, overlap=5)
    np.testing.assert_allclose(out, 117.25, rtol=0, atol=1e-4)


def test_windows_are_one_at_the_border_and_crossfade_to_one_in_overlaps():
    first, middle, last = axis_windows((0, 6, 9), tile=8, scale=4, floor=1e-3)
    assert np.all(first[:24] == 1) and np.all(last[20:] == 1) and np.all(middle[8:12] == 1)
    # first and middle overlap by 2 LR pixels, middle and last by 5: the ramps are complementary there.
    np.testing.assert_allclose(first[24:] + middle[:8], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(middle[12:] + last[:20], 1.0, rtol=0, atol=1e-12)
    assert 0 < first[-1] < 0.05 and last[0] < 0.01 and min(w.min() for w in (first, middle, last)) >= 1e-3


def test_small_images_are_padded_by_reflection_then_symmetric_then_edge():
    column = np.arange(3, dtype=np.float64)[:, None, None]
    assert pad_to_tile(column, 5)[:, 0, 0].tolist() == [0, 1, 2, 1, 0]
    assert pad_to_tile(column, 6)[:, 0, 0].tolist() == [0, 1, 2, 2, 1, 0]
    assert pad_to_tile(column, 8)[:, 0, 0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    assert pad_to_tile(column, 8).shape == (8, 8, 1)


def seam_jumps(image: np.ndarray, grid) -> tuple[float, float]:
    """(max jump between neighbouring pixels across any tile edge, max jump between all other neighbours)."""
    jumps, edges = [], []
    for axis, starts in ((0, grid.tops), (1, grid.lefts)):
        diff = np.abs(np.diff(image, axis=axis)).max(axis=tuple(a for a in range(3) if a != axis))
        cuts = {SCALE * s for s in starts} | {SCALE * (s + grid.tile) for s in starts}
        on_edge = np.zeros(diff.shape, bool)
        on_edge[[c - 1 for c in cuts if 0 < c < image.shape[axis]]] = True
        jumps.append(diff)
        edges.append(on_edge)
    seam = max(d[e].max() for d, e in zip(jumps, edges))
    elsewhere = max(d[~e].max() for d, e in zip(jumps, edges))
    return float(seam), float(elsewhere)


def hr_region(top: int, left: int, tile: int) -> tuple[slice, slice]:
    """The HR pixels of the LR tile at (top, left)."""
    return slice(SCALE * top, SCALE * (top + tile)), slice(SCALE * left, SCALE * (left + tile))


def stochastic_tiles(truth: np.ndarray, grid, rng) -> np.ndarray:
    """HR tiles of the true image, each shifted by its own random offset, as samples of a stochastic model differ."""
    tiles = np.stack([truth[hr_region(top, left, grid.tile)] for top, left in grid.positions])
    return tiles + rng.normal(0.0, 8.0, len(grid))[:, None, None, None]


def paste(tiles: np.ndarray, grid, shape) -> np.ndarray:
    """No blending: each tile overwrites what came before it."""
    out = np.zeros(shape)
    for tile, (top, left) in zip(tiles, grid.positions):
        out[hr_region(top, left, grid.tile)] = tile
    return out


@pytest.mark.parametrize("overlap", [2, 4])
def test_blending_removes_the_seams_between_disagreeing_tiles(overlap):
    photo = read_image(Path(skimage.__file__).parent / "data" / "astronaut.png")
    truth = bicubic_upscale(photo[100:137, 200:229]).astype(np.float64)
    rng = np.random.default_rng(0)
    hard = tile_grid(37, 29, tile=8, overlap=0)
    soft = tile_grid(37, 29, tile=8, overlap=overlap)
    # Seams measured in the error against the truth, so the photo's own edges do not mask them.
    pasted = seam_jumps(paste(stochastic_tiles(truth, hard, rng), hard, truth.shape) - truth, hard)
    blended = seam_jumps(blend_tiles(stochastic_tiles(truth, soft, rng), soft) - truth, soft)
    print(f"overlap {overlap}: seam / elsewhere jump, pasted {pasted[0]:.2f} / {pasted[1]:.2f}, "
          f"blended {blended[0]:.2f} / {blended[1]:.2f}")
    assert pasted[0] > 5.0 and pasted[1] < 1e-9
    assert blended[0] * 3 < pasted[0]
    assert blended[0] < blended[1]


def test_blender_hands_back_each_band_once_no_later_tile_reaches_it():
    image = np.random.default_rng(2).uniform(0, 255, (37, 29, 3))
    grid = tile_grid(37, 29, tile=8, overlap=3)  # 7 rows of 6 tiles; tops 0, 5, 10, 15, 20, 25, 29
    blender = TileBlender(grid, SCALE, 3, np.float64)
    assert blender.sums.shape == (32, 4 * 29, 3)  # one row of tiles, whatever the image's height
    bands = [blender.add(tile) for tile in nearest(extract_tiles(image, grid))]
    finished = [(k, band[0]) for k, band in enumerate(bands) if band is not None]
    assert [k for k, _ in finished] == [6 * r + 5 for r in range(7)]  # after the last tile of each row
    assert [(rows.start, rows.stop) for _, rows in finished] == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100),
                                                                  (100, 116), (116, 148)]
    np.testing.assert_allclose(np.concatenate([b[1] for b in bands if b is not None]), nearest(image), atol=1e-10)
    with pytest.raises(ValueError, match="all 42 tiles were already added"):
        blender.add(np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=r"expected an HR tile of shape \(32, 32, 3\), got \(32, 32, 1\)"):
        TileBlender(grid, SCALE, 3).add(np.zeros((32, 32, 1)))
