"""Iterative back-projection: the operator facts it rests on, its band-wise downscale, LR-PSNR raised past the NTIRE
threshold of 45 dB, and tile seams, measured as tests/test_tiles.py measures them, not brought back."""

from pathlib import Path

import numpy as np
import pytest
import skimage
from test_tiles import paste, seam_jumps, stochastic_tiles

from vdvae_sr_jax import backprojection
from vdvae_sr_jax.backprojection import SUGGESTED_STEPS, back_project
from vdvae_sr_jax.data import read_image
from vdvae_sr_jax.metrics import lr_consistency
from vdvae_sr_jax.resize import _weight_matrix, bicubic_downscale, bicubic_upscale, imresize
from vdvae_sr_jax.tiles import blend_tiles, tile_grid


def astronaut() -> np.ndarray:
    return read_image(Path(skimage.__file__).parent / "data" / "astronaut.png")


def test_up_is_four_times_the_adjoint_of_down_so_every_frequency_contracts():
    """Per axis, down(up(.)) is symmetric with eigenvalues in (0, 1]; on an image they multiply, and a step of 1.5
    shrinks every component of the residual by at least a third."""
    eigenvalues = []
    for n in (1, 3, 8, 37):
        down, up = _weight_matrix(4 * n, 0.25), _weight_matrix(n, 4.0)
        np.testing.assert_array_equal(up, 4 * down.T)
        eigenvalues.append(np.linalg.eigvalsh(down @ up))
    every = np.concatenate(eigenvalues)
    print(f"per-axis eigenvalues of down(up(.)) in [{every.min():.3f}, {every.max():.3f}]")
    assert 0.48 < every.min() and every.max() < 1 + 1e-12
    image = np.outer(every, every)
    assert np.abs(1 - 1.5 * image).max() < 0.67


def test_downscale_in_bands_equals_imresize(monkeypatch):
    monkeypatch.setattr(backprojection, "BAND", 8)  # 52 rows: six full bands and a short one
    hr = astronaut()[200:252, 300:344]
    bands = list(backprojection.corrected_bands(hr, np.zeros((13, 11, 3)), 4))
    assert [top for top, _ in bands] == list(range(0, 52, 8))
    np.testing.assert_array_equal(np.concatenate([band for _, band in bands]), hr)
    down = backprojection.downscale(iter(bands), 52, 4)
    np.testing.assert_allclose(down, imresize(hr.astype(np.float64), 0.25), rtol=0, atol=1e-9)


def test_steps_raise_lr_psnr_past_45_db_rounding_only_at_the_end():
    hr = astronaut()[100:248, 200:316]  # white suit and black background: noise clips at both ends
    lr = bicubic_downscale(hr)
    noisy = np.clip(hr + np.random.default_rng(0).normal(0.0, 20.0, hr.shape), 0, 255).astype(np.uint8)
    lr_psnr = {k: lr_consistency(back_project(noisy, lr, k), lr, 4) for k in (0, 1, 2, 4, SUGGESTED_STEPS)}
    print("LR-PSNR by steps:", {k: round(v, 1) for k, v in lr_psnr.items()})
    assert lr_psnr[0] < 36
    assert lr_psnr[0] < lr_psnr[1] < lr_psnr[2] < lr_psnr[4] <= lr_psnr[SUGGESTED_STEPS]
    assert lr_psnr[SUGGESTED_STEPS] >= 45
    assert back_project(noisy, lr, 0) is noisy
    with pytest.raises(ValueError, match=r"SR image \(148, 116, 3\) is not an integer upscale of the LR image"):
        back_project(noisy, lr[:, :28], 2)


@pytest.mark.parametrize("overlap", [2, 4])
def test_projection_brings_back_no_seams(overlap):
    """test_tiles' blended tiles of a truth with per-tile offsets, rounded as the upscaler rounds, projected toward the
    truth's LR image: the error's jumps across tile edges stay those of the blend, within a grey level of rounding,
    and no larger than its jumps elsewhere; hard seams of pasted tiles shrink, as the whole image is projected."""
    truth = bicubic_upscale(astronaut()[100:137, 200:229])
    lr = bicubic_downscale(truth)
    truth = truth.astype(np.float64)
    rng = np.random.default_rng(0)
    soft, hard = tile_grid(37, 29, tile=8, overlap=overlap), tile_grid(37, 29, tile=8, overlap=0)
    blended = np.clip(np.rint(blend_tiles(stochastic_tiles(truth, soft, rng), soft)), 0, 255).astype(np.uint8)
    pasted = np.clip(np.rint(paste(stochastic_tiles(truth, hard, rng), hard, truth.shape)), 0, 255).astype(np.uint8)
    measured = {name: seam_jumps(image - truth, grid) for name, image, grid in [
        ("blended", blended, soft), ("projected", back_project(blended, lr, SUGGESTED_STEPS), soft),
        ("pasted", pasted, hard), ("pasted, projected", back_project(pasted, lr, SUGGESTED_STEPS), hard)]}
    print(f"overlap {overlap}: seam / elsewhere jump of the error,",
          ", ".join(f"{k} {s:.0f} / {e:.0f}" for k, (s, e) in measured.items()))
    (seam, elsewhere), (projected_seam, projected_elsewhere) = measured["blended"], measured["projected"]
    assert seam < elsewhere and projected_seam <= seam + 1 and projected_seam <= projected_elsewhere
    assert measured["pasted, projected"][0] < measured["pasted"][0]
    assert lr_consistency(back_project(blended, lr, SUGGESTED_STEPS), lr, 4) > 45 > lr_consistency(blended, lr, 4)
