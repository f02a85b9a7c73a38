"""Iterative back-projection (Irani & Peleg, 1991): corrects an SR output until its MATLAB-bicubic downscale matches
the LR input it came from, on the whole image at once, so that the seams tiles would leave cannot come back.

The corrected image is x = clip(x0 + up(c), 0, 255) for an LR-sized c, and each step adds the LR residual to c:
c <- c + step_size * (lr - down(x)), with down MATLAB's bicubic downscale and up its bicubic x`f` upscale, which is
exactly f^2 times down's adjoint. A step is therefore gradient descent on a convex function of c whose gradient,
down(x) - lr, has a Lipschitz constant of at most 1: any step size below 2 lowers it at every step, 1.5 is near the
fastest for the eigenvalues of down(up(.)), and the clip keeps pixels valid without stalling the steps. Besides the
uint8 images, only c, the residual and `BAND` HR rows in float are held.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from scipy import sparse

from vdvae_sr_jax.resize import sparse_weight_matrix

BAND = 64  # HR rows held in float at a time
SUGGESTED_STEPS = 8  # what evaluate.back_projection_steps defaults to: enough to pass the 45 dB LR-PSNR mark


def along_rows(matrix: sparse.sparray, x: np.ndarray) -> np.ndarray:
    """`matrix` [m, n] applied to axis 0 of x [n, ...]."""
    return (matrix @ x.reshape(x.shape[0], -1)).reshape((matrix.shape[0],) + x.shape[1:])


def along_cols(matrix: sparse.sparray, x: np.ndarray) -> np.ndarray:
    """`matrix` [m, n] applied to axis 1 of x [h, n, ...]."""
    return np.swapaxes(along_rows(matrix, np.swapaxes(x, 0, 1)), 0, 1)


def corrected_bands(hr_uint8: np.ndarray, c: np.ndarray, factor: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, clip(hr + up(c), 0, 255)) of each band of `BAND` HR rows, in float64."""
    rows = sparse_weight_matrix(c.shape[0], float(factor))
    cols = sparse_weight_matrix(c.shape[1], float(factor))
    for top in range(0, hr_uint8.shape[0], BAND):
        up = along_cols(cols, along_rows(rows[top : top + BAND], c))
        yield top, np.clip(hr_uint8[top : top + BAND] + up, 0.0, 255.0)


def downscale(bands: Iterator[tuple[int, np.ndarray]], height: int, factor: int) -> np.ndarray:
    """The unrounded float64 MATLAB bicubic downscale of an image `height` rows high, given as bands of rows."""
    rows = sparse_weight_matrix(height, 1.0 / factor).tocsc()
    out = 0.0
    for top, band in bands:
        shrunk = along_cols(sparse_weight_matrix(band.shape[1], 1.0 / factor), band)
        out += along_rows(rows[:, top : top + len(band)], shrunk)
    return out


def back_project(sr_uint8: np.ndarray, lr_uint8: np.ndarray, steps: int, step_size: float = 1.5) -> np.ndarray:
    """The uint8 SR image [H * f, W * f, C] after `steps` of back-projection toward the uint8 LR image [H, W, C]
    (f read off the sizes), rounded only at the end; steps = 0 returns `sr_uint8` itself."""
    factor = sr_uint8.shape[0] // lr_uint8.shape[0]
    if factor < 1 or sr_uint8.shape != (lr_uint8.shape[0] * factor, lr_uint8.shape[1] * factor, lr_uint8.shape[2]):
        raise ValueError(f"SR image {sr_uint8.shape} is not an integer upscale of the LR image {lr_uint8.shape}")
    if steps == 0:
        return sr_uint8
    lr, c = lr_uint8.astype(np.float64), np.zeros(lr_uint8.shape)
    for _ in range(steps):
        c += step_size * (lr - downscale(corrected_bands(sr_uint8, c, factor), len(sr_uint8), factor))
    out = np.empty_like(sr_uint8)
    for top, band in corrected_bands(sr_uint8, c, factor):
        out[top : top + len(band)] = np.rint(band)
    return out
