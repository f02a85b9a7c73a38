"""Normalisation against the fixtures, the embedded photos, folders with bad files, and crops."""

import logging
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from conftest import load_reference
from PIL import Image

from vdvae_sr_jax import data


@pytest.mark.parametrize("name", ["vdvae_tiny", "vdvae_custom"])
def test_normalize_matches_official_preprocessing(name):
    hparams, ref = load_reference(name)
    cfg = ml_collections.ConfigDict(dict(shift=hparams["shift"], scale=hparams["scale"], pixel_max=255.0,
                                         shift_loss=-127.5, scale_loss=1 / 127.5))
    inp, target = data.normalize(ref["x_uint8"], cfg, hparams["low_bit"])
    np.testing.assert_allclose(inp, ref["input"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(target, ref["target"], rtol=1e-6, atol=1e-6)


def test_unit_range_datasets_scale_pixels_first():
    cfg = ml_collections.ConfigDict(dict(shift=-0.4387, scale=3.6456434560699966, pixel_max=1.0,
                                         shift_loss=-0.5, scale_loss=2.0))
    inp, target = data.normalize(np.array([0, 255], np.uint8), cfg)
    np.testing.assert_allclose(target, [-1.0, 1.0])
    np.testing.assert_allclose(inp, [(0 - 0.4387) * 3.6456434560699966, (1 - 0.4387) * 3.6456434560699966], rtol=1e-6)


def test_embedded_photos_are_real_rgb_images():
    photos = data.embedded_photos()
    assert len(photos) == 8
    for name, image in photos:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 256 and image.std() > 20, name


def test_folder_skips_and_reports_bad_files(tmp_path, caplog):
    rgb = data.embedded_photos()[1][1]
    Image.fromarray(rgb).save(tmp_path / "good.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.jpg")
    Image.fromarray(rgb[:10, :10]).save(tmp_path / "tiny.png")
    Image.fromarray(rgb).save(tmp_path / "palette.gif")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "sub" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)
    with caplog.at_level(logging.WARNING):
        images = data.folder_images(tmp_path, min_size=32)
    assert [p.split("/")[-1] for p, _ in images] == ["good.png", "grey.jpg", "palette.gif"]
    assert images[1][1].shape == images[2][1].shape == rgb.shape
    assert np.abs(images[2][1].astype(int) - rgb).mean() < 8  # 256 palette colours
    assert "skipped 4 of 7 images:" in caplog.text
    assert "cannot read image " + str(tmp_path / "sub" / "corrupt.png") in caplog.text
    assert "tiny.png (smaller than 32 pixels)" in caplog.text
    dangling = tmp_path / "sub" / "dangling.jpg"
    assert f"{dangling} is a link to {tmp_path / 'gone.jpg'}, which does not exist" in caplog.text
    assert f"{tmp_path / 'sub' / 'loop'} is a link to a folder, which is not searched" in caplog.text
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.folder_images(tmp_path / "nowhere")


def test_a_limit_decodes_only_the_first_readable_images(tmp_path, caplog):
    """evaluate.max_images reads no more of a validation folder than it uses: a bad file after the limit is never
    read (no warning), one before it is skipped and does not count."""
    rgb = data.embedded_photos()[1][1][:64, :64]
    for name in ("a.png", "c.png", "d.png"):
        Image.fromarray(rgb).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"not an image")
    (tmp_path / "e.png").write_bytes(b"not an image either")
    with caplog.at_level(logging.WARNING):
        images = data.folder_images(tmp_path, min_size=32, limit=2)
    assert [Path(p).name for p, _ in images] == ["a.png", "c.png"]
    assert "b.png" in caplog.text and "e.png" not in caplog.text and "skipped 1 of 3 images" in caplog.text
    assert len(data.folder_images(tmp_path, limit=5)) == 3
    config = ml_collections.ConfigDict({"source": "embedded"})
    assert [name for name, _ in data.load_images(config, 1, limit=2)] == [n for n, _ in data.embedded_photos()[:2]]


def test_folder_reads_16_bit_grey_as_its_values_not_white(tmp_path):
    deep = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 21  # 0 .. 64491
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I;16")
    ((_, image),) = data.folder_images(tmp_path)
    expected = np.floor(deep / 257 + 0.5).astype(np.uint8)
    assert image.shape == (64, 48, 3) and all(np.array_equal(image[:, :, c], expected) for c in range(3))


def test_center_crop_takes_the_middle_of_the_image_resized_to_its_shorter_side():
    image = data.embedded_photos()[0][1][:, :400]
    crop = data.center_crop(image, 64)
    assert crop.shape == (64, 64, 3)
    resized = np.asarray(Image.fromarray(image).resize((64, 82), Image.BICUBIC))
    np.testing.assert_array_equal(crop, resized[9:73])


def test_tfds_without_tensorflow_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    cfg = ml_collections.ConfigDict(dict(source="tfds", tfds_name="div2k/bicubic_x4", tfds_train_split="train"))
    with pytest.raises(ImportError, match="pip install tensorflow-cpu tensorflow-datasets"):
        data.load_images(cfg, 64)
