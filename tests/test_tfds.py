"""data.source='tfds' against a real TensorFlow Datasets dataset with DIV2K's features, built here from PNG files
(tests/tfds_div2k.py): the lazy source, training and evaluation through `main`, and each error as one line.

These tests need the project's `tfds` extra; .ci/run runs them in an environment of their own:
    pip install -r requirements-tfds.txt && python -m pytest -n 0 tests/test_tfds.py
"""

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra: pip install -r requirements-tfds.txt")

import tfds_div2k  # noqa: E402

from vdvae_sr_jax import data, metrics, tfds_source  # noqa: E402
from vdvae_sr_jax.resize import bicubic_downscale, bicubic_upscale  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def div2k(tmp_path_factory):
    """PNGs of the embedded photos (6 train, 2 validation) and their DIV2K-like TFDS dataset in a data_dir."""
    root = tmp_path_factory.mktemp("div2k")
    images = tfds_div2k.write_pngs(root / "pngs")
    name = tfds_div2k.build(root / "pngs", root / "tfds")
    return dict(root=root, pngs=root / "pngs", data_dir=root / "tfds", name=name, images=images)


def _config(div2k, **overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(source="tfds", tfds_name=div2k["name"], tfds_train_split="train",
                                          tfds_val_split="validation", tfds_data_dir=str(div2k["data_dir"]),
                                          tfds_download=False)
                                     | overrides)


def test_the_source_reads_each_hr_image_lazily_and_exactly(div2k):
    source = tfds_source.hr_source(_config(div2k), "train")
    train = div2k["images"]["train"]
    assert len(source) == len(train) == 6 and source.prefix == f"{div2k['name']}/train"
    assert source.name(4) == f"{div2k['name']}/train/4"
    for i in (3, 0, 5):  # random access, in any order
        np.testing.assert_array_equal(source[i], train[i])
    np.testing.assert_array_equal(source[-1], train[-1])
    with pytest.raises(IndexError, match="has 6 images, no image 6"):
        source[6]
    assert source[2].dtype == np.uint8 and source[2].shape == train[2].shape and train[2].shape[1] == 96
    assert isinstance(source.examples[0]["lr"], bytes)  # the LR image is left undecoded
    lr = tfds_source.rgb_uint8(source.examples.dataset_info.features["lr"].decode_example_np(
        source.examples[4]["lr"]))
    np.testing.assert_array_equal(lr, bicubic_downscale(train[4], 4))  # the builder's DIV2K-like LR feature
    # Worker processes (grain's) get the source pickled and read the array_record files themselves.
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy[1], train[1])
    validation = tfds_source.hr_source(_config(div2k), "validation")
    assert len(validation) == 2
    np.testing.assert_array_equal(validation[1], div2k["images"]["validation"][1])
    half = tfds_source.hr_source(_config(div2k, tfds_train_split="train[:50%]"), "train")
    assert len(half) == 3
    np.testing.assert_array_equal(half[2], train[2])


def test_load_images_names_and_decodes_every_image_of_the_split(div2k):
    named = data.load_images(_config(div2k), 1, "validation")
    assert [n for n, _ in named] == [f"{div2k['name']}/validation/{i}" for i in range(2)]
    for (_, image), expected in zip(named, div2k["images"]["validation"]):
        np.testing.assert_array_equal(image, expected)


def test_undecodable_and_too_small_images_are_skipped_and_reported(div2k, caplog):
    name = tfds_div2k.build(div2k["pngs"], div2k["data_dir"], "one_corrupt")
    validation = div2k["images"]["validation"]
    with caplog.at_level(logging.WARNING):
        named = data.load_images(_config(div2k, tfds_name=name), 1, "validation")
    assert [n for n, _ in named] == [f"{name}/validation/0", f"{name}/validation/1"]
    np.testing.assert_array_equal(named[1][1], validation[1])
    assert f"skipped 1 of 3 images:\n  {name}/validation/2 (" in caplog.text

    train = div2k["images"]["train"]
    assert [im.shape[0] for im in train] == [96, 64, 64, 84, 96, 64]  # all 96 wide
    named = data.load_images(_config(div2k), 84, "train")
    assert [n for n, _ in named] == [f"{div2k['name']}/train/{i}" for i in (0, 3, 4)]
    np.testing.assert_array_equal(named[1][1], train[3])
    assert f"skipped 3 of 6 images:\n  {div2k['name']}/train/1 (smaller than 84 pixels)" in caplog.text
    with pytest.raises(ValueError, match=f"no readable images of at least 10000 pixels in {div2k['name']}/train"):
        data.load_images(_config(div2k), 10_000, "train")


def test_the_training_rows_skip_and_name_corrupt_and_too_small_tfds_images(div2k):
    """Through the training pipeline's rows: the corrupt example and the images smaller than the crop are redrawn
    past and named in the row's `skipped`, and every row comes from a readable image."""
    from vdvae_sr_jax import pipeline

    name = tfds_div2k.build(div2k["pngs"], div2k["data_dir"], "one_corrupt")
    source = tfds_source.hr_source(_config(div2k, tfds_name=name), "validation")
    norm = pipeline.Normalisation(255.0, -115.9, 0.0144, -127.5, 1 / 127.5, "matlab")
    rows = pipeline.Rows(source, 80, "crops", 30, 1, 0, norm, False, 4, False)
    heights = [im.shape[0] for im in div2k["images"]["validation"]]
    assert min(heights) < 80 <= max(heights)  # one validation image is too small for an 80-pixel crop
    out = [rows.row(0, r) for r in range(30)]
    skipped = set("\n".join(str(row["skipped"]) for row in out).split("\n")) - {""}
    small = f"{name}/validation/{heights.index(min(heights))} (smaller than 80 pixels)"
    corrupt = [s for s in skipped if s.startswith(f"{name}/validation/2 (")]
    assert len(corrupt) == 1 and skipped == {small, *corrupt}, skipped
    assert all(row["input"].shape == (80, 80, 3) for row in out)


def test_rgb_uint8_takes_grey_alpha_and_16_bit_images():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    np.testing.assert_array_equal(tfds_source.rgb_uint8(grey), np.repeat(grey, 3, axis=2))
    rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(tfds_source.rgb_uint8(rgba), rgba[..., :3])
    wide = np.array([[[0, 257, 65535]]], np.uint16)
    np.testing.assert_array_equal(tfds_source.rgb_uint8(wide), [[[0, 1, 255]]])


def test_each_misconfiguration_is_one_error_naming_the_key(div2k, tmp_path):
    data_dir = div2k["data_dir"]
    errors = {
        "no_such_dataset": (FileNotFoundError, f"data.tfds_name='no_such_dataset': no such dataset in {data_dir} "
                                               "(data.tfds_data_dir) nor in TFDS's catalog"),
        "div2k/bicubic_x4": (FileNotFoundError, f"data.tfds_name='div2k/bicubic_x4' is not prepared in {data_dir} "
                                                "(data.tfds_data_dir): set data.tfds_download=True to download and "
                                                "prepare it there, or run python -c \"import tensorflow_datasets as "
                                                f"tfds; tfds.builder('div2k/bicubic_x4', data_dir='{data_dir}', "
                                                "file_format='array_record').download_and_prepare()\""),
        "div2k/bicubic_x5": (ValueError, "data.tfds_name='div2k/bicubic_x5': Failed to construct dataset \"div2k\""),
        "not a name": (ValueError, "data.tfds_name='not a name': Parsing builder name string not a name failed."),
    }
    for name, (kind, message) in errors.items():
        with pytest.raises(kind) as raised:
            tfds_source.hr_source(_config(div2k, tfds_name=name), "train")
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value), str(raised.value)

    images_only = tfds_div2k.build(div2k["pngs"], data_dir, "images_only")
    with pytest.raises(ValueError) as raised:
        tfds_source.hr_source(_config(div2k, tfds_name=images_only), "train")
    assert str(raised.value) == (f"data.tfds_name='{images_only}' has no 'hr' image feature (its features: image); "
                                 "data.source='tfds' reads a DIV2K-like dataset's 'hr'")

    float_hr = tfds_div2k.build(div2k["pngs"], data_dir, "float_hr")
    with pytest.raises(ValueError) as raised:
        tfds_source.hr_source(_config(div2k, tfds_name=float_hr), "train")
    assert str(raised.value) == (f"data.tfds_name='{float_hr}': its 'hr' images are float32; data.source='tfds' "
                                 "reads 8- or 16-bit images")

    with pytest.raises(ValueError) as raised:
        tfds_source.hr_source(_config(div2k, tfds_val_split="test"), "validation")
    assert str(raised.value) == (f"data.tfds_val_split='test': {div2k['name']} in {data_dir / div2k['name']}/1.0.0 "
                                 "has no such split (Unknown split 'test'. Should be one of ['train', 'validation'].)")

    # Prepared as tfrecord files (tfds.load's default): no random access.
    tfds_div2k.build(div2k["pngs"], tmp_path, file_format="tfrecord")
    with pytest.raises(ValueError, match="is stored as tfrecord, which has no random access: point "
                                         "data.tfds_data_dir at another folder, where data.tfds_download=True"):
        tfds_source.hr_source(_config(div2k, tfds_data_dir=str(tmp_path)), "train")


def test_a_missing_dataset_is_prepared_as_array_record_files_with_tfds_download(div2k, tmp_path):
    # The builder's manual folder by default: data_dir/downloads/manual (TFDS's DIV2K downloads its files there).
    shutil.copytree(div2k["pngs"], tmp_path / "downloads" / "manual")
    config = _config(div2k, tfds_data_dir=str(tmp_path), tfds_download=True)
    source = tfds_source.hr_source(config, "validation")
    assert len(source) == 2 and sorted(p.name for p in (tmp_path / div2k["name"] / "1.0.0").glob("*.array_record*"))
    np.testing.assert_array_equal(source[0], div2k["images"]["validation"][0])
    assert len(tfds_source.hr_source(config, "train")) == 6  # prepared once, then read


def _main(workdir: Path, mode: str, *flags: str, env: dict) -> subprocess.CompletedProcess:
    config = workdir.parent / "tiny.py"  # the trainer tests' tiny VDVAE-SR, with the data flags below
    config.write_text("from tiny_training import tiny_config\n\n\ndef get_config():\n"
                      "    config = tiny_config(4, 2, 4)\n    config.data.eval_images = 2\n    return config\n")
    return subprocess.run([sys.executable, "-m", "vdvae_sr_jax.main", f"--config={config}", f"--workdir={workdir}",
                           f"--mode={mode}", *flags], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_main_trains_and_evaluates_from_the_tfds_dataset(div2k, tmp_path, subprocess_env):
    env = dict(subprocess_env, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    tfds_flags = ["--config.data.source=tfds", f"--config.data.tfds_name={div2k['name']}",
                  f"--config.data.tfds_data_dir={div2k['data_dir']}"]
    folder_flags = ["--config.data.source=folder", f"--config.data.folder={div2k['pngs'] / 'train'}",
                    f"--config.data.val_folder={div2k['pngs'] / 'validation'}"]
    runs = {"tfds": tmp_path / "tfds", "folder": tmp_path / "folder"}
    for source, flags in (("tfds", tfds_flags), ("folder", folder_flags)):
        done = _main(runs[source], "train", *flags, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    records = {source: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for source, run in runs.items()}
    # The same images in the same order as the PNG folder: the same batches, so the very same losses.
    losses = {source: [r["loss"] for r in recs if "loss" in r] for source, recs in records.items()}
    assert len(losses["tfds"]) == 4 and np.all(np.isfinite(losses["tfds"]))
    assert losses["tfds"] == losses["folder"]
    results = {source: json.loads((run / "train_result.json").read_text()) for source, run in runs.items()}
    assert results["tfds"]["step"] == 4 and np.isfinite(results["tfds"]["val_elbo"])
    assert results["tfds"]["val_elbo"] == results["folder"]["val_elbo"]

    done = _main(runs["tfds"], "evaluate", *tfds_flags, "--config.evaluate.protocols=('whole',)",
                 "--config.evaluate.temperatures=(0.1,)", "--config.evaluate.num_samples=1",
                 "--config.evaluate.figures=False", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((runs["tfds"] / "evaluate_result.json").read_text())["protocols"]["whole"]["summary"]
    hrs = div2k["images"]["validation"]
    bicubic = np.mean([metrics.psnr_y(bicubic_upscale(bicubic_downscale(hr, 4), 4), hr, 4) for hr in hrs])
    assert summary["bicubic"]["n_images"] == 2 and summary["bicubic"]["psnr_y"] == pytest.approx(bicubic)
    model = summary["VDVAE-SR t=0.1 sample"]
    assert model["n_images"] == 2 and 5 < model["psnr_y"] < 60 and 0 < model["ssim_y"] <= 1


def test_main_reports_a_dataset_that_is_not_prepared_in_one_line(tmp_path, subprocess_env):
    env = dict(subprocess_env, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    done = _main(tmp_path / "run", "train", "--config.data.source=tfds", "--config.data.tfds_download=False",
                 f"--config.data.tfds_data_dir={tmp_path / 'empty'}", env=env)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"data.tfds_name='div2k/bicubic_x4' is not prepared in {tmp_path / 'empty'} "
                           "(data.tfds_data_dir): set data.tfds_download=True")
