"""Image metrics with the SR literature's conventions: PSNR and SSIM on the BT.601 luma channel with a cropped
border, LR consistency, and the diversity of samples (the NTIRE 2021 SR-space score, and the per-pixel spread)."""

from __future__ import annotations

import numpy as np


def rgb_to_y(image_uint8: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma with the 16-235 offset, as MATLAB's rgb2ycbcr, in float64 on the 0-255 scale."""
    rgb = image_uint8.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def psnr_y(sr_uint8: np.ndarray, hr_uint8: np.ndarray, crop_border: int) -> float:
    """PSNR (dB) between the Y channels of two uint8 RGB images, `crop_border` pixels trimmed from each side."""
    if sr_uint8.shape != hr_uint8.shape:
        raise ValueError(f"image shapes differ: {sr_uint8.shape} vs {hr_uint8.shape}")
    c = slice(crop_border, -crop_border or None)
    mse = np.mean((rgb_to_y(sr_uint8)[c, c] - rgb_to_y(hr_uint8)[c, c]) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _crop(image: np.ndarray, border: int) -> np.ndarray:
    return image[border : image.shape[0] - border, border : image.shape[1] - border]


def ssim_y(sr_uint8: np.ndarray, hr_uint8: np.ndarray, crop_border: int) -> float:
    """SSIM of the Y channels as Wang et al.'s ssim.m: 11x11 Gaussian window (sigma 1.5), K = (0.01, 0.03),
    population statistics, mean over the valid region, after trimming `crop_border` pixels."""
    from skimage.metrics import structural_similarity

    if sr_uint8.shape != hr_uint8.shape:
        raise ValueError(f"image shapes differ: {sr_uint8.shape} vs {hr_uint8.shape}")
    y_sr, y_hr = _crop(rgb_to_y(sr_uint8), crop_border), _crop(rgb_to_y(hr_uint8), crop_border)
    return float(structural_similarity(y_hr, y_sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=255.0))


def lr_consistency(sr_uint8: np.ndarray, lr_uint8: np.ndarray, factor: int) -> float:
    """PSNR (dB, RGB) between the MATLAB-bicubic downscale of an SR output and the LR input it came from."""
    from vdvae_sr_jax.resize import bicubic_downscale

    down = bicubic_downscale(sr_uint8[None], factor)[0].astype(np.float64)
    mse = np.mean((down - lr_uint8.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def pixel_std(samples_uint8: np.ndarray) -> float:
    """Mean per-pixel standard deviation (0-255 scale) across SR samples [S, H, W, 3] of one LR image."""
    if len(samples_uint8) < 2:
        raise ValueError(f"pixel_std needs at least 2 samples, got {len(samples_uint8)}")
    return float(samples_uint8.astype(np.float64).std(axis=0).mean())


def diversity_score(lpips_maps: np.ndarray) -> float:
    """The NTIRE 2021 SR-space diversity score of one image from its samples' spatial LPIPS maps [S, H, W]: how much
    lower the LPIPS gets when each pixel may come from its best sample than from the best single sample, in percent
    of the latter. 0 when one sample is best everywhere."""
    if len(lpips_maps) < 2:
        raise ValueError(f"the diversity score needs at least 2 samples, got {len(lpips_maps)}")
    maps = np.asarray(lpips_maps, np.float64)
    best_global = maps.mean(axis=(1, 2)).min()
    best_local = maps.min(axis=0).mean()
    return float((best_global - best_local) / best_global * 100.0)
