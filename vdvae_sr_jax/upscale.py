"""Super-resolving images of any size: model-sized LR tiles, sampled in device-sized batches, blended back.

Each tile is drawn with its own key, folded from (seed, image, sample, tile), so an output depends on the
seed alone, not on the batch size or the number of devices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from vdvae_sr_jax import data, figures, image_io, tiles
from vdvae_sr_jax import distributions as D
from vdvae_sr_jax.backprojection import back_project
from vdvae_sr_jax.model import DECODINGS, VDVAESR


@dataclass(frozen=True)
class Settings:
    """How to upscale: temperature (one number or one per layer), samples per image, seed, tile overlap (LR
    pixels), tiles per device per batch, whether to save a per-pixel standard-deviation map, the largest LR
    image (width x height) a file may hold (0 for no limit), how pixels are decoded ('sample' or 'mean', see
    VDVAE.pixels), and the steps of back-projection toward the LR input on each whole output (0: none)."""

    temperature: float | tuple[float, ...] = 0.1
    num_samples: int = 1
    seed: int = 0
    overlap: int = 2
    batch_per_device: int = 8
    std_map: bool = False
    max_pixels: int = 25_000_000
    decode: str = "sample"
    back_projection_steps: int = 0

    @classmethod
    def from_config(cls, upscale) -> Settings:
        """Settings from a config's `upscale` section."""
        temperature = upscale.temperature
        temperature = float(temperature) if np.ndim(temperature) == 0 else tuple(float(t) for t in temperature)
        if upscale.num_samples < 1:
            raise ValueError(f"upscale.num_samples must be at least 1, got {upscale.num_samples}")
        if upscale.max_pixels < 0:
            raise ValueError(f"upscale.max_pixels must be 0 (no limit) or more, got {upscale.max_pixels}")
        if upscale.decode not in DECODINGS:
            raise ValueError(f"upscale.decode must be one of {DECODINGS}, got {upscale.decode!r}")
        if upscale.back_projection_steps < 0:
            raise ValueError(f"upscale.back_projection_steps must be 0 (none) or more, got "
                             f"{upscale.back_projection_steps}")
        return cls(temperature, int(upscale.num_samples), int(upscale.seed), int(upscale.overlap),
                   int(upscale.batch_per_device), bool(upscale.std_map), int(upscale.max_pixels), upscale.decode,
                   int(upscale.back_projection_steps))


@partial(jax.jit, static_argnames=("model", "decode"))
def _sample_tiles(model: VDVAESR, params, lr_input, temperature, keys, decode: str = "sample") -> jax.Array:
    """uint8 HR tiles, each from p(z | its LR tile) with its own key, pixels decoded by `decode`."""

    def one(x, key):
        out = model.apply({"params": params}, x[None], temperature, decode=decode, rngs={"sample": key},
                          method=VDVAESR.sample)
        return out[0]

    return D.pixels_to_uint8(jax.vmap(one)(lr_input, keys), decode)


class Upscaler:
    """Super-resolves uint8 RGB arrays of any size x`scale` with a VDVAE-SR, over all devices."""

    def __init__(self, model: VDVAESR, params, data_config, settings: Settings):
        if not isinstance(model, VDVAESR):
            raise ValueError("upscaling needs a VDVAE-SR config (one with model.lr_enc_blocks)")
        self.model, self.params, self.data, self.settings = model, params, data_config, settings
        self.tile, self.scale = model.lr_image_size, model.image_size // model.lr_image_size
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.sharding = NamedSharding(mesh, P("data"))
        self.batch = settings.batch_per_device * jax.device_count()
        self.temperature = jnp.asarray(settings.temperature, jnp.float32)

    def _keys(self, image_index: int, n_tiles: int) -> jax.Array:
        base = jax.random.fold_in(jax.random.key(self.settings.seed), image_index)
        per_sample = [jax.random.fold_in(base, s) for s in range(self.settings.num_samples)]
        return jnp.stack([jax.random.split(k, n_tiles) for k in per_sample]).reshape(-1)

    def _hr_batches(self, padded: np.ndarray, grid: tiles.TileGrid, keys: jax.Array,
                    progress) -> Iterator[np.ndarray]:
        """uint8 HR tiles of every (sample, tile) of a padded LR image, in that order, `self.batch` at a time; the
        last batch is filled up with copies of its last tile so nothing recompiles."""
        for start in range(0, len(keys), self.batch):
            stop = min(start + self.batch, len(keys))
            chunk = np.stack([tiles.tile_at(padded, grid, i % len(grid)) for i in range(start, stop)])
            pad = self.batch - len(chunk)
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            chunk_keys = jnp.concatenate([keys[start:stop], jnp.repeat(keys[stop - 1 : stop], pad, axis=0)])
            lr_input = jax.device_put(data.normalize(chunk, self.data)[0], self.sharding)
            hr = _sample_tiles(self.model, self.params, lr_input, self.temperature,
                               jax.device_put(chunk_keys, self.sharding), self.settings.decode)
            yield np.asarray(hr)[: stop - start]
            progress.update(stop - start)

    def n_tiles(self, height: int, width: int) -> int:
        """Tiles (over all samples) that an H x W LR image needs."""
        return len(tiles.tile_grid(height, width, self.tile, self.settings.overlap)) * self.settings.num_samples

    def upscale(self, lr_uint8: np.ndarray, image_index: int = 0, progress=None) -> np.ndarray:
        """SR samples uint8 [num_samples, H*scale, W*scale, 3] of one uint8 RGB LR image [H, W, 3].

        Tiles stream through the devices in batches and are blended into the output as they return, so besides
        the output only a few batches and one row of tiles per sample are held. Back-projection, if asked, then
        corrects each finished sample as a whole (see backprojection.py for what it holds).
        """
        height, width = lr_uint8.shape[:2]
        grid = tiles.tile_grid(height, width, self.tile, self.settings.overlap)
        samples = self.settings.num_samples
        out = np.empty((samples, height * self.scale, width * self.scale, 3), np.uint8)
        blenders = [tiles.TileBlender(grid, self.scale, 3) for _ in range(samples)]
        progress = progress if progress is not None else tqdm(total=len(grid) * samples, disable=True)
        batches = self._hr_batches(tiles.pad_to_tile(lr_uint8, self.tile), grid, self._keys(image_index, len(grid)),
                                   progress)
        for index, hr_tile in enumerate(chain.from_iterable(batches)):
            sample = index // len(grid)
            finished = blenders[sample].add(hr_tile)
            if finished is not None:
                rows, values = finished
                out[sample, rows] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        steps = self.settings.back_projection_steps
        if steps:
            for sample in range(samples):
                out[sample] = back_project(out[sample], lr_uint8, steps)
        return out


def std_heat_map(samples_uint8: np.ndarray) -> tuple[np.ndarray, float]:
    """The per-pixel standard deviation across samples as a 'hot' colour map (black, red, yellow, white), scaled so
    that white is the image's largest deviation; and that deviation (0-255 grey levels)."""
    rows = range(0, samples_uint8.shape[1], 256)  # a band at a time, so no float copy of every sample is held
    std = np.concatenate([samples_uint8[:, y : y + 256].astype(np.float32).std(axis=0).mean(axis=-1) for y in rows])
    top = max(float(std.max()), 1e-6)
    return figures.hot(std / top), top


def lr_size(path: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an input from its header; `image_io.UnreadableImage`, naming the file and the setting to
    raise, when it has more than `max_pixels` pixels (0: no limit)."""
    width, height = image_io.image_size(path)
    if 0 < max_pixels < width * height:
        raise image_io.UnreadableImage(
            f"image {path} is {width} x {height} = {width * height:,} pixels, over upscale.max_pixels="
            f"{max_pixels:,}: raise the limit with --config.upscale.max_pixels={width * height} (0 for none)")
    return width, height


def upscale_files(upscaler: Upscaler, input_spec: str, output_dir: str | Path) -> dict:
    """Upscales every image a file, folder or glob names into `output_dir`, one image at a time, skipping and
    reporting by name the ones that cannot be read, are over `max_pixels`, or are links that lead nowhere.

    Writes NAME_x4.png (NAME_x4_s{k}.png per sample when there are several) and, if asked, NAME_x4_std.png (with
    a colour scale in grey levels).
    Outputs are checked before any work so that none overwrites an input; sizes are read from the headers first.
    """
    settings = upscaler.settings
    (inputs, skipped_links), root = image_io.expand_inputs(input_spec), image_io.input_root(input_spec)
    suffixes = ["_x4"] if settings.num_samples == 1 else [f"_x4_s{k}" for k in range(settings.num_samples)]
    if settings.std_map and settings.num_samples > 1:
        suffixes.append("_x4_std")
    outputs = {s: image_io.output_paths(inputs, output_dir, s, root) for s in suffixes}

    failed = []

    def skip(reason) -> None:
        failed.append(str(reason))
        logging.warning("%s; skipped", reason)

    for reason in skipped_links:
        skip(reason)
    tiles_of = {}
    for path in inputs:
        try:
            width, height = lr_size(path, settings.max_pixels)
        except image_io.UnreadableImage as error:
            skip(error)
            continue
        tiles_of[path] = upscaler.n_tiles(height, width)
    start, written = time.perf_counter(), []
    with tqdm(total=sum(tiles_of.values()), desc="upscale", unit="tile") as progress:
        for index, path in enumerate(inputs):
            if path not in tiles_of:
                continue
            try:
                source = image_io.load_image(path)
            except image_io.UnreadableImage as error:
                skip(error)
                progress.total -= tiles_of.pop(path)
                continue
            samples = upscaler.upscale(source.rgb, index, progress)
            alpha = image_io.upscale_alpha(source.alpha, upscaler.scale) if source.alpha is not None else None
            for k, sample in enumerate(samples):
                written.append(str(image_io.save_png(outputs[suffixes[k]][index], sample, alpha, source.grey)))
            if "_x4_std" in outputs:
                heat = figures.with_colour_scale(*std_heat_map(samples), "grey levels")
                written.append(str(image_io.save_png(outputs["_x4_std"][index], heat)))
    seconds = time.perf_counter() - start
    result = {"images": len(tiles_of), "failed": failed, "seconds": seconds,
              "images_per_second": len(tiles_of) / seconds if tiles_of else 0.0, "outputs": written}
    logging.info("upscaled %d images in %.1f s (%.3f images/s)", len(tiles_of), seconds, result["images_per_second"])
    return result
