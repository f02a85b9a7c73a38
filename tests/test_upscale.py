"""Upscaling any image with a (tiny, freshly initialised) VDVAE-SR: exact x4 sizes, seeds, batching, samples and
files in and out."""

import logging
import os
import subprocess
import sys
import warnings
from itertools import product
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_image_io import png_bytes
from tiny_training import tiny_config

from configs.demo import get_config
from vdvae_sr_jax import data, tiles, upscale
from vdvae_sr_jax import distributions as D
from vdvae_sr_jax.backprojection import SUGGESTED_STEPS, back_project
from vdvae_sr_jax.metrics import lr_consistency
from vdvae_sr_jax.model import VDVAESR, init_params, model_from_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_and_params():
    """The tiny VDVAE-SR of the trainer tests, freshly initialised, with non-zero gates so that the LR image
    steers the samples as in a trained model."""
    config = tiny_config(1, 1, 1000)
    model = model_from_config(config)
    params = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.5 if "gate" in jax.tree_util.keystr(path) else x,
                                              init_params(model))
    return config, model, params


@pytest.fixture(scope="module")
def model_and_params():
    return tiny_model_and_params()


MULTI_DEVICE = """
import sys, numpy as np
from test_upscale import multi_device_lr, tiny_model_and_params
from vdvae_sr_jax import upscale
import jax
config, model, params = tiny_model_and_params()
settings = upscale.Settings(temperature=0.7, num_samples=2, seed=5, overlap=1, batch_per_device=3)
np.save(sys.argv[1], upscale.Upscaler(model, params, config.data, settings).upscale(multi_device_lr()))
print(jax.device_count())
"""


def multi_device_lr():
    """A 28 x 21 LR photo crop, for the multi-device test and its subprocess."""
    return data.embedded_photos()[3][1][::32, ::32][:, :21]


def _upscaler(model_and_params, **settings):
    config, model, params = model_and_params
    return upscale.Upscaler(model, params, config.data, upscale.Settings(**settings))


def test_odd_sizes_come_out_exactly_x4_and_seeds_fix_the_output(model_and_params):
    photo = data.embedded_photos()[1][1]
    lr = photo[100:113, 200:207]  # 13 x 7: smaller than two 4x4 tiles one way, odd both ways
    a = _upscaler(model_and_params, temperature=0.5, seed=3, overlap=1, batch_per_device=2).upscale(lr)
    b = _upscaler(model_and_params, temperature=0.5, seed=3, overlap=1, batch_per_device=5).upscale(lr)
    c = _upscaler(model_and_params, temperature=0.5, seed=4, overlap=1, batch_per_device=2).upscale(lr)
    assert a.shape == (1, 52, 28, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # the batch size does not change what is drawn
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1  # another seed draws another image
    tiny = _upscaler(model_and_params, overlap=1).upscale(lr[:2, :3])  # smaller than one tile
    assert tiny.shape == (1, 8, 12, 3)


def all_at_once(upscaler: upscale.Upscaler, lr: np.ndarray, image_index: int) -> np.ndarray:
    """The upscale before streaming, step by step: every LR tile of every sample cut out, all sampled (in the
    upscaler's batch size, which does not change a tile's draw, so that nothing recompiles), the HR tiles weighted
    and summed over the whole padded image, divided by the summed weights, rounded."""
    grid = tiles.tile_grid(*lr.shape[:2], upscaler.tile, upscaler.settings.overlap)
    samples, scale, batch = upscaler.settings.num_samples, upscaler.scale, upscaler.batch
    size = scale * upscaler.tile
    lr_tiles = np.tile(tiles.extract_tiles(lr, grid), (samples, 1, 1, 1))
    keys = upscaler._keys(image_index, len(grid))
    fill = -len(lr_tiles) % batch
    lr_tiles, keys = np.concatenate([lr_tiles, lr_tiles[:fill]]), jnp.concatenate([keys, keys[:fill]])
    inputs = data.normalize(lr_tiles, upscaler.data)[0]
    hr = np.concatenate([upscale._sample_tiles(upscaler.model, upscaler.params, inputs[i : i + batch],
                                               upscaler.temperature, keys[i : i + batch])
                         for i in range(0, len(keys), batch)])[: samples * len(grid)].astype(np.float32)
    rows = tiles.axis_windows(grid.tops, grid.tile, scale, 1e-3)
    cols = tiles.axis_windows(grid.lefts, grid.tile, scale, 1e-3)
    height, width = grid.padded_shape
    out = []
    for sample in hr.reshape(samples, len(grid), size, size, 3):
        sums = np.zeros((height * scale, width * scale, 3), np.float32)
        weights = np.zeros_like(sums[:, :, :1])
        for k, ((top, row), (left, col)) in enumerate(product(zip(grid.tops, rows), zip(grid.lefts, cols))):
            weight = np.outer(row, col).astype(np.float32)[:, :, None]
            sums[top * scale : top * scale + size, left * scale : left * scale + size] += weight * sample[k]
            weights[top * scale : top * scale + size, left * scale : left * scale + size] += weight
        blended = (sums / weights)[: lr.shape[0] * scale, : lr.shape[1] * scale]
        out.append(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("crop, settings", [
    ((slice(100, 103), slice(200, 211)), dict(temperature=0.5, num_samples=3, seed=3, overlap=1, batch_per_device=5)),
    ((slice(40, 49), slice(70, 87)), dict(temperature=0.7, num_samples=1, seed=9, overlap=0, batch_per_device=2,
                                          decode="sample", back_projection_steps=0)),
])
def test_streamed_tiles_blend_bit_identically_to_all_at_once(model_and_params, crop, settings):
    """A 3 x 11 LR crop (reflection padding, 3 samples, overlap 1: 12 tiles in batches of 5) and 9 x 17 (overlap 0:
    15 tiles in batches of 2; pixels sampled and no back-projection asked for by name)."""
    lr = data.embedded_photos()[1][1][crop]
    upscaler = _upscaler(model_and_params, **settings)
    streamed = upscaler.upscale(lr, image_index=4)
    assert streamed.shape == (settings["num_samples"], 4 * lr.shape[0], 4 * lr.shape[1], 3)
    assert upscaler.n_tiles(*lr.shape[:2]) == {5: 12, 2: 15}[settings["batch_per_device"]]
    np.testing.assert_array_equal(streamed, all_at_once(upscaler, lr, 4))


def test_samples_differ_and_the_std_map_shows_where(model_and_params):
    lr = data.embedded_photos()[0][1][::16, ::16][:20, :24]
    samples = _upscaler(model_and_params, temperature=1.0, num_samples=3, overlap=1).upscale(lr)
    assert samples.shape == (3, 80, 96, 3)
    assert all(np.abs(samples[0].astype(int) - s.astype(int)).mean() > 1 for s in samples[1:])
    heat, top = upscale.std_heat_map(samples)
    std = samples.astype(np.float32).std(axis=0).mean(axis=-1)
    assert heat.shape == (80, 96, 3) and heat.dtype == np.uint8 and top == pytest.approx(std.max())
    hot, cold = np.unravel_index(std.argmax(), std.shape), np.unravel_index(std.argmin(), std.shape)
    assert heat[hot].tolist() == [255, 255, 255] and heat[cold].sum() < heat[hot].sum()


def test_files_in_and_out(model_and_params, tmp_path):
    photo = data.embedded_photos()[2][1][::8, ::8][:30, :37]
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(photo).save(inputs / "rgb.jpg")
    rgba = np.dstack([photo, np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None].repeat(30, 0)])
    Image.fromarray(rgba, "RGBA").save(inputs / "sub" / "alpha.png")
    Image.fromarray(photo).convert("L").save(inputs / "grey.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = upscale.upscale_files(_upscaler(model_and_params, num_samples=2, std_map=True, overlap=1),
                                   str(inputs), tmp_path / "out")
    assert result["images"] == 3 and len(result["failed"]) == 1 and "broken.png" in result["failed"][0]
    assert result["images_per_second"] > 0
    out = tmp_path / "out"
    rgb = Image.open(out / "rgb_x4_s1.png")
    assert rgb.size == (148, 120) and rgb.mode == "RGB"
    alpha = Image.open(out / "sub" / "alpha_x4_s0.png")
    assert alpha.mode == "RGBA"
    alpha_channel = np.asarray(alpha)[..., 3].astype(int)
    assert np.abs(alpha_channel[0] - np.linspace(0, 255, 148)).max() < 6  # the ramp survives, x4
    assert Image.open(out / "grey_x4_s0.png").mode == "L"
    std_map = np.asarray(Image.open(out / "grey_x4_std.png"))
    assert std_map.shape[0] == 120 and std_map.shape[1] > 148 + 30  # the map, then its labelled colour bar
    assert tuple(std_map[0, 148 + 6]) == (255, 255, 255) and tuple(std_map[-1, 148 + 6]) == (0, 0, 0)
    assert len(result["outputs"]) == 3 * 3
    same = tmp_path / "same"
    same.mkdir()
    Image.fromarray(photo).save(same / "a.png")
    Image.fromarray(photo).save(same / "a_x4.png")
    with pytest.raises(ValueError, match="overwrite input"):  # a.png's output would be the input a_x4.png
        upscale.upscale_files(_upscaler(model_and_params), str(same), same)
    assert np.array_equal(np.asarray(Image.open(same / "a_x4.png")), photo)


def test_four_devices_draw_the_same_samples_as_one(model_and_params, tmp_path, subprocess_env):
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, "-c", MULTI_DEVICE, str(tmp_path / "four.npy")], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True)
    assert out.stdout.strip().endswith("4")
    settings = dict(temperature=0.7, num_samples=2, seed=5, overlap=1, batch_per_device=3)
    one = _upscaler(model_and_params, **settings).upscale(multi_device_lr())
    assert one.shape == (2, 4 * 28, 4 * 21, 3)
    np.testing.assert_array_equal(np.load(tmp_path / "four.npy"), one)


def test_a_run_skips_short_oversized_and_dangling_inputs_by_name_and_writes_the_rest(model_and_params, tmp_path,
                                                                                       caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    photo = data.embedded_photos()[2][1][::8, ::8]
    Image.fromarray(photo[:10, :12]).save(inputs / "good.png")
    frames = [Image.fromarray(photo[:9, :7] // k) for k in (1, 2)]
    frames[0].save(inputs / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(photo[:30, :40]).save(inputs / "big.png")  # 1200 pixels, over max_pixels=1000
    (inputs / "bomb.png").write_bytes(png_bytes(10000, 10000, bytes(100)))  # over Pillow's warning limit too
    (inputs / "short.png").write_bytes(png_bytes(30, 20, bytes(100)))
    (inputs / "dangling.png").symlink_to(inputs / "gone.png")
    before = {p.name: p.read_bytes() for p in inputs.iterdir() if p.is_file()}
    upscaler = _upscaler(model_and_params, overlap=1, max_pixels=1000)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        result = upscale.upscale_files(upscaler, str(inputs), tmp_path / "out")
    assert not caught  # no second message from Pillow's decompression-bomb check
    assert result["images"] == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["anim_x4.png",
                                                                                              "good_x4.png"]
    assert Image.open(tmp_path / "out" / "good_x4.png").size == (48, 40)
    assert result["failed"] == [
        f"{inputs / 'dangling.png'} is a link to {inputs / 'gone.png'}, which does not exist: fix or remove the link",
        f"image {inputs / 'big.png'} is 40 x 30 = 1,200 pixels, over upscale.max_pixels=1,000: raise the limit with "
        "--config.upscale.max_pixels=1200 (0 for none)",
        f"image {inputs / 'bomb.png'} is 10000 x 10000 = 100,000,000 pixels, over upscale.max_pixels=1,000: raise "
        "the limit with --config.upscale.max_pixels=100000000 (0 for none)",
        f"cannot read image {inputs / 'short.png'}: image file is truncated (0 bytes not processed); replace the "
        "file, or remove it from the input"]
    assert f"{inputs / 'anim.gif'} has 2 frames: only the first is used" in caplog.text
    assert all(f"{line}; skipped" in caplog.text for line in result["failed"])
    assert {p.name: p.read_bytes() for p in inputs.iterdir() if p.is_file()} == before  # no input touched


def test_max_pixels_comes_from_the_config_and_must_not_be_negative():
    config = get_config()
    assert config.upscale.max_pixels == 25_000_000 == upscale.Settings.from_config(config.upscale).max_pixels
    config.upscale.max_pixels = -1
    with pytest.raises(ValueError, match=r"^upscale.max_pixels must be 0 \(no limit\) or more, got -1$"):
        upscale.Settings.from_config(config.upscale)


def test_mean_decoding_is_the_mixture_mean_of_the_generative_pass(model_and_params):
    """One 4 x 4 LR tile: 'mean' gives mean_to_uint8(dmol_mean(logits)) of the pass drawn with the tile's key; at
    temperature 0 (z the prior's mean) it is the same for every seed, where 'sample' still differs pixel by pixel."""
    config, model, params = model_and_params
    lr = data.embedded_photos()[1][1][60:64, 90:94]
    upscaler = _upscaler(model_and_params, temperature=0.7, seed=2, decode="mean")
    generate = jax.jit(lambda x, key: model.apply({"params": params}, x, upscaler.temperature, rngs={"sample": key},
                                                  method=VDVAESR.generate)[1])
    logits = generate(data.normalize(lr[None], config.data)[0], upscaler._keys(0, 1)[0])
    np.testing.assert_array_equal(upscaler.upscale(lr)[0], np.asarray(D.mean_to_uint8(D.dmol_mean(logits)))[0])
    means = [_upscaler(model_and_params, temperature=0.0, seed=s, decode="mean").upscale(lr) for s in (0, 1)]
    samples = [_upscaler(model_and_params, temperature=0.0, seed=s).upscale(lr) for s in (0, 1)]
    np.testing.assert_array_equal(means[0], means[1])
    assert np.abs(samples[0].astype(int) - samples[1].astype(int)).mean() > 1


def test_back_projection_brings_every_sample_past_45_db_on_the_whole_image(model_and_params):
    """3 x 23 LR (reflection padding, 7 tiles per sample), 3 samples, a freshly initialised model: each finished
    sample is projected as a whole, exactly as back_project does it to the unprojected output."""
    lr = data.embedded_photos()[1][1][100:103, 200:223]
    settings = dict(temperature=0.7, num_samples=3, seed=3, overlap=1)
    plain = _upscaler(model_and_params, **settings).upscale(lr)
    projected = _upscaler(model_and_params, **settings, back_projection_steps=SUGGESTED_STEPS).upscale(lr)
    np.testing.assert_array_equal(projected, np.stack([back_project(s, lr, SUGGESTED_STEPS) for s in plain]))
    before, after = ([lr_consistency(s, lr, 4) for s in out] for out in (plain, projected))
    print(f"LR-PSNR per sample {[round(v, 1) for v in before]} -> {[round(v, 1) for v in after]}")
    assert max(before) < 25 and min(after) >= 45


def test_decoding_and_back_projection_come_from_the_config():
    config = get_config()
    settings = upscale.Settings.from_config(config.upscale)
    assert (settings.decode, settings.back_projection_steps) == ("sample", 0)
    config.upscale.update(decode="mean", back_projection_steps=SUGGESTED_STEPS)
    settings = upscale.Settings.from_config(config.upscale)
    assert (settings.decode, settings.back_projection_steps) == ("mean", SUGGESTED_STEPS)
    config.upscale.decode = "mode"
    with pytest.raises(ValueError, match=r"^upscale.decode must be one of \('sample', 'mean'\), got 'mode'$"):
        upscale.Settings.from_config(config.upscale)
    config.upscale.update(decode="mean", back_projection_steps=-1)
    with pytest.raises(ValueError, match=r"^upscale.back_projection_steps must be 0 \(none\) or more, got -1$"):
        upscale.Settings.from_config(config.upscale)
