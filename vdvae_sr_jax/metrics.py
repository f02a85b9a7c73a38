"""Image metrics with the SR literature's conventions: PSNR on the BT.601 luma channel with a cropped border."""

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
