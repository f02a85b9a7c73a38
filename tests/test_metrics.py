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
