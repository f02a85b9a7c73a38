"""Overlapping tiles, so a model that takes fixed square LR tiles can upscale an image of any size without seams."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    """Where the square LR tiles of one image lie: tile starts per axis, in LR pixels of the padded image."""

    tile: int
    height: int
    width: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """(H, W) after reflection padding of axes shorter than a tile; the tiles cover exactly this."""
        return max(self.height, self.tile), max(self.width, self.tile)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row-major: the order of `extract_tiles` and `blend_tiles`."""
        return [(top, left) for top in self.tops for left in self.lefts]

    def position(self, index: int) -> tuple[int, int]:
        """(top, left) of tile `index` in `positions` order, without listing every position."""
        row, col = divmod(index, len(self.lefts))
        return self.tops[row], self.lefts[col]

    def __len__(self) -> int:
        """The number of tiles."""
        return len(self.tops) * len(self.lefts)


def axis_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile starts along one axis of `length` >= `tile`: every `tile - overlap` pixels, the last flush with the end."""
    last = length - tile
    return tuple(range(0, last, tile - overlap)) + (last,)


def tile_grid(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    """The tiles covering an H x W LR image, neighbours overlapping by at least `overlap` LR pixels."""
    if tile < 1:
        raise ValueError(f"tile must be at least 1 pixel, got tile={tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got overlap={overlap}")
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1 x 1 pixels, got height={height}, width={width}")
    tops = axis_starts(max(height, tile), tile, overlap)
    lefts = axis_starts(max(width, tile), tile, overlap)
    return TileGrid(tile=tile, height=height, width=width, tops=tops, lefts=lefts)


def pad_mode(length: int, pad: int) -> str:
    """np.pad mode for `pad` extra pixels after `length`: 'reflect' when one mirror suffices, else the nearest safe."""
    if pad < length:
        return "reflect"
    return "symmetric" if pad <= length else "edge"


def pad_to_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """`image` [H, W, C] padded at the bottom and right, by reflection, to at least tile x tile."""
    padded = image
    for axis in (0, 1):
        pad = tile - image.shape[axis]
        if pad > 0:
            widths = [(0, 0)] * image.ndim
            widths[axis] = (0, pad)
            padded = np.pad(padded, widths, mode=pad_mode(image.shape[axis], pad))
    return padded


def extract_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The LR tiles [n_tiles, tile, tile, C] of `image` [H, W, C], in `grid.positions` order."""
    if image.ndim != 3 or image.shape[:2] != (grid.height, grid.width):
        raise ValueError(f"expected an image of shape ({grid.height}, {grid.width}, C), got {image.shape}")
    padded = pad_to_tile(image, grid.tile)
    return np.stack([tile_at(padded, grid, k) for k in range(len(grid))])


def tile_at(padded: np.ndarray, grid: TileGrid, index: int) -> np.ndarray:
    """LR tile `index` [tile, tile, C] of an image already padded by `pad_to_tile` (a view, not a copy)."""
    top, left = grid.position(index)
    return padded[top : top + grid.tile, left : left + grid.tile]


def ramp(n: int) -> np.ndarray:
    """n raised-cosine weights rising from near 0 to near 1; ramp(n) + ramp(n)[::-1] == 1, so crossfades sum to 1."""
    t = (np.arange(n) + 0.5) / n
    return 0.5 - 0.5 * np.cos(np.pi * t)


def axis_window(size: int, lead: int, trail: int, floor: float) -> np.ndarray:
    """1-D weights of a tile `size` pixels long: ramps over its `lead` and `trail` overlaps, 1 inside, >= floor."""
    window = np.ones(size)
    if lead:
        window[:lead] = np.minimum(window[:lead], ramp(lead))
    if trail:
        window[size - trail :] = np.minimum(window[size - trail :], ramp(trail)[::-1])
    return np.maximum(window, floor)


def axis_windows(starts: tuple[int, ...], tile: int, scale: int, floor: float) -> list[np.ndarray]:
    """HR weights per tile along one axis; each side ramps over its real overlap with the neighbour, none at borders."""
    windows = []
    for i, start in enumerate(starts):
        lead = starts[i - 1] + tile - start if i > 0 else 0
        trail = start + tile - starts[i + 1] if i + 1 < len(starts) else 0
        windows.append(axis_window(tile * scale, lead * scale, trail * scale, floor))
    return windows


class TileBlender:
    """Blends HR tiles, given one at a time in `grid.positions` order, into the image band by band.

    Overlaps are crossfaded with raised-cosine windows normalised by their sum. A band of HR rows is handed back as
    soon as no later tile reaches it, so only one row of tiles is held whatever the image's height.
    """

    def __init__(self, grid: TileGrid, scale: int, channels: int, dtype=np.float32, floor: float = 1e-3):
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got floor={floor}")
        self.grid, self.scale, self.dtype = grid, scale, dtype
        self.size = scale * grid.tile
        self.row_windows = axis_windows(grid.tops, grid.tile, scale, floor)
        self.col_windows = axis_windows(grid.lefts, grid.tile, scale, floor)
        width = grid.padded_shape[1] * scale
        self.sums = np.zeros((self.size, width, channels), dtype)  # weighted sums over the current row of tiles
        self.weights = np.zeros((self.size, width, 1), dtype)
        self.added = 0
        self.rows_done = 0

    def add(self, hr_tile: np.ndarray) -> tuple[slice, np.ndarray] | None:
        """Adds the next HR tile [tile*scale, tile*scale, C]; returns (rows, values) of the image's HR rows
        [n, W*scale, C] that it completes, or None while its row of tiles is unfinished."""
        if self.added == len(self.grid):
            raise ValueError(f"all {len(self.grid)} tiles were already added")
        if hr_tile.shape != (self.size, self.size, self.sums.shape[2]):
            raise ValueError(f"expected an HR tile of shape {(self.size, self.size, self.sums.shape[2])}, "
                             f"got {hr_tile.shape}")
        row, col = divmod(self.added, len(self.grid.lefts))
        weight = np.outer(self.row_windows[row], self.col_windows[col]).astype(self.dtype)[:, :, None]
        x = self.grid.lefts[col] * self.scale
        self.sums[:, x : x + self.size] += weight * hr_tile
        self.weights[:, x : x + self.size] += weight
        self.added += 1
        return self._finish_row(row) if col + 1 == len(self.grid.lefts) else None

    def _finish_row(self, row: int) -> tuple[slice, np.ndarray]:
        """The HR rows above the next row of tiles (all rows left, after the last), and the buffers moved up."""
        tops, height = self.grid.tops, self.grid.height
        n = self.scale * (tops[row + 1] - tops[row] if row + 1 < len(tops) else height - tops[row])
        band = (self.sums[:n] / self.weights[:n])[:, : self.grid.width * self.scale]
        for buffer in (self.sums, self.weights):
            buffer[: self.size - n] = buffer[n:]
            buffer[self.size - n :] = 0
        rows = slice(self.rows_done, self.rows_done + n)
        self.rows_done += n
        return rows, band


def blend_tiles(hr_tiles: np.ndarray, grid: TileGrid, floor: float = 1e-3) -> np.ndarray:
    """The (H*scale, W*scale, C) image from HR tiles [n_tiles, tile*scale, tile*scale, C] in `grid.positions` order,
    blended by a `TileBlender`; the scale is read off the tile size."""
    shape = hr_tiles.shape
    scale = shape[1] // grid.tile if hr_tiles.ndim == 4 else 0
    if scale < 1 or shape[:3] != (len(grid), scale * grid.tile, scale * grid.tile):
        raise ValueError(f"expected {len(grid)} HR tiles [n, k*{grid.tile}, k*{grid.tile}, C], got {shape}")
    blender = TileBlender(grid, scale, shape[3], np.result_type(hr_tiles.dtype, np.float32), floor)
    return np.concatenate([done[1] for done in map(blender.add, hr_tiles) if done is not None])
