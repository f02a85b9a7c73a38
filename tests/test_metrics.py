"""Y-channel PSNR against scikit-image's independent functions with the same conventions, on real photos."""

import numpy as np
import pytest
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio

from vdvae_sr_jax import data, metrics
from vdvae_sr_jax.resize import bicubic_downscale, bicubic_upscale


def test_y_channel_matches_skimage():
    photo = data.embedded_photos()[0][1]
    np.testing.assert_allclose(metrics.rgb_to_y(photo), rgb2ycbcr(photo)[..., 0], atol=1e-9)


def test_psnr_y_of_bicubic_x4_matches_skimage():
    hr = data.embedded_photos()[2][1][:200, :300]
    sr = bicubic_upscale(bicubic_downscale(hr, 4), 4)
    y_sr, y_hr = rgb2ycbcr(sr)[4:-4, 4:-4, 0], rgb2ycbcr(hr)[4:-4, 4:-4, 0]
    expected = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    assert metrics.psnr_y(sr, hr, crop_border=4) == pytest.approx(expected, rel=1e-9)
    assert 20 < expected < 40


def test_psnr_y_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr_y(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8), 2)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s ssim.m, written out: Gaussian window 11 / 1.5, 'valid' filtering, K = (0.01, 0.03)."""
    from scipy.signal import correlate2d

    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def filt(image):
        return correlate2d(image, window, mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b, cov = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def test_ssim_y_of_bicubic_x4_matches_wangs_formula():
    hr = data.embedded_photos()[1][1][:120, :160]
    sr = bicubic_upscale(bicubic_downscale(hr, 4), 4)
    expected = _ssim_reference(rgb2ycbcr(hr)[4:-4, 4:-4, 0], rgb2ycbcr(sr)[4:-4, 4:-4, 0])
    assert metrics.ssim_y(sr, hr, crop_border=4) == pytest.approx(expected, abs=1e-6)
    assert 0.3 < expected < 0.99
    assert metrics.ssim_y(hr, hr, crop_border=4) == pytest.approx(1.0)


def test_lr_consistency_of_bicubic_is_high_and_falls_with_noise():
    hr = data.embedded_photos()[0][1][:128, :128]
    lr = bicubic_downscale(hr, 4)
    sr = bicubic_upscale(lr, 4)
    noisy = np.clip(sr + np.random.default_rng(0).normal(0, 20, sr.shape), 0, 255).astype(np.uint8)
    down = bicubic_downscale(sr, 4).astype(np.float64)
    expected = 10 * np.log10(255.0**2 / np.mean((down - lr) ** 2))
    assert metrics.lr_consistency(sr, lr, 4) == pytest.approx(expected, rel=1e-12)
    assert metrics.lr_consistency(noisy, lr, 4) < metrics.lr_consistency(sr, lr, 4) - 3


def test_pixel_std_is_the_mean_per_pixel_std():
    samples = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)])
    assert metrics.pixel_std(samples) == pytest.approx(np.std([10, 20, 30]))
    assert metrics.pixel_std(np.stack([samples[0], samples[0]])) == 0.0
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.pixel_std(samples[:1])


def test_the_ntire_diversity_score_on_maps_with_known_answers():
    """The challenge's formula, (min_s mean LPIPS_s - mean_pixels min_s LPIPS_s) / min_s mean LPIPS_s * 100, on
    maps whose answer is worked out by hand."""
    one_best = np.stack([np.full((4, 6), 0.2), np.full((4, 6), 0.3), np.full((4, 6), 0.5)])
    assert metrics.diversity_score(one_best) == 0.0
    # Each of two samples is 0.1 on its own half and 0.5 on the other: both mean 0.3, the per-pixel best 0.1.
    left, right = np.full((4, 6), 0.5), np.full((4, 6), 0.5)
    left[:, :3], right[:, 3:] = 0.1, 0.1
    assert metrics.diversity_score(np.stack([left, right])) == pytest.approx((0.3 - 0.1) / 0.3 * 100)
    # A third sample, better on average (0.25) but never best at a pixel: the global best changes, the local not.
    third = np.full((4, 6), 0.25)
    assert metrics.diversity_score(np.stack([left, right, third])) == pytest.approx((0.25 - 0.1) / 0.25 * 100)
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.05, 0.6, size=(10, 8, 8))
    means = [m.mean() for m in maps]
    local = np.mean([[min(m[i, j] for m in maps) for j in range(8)] for i in range(8)])
    assert metrics.diversity_score(maps) == pytest.approx((min(means) - local) / min(means) * 100, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.diversity_score(maps[:1])
