"""MATLAB-compatible bicubic imresize, so LR inputs and the bicubic baseline match the SR literature's numbers."""

from __future__ import annotations

import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, the kernel of MATLAB's 'bicubic'."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    return near + far


def _taps(n_in: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel of one axis, the 0-based input pixels and weights of MATLAB's antialiased, symmetrically
    padded bicubic: arrays [ceil(n_in * scale), taps]; a mirrored pixel may appear twice in a row."""
    n_out = math.ceil(n_in * scale)
    antialias = scale < 1.0
    width = 4.0 / scale if antialias else 4.0
    u = np.arange(1, n_out + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based input positions
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if antialias else _cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    # Symmetric padding, edge pixel repeated: 0-based -1 -> 0, -2 -> 1, n -> n-1, n+1 -> n-2.
    zero_based = (indices - 1).astype(np.int64) % (2 * n_in)
    return np.where(zero_based < n_in, zero_based, 2 * n_in - 1 - zero_based), weights


@lru_cache(maxsize=64)
def _weight_matrix(n_in: int, scale: float) -> np.ndarray:
    """Dense (ceil(n_in * scale), n_in) float64 matrix resizing one axis, antialiased and symmetrically padded."""
    mirrored, weights = _taps(n_in, scale)
    matrix = np.zeros((len(mirrored), n_in), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(len(mirrored)), mirrored.shape[1]), mirrored.ravel()), weights.ravel())
    matrix.setflags(write=False)
    return matrix


@lru_cache(maxsize=64)
def sparse_weight_matrix(n_in: int, scale: float) -> sparse.csr_array:
    """`_weight_matrix` as a sparse CSR matrix, for images too large for dense (n_out, n_in) products."""
    mirrored, weights = _taps(n_in, scale)
    rows = np.repeat(np.arange(len(mirrored)), mirrored.shape[1])
    return sparse.csr_array((weights.ravel(), (rows, mirrored.ravel())), shape=(len(mirrored), n_in))


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """Bicubic resize of [H, W], [H, W, C] or [N, H, W, C] by `scale` as MATLAB does; uint8 in, rounded uint8 out."""
    if image.ndim not in (2, 3, 4):
        raise ValueError(f"expected [H, W], [H, W, C] or [N, H, W, C], got shape {image.shape}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    h_axis = 1 if image.ndim == 4 else 0
    out = image.astype(np.float64)
    # MATLAB resizes the axes in order of increasing scale; both scales are equal here, so rows come first.
    for axis in (h_axis, h_axis + 1):
        matrix = _weight_matrix(out.shape[axis], float(scale))
        out = np.moveaxis(np.tensordot(matrix, out, axes=([1], [axis])), 0, axis)
    if image.dtype == np.uint8:
        return np.floor(np.clip(out, 0.0, 255.0) + 0.5).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        return out.astype(image.dtype)
    return out


def bicubic_downscale(images_uint8: np.ndarray, factor: int = 4) -> np.ndarray:
    """The LR image(s) of the SR literature: MATLAB bicubic shrink of uint8 HR image(s) by `factor`."""
    return imresize(images_uint8, 1.0 / factor)


def bicubic_upscale(images_uint8: np.ndarray, factor: int = 4) -> np.ndarray:
    """The bicubic SR baseline: MATLAB bicubic enlargement of uint8 LR image(s) by `factor`."""
    return imresize(images_uint8, float(factor))


def bicubic_downscale_jax(images: jax.Array, factor: int = 4) -> jax.Array:
    """`imresize(images, 1 / factor)` of float images [N, H, W, C] in JAX, as two products with the same weight
    matrices (rows, then columns): differentiable, for losses on the LR consistency of SR outputs."""
    rows = jnp.asarray(_weight_matrix(images.shape[1], 1.0 / factor), images.dtype)
    cols = jnp.asarray(_weight_matrix(images.shape[2], 1.0 / factor), images.dtype)
    highest = jax.lax.Precision.HIGHEST  # float32 products on GPUs and TPUs would otherwise drop to tf32/bf16 passes
    shrunk = jnp.einsum("ih,nhwc->niwc", rows, images, precision=highest)
    return jnp.einsum("jw,niwc->nijc", cols, shrunk, precision=highest)
