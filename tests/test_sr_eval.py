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
    return [(name, sr_eval.mod_crop(im[:61, :83], 4)) for name, im in photos[:3]]


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
    assert sr_eval.mod_crop(np.zeros((13, 10, 3)), 4).shape == (12, 8, 3)
