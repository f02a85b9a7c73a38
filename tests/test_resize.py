"""MATLAB-compatible bicubic imresize against matlab_imresize.npz: float and uint8 paths, borders, batches, shapes."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vdvae_sr_jax.data import embedded_photos
from vdvae_sr_jax.resize import _weight_matrix, bicubic_downscale, bicubic_downscale_jax, bicubic_upscale, imresize

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "matlab_imresize.npz"
CASES = ["china_crop", "coffee_odd", "astronaut_64", "gray_camera"]
SCALES = [0.25, 0.5, 2.0, 4.0]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """Every array of matlab_imresize.npz, or a skip when the fixture is absent."""
    if not FIXTURE.is_file():
        pytest.skip(f"reference fixture not found at {FIXTURE}")
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", CASES)
def test_float_matches_reference(reference, case, scale, dtype):
    x = (reference[f"{case}/input_uint8"] / 255.0).astype(dtype)
    expected = reference[f"{case}/scale_{scale}_float"]
    out = imresize(x, scale)
    assert out.dtype == dtype and out.shape == expected.shape
    err = np.abs(out.astype(np.float64) - expected).max()
    assert err < 1e-5, f"max abs error {err:.3g}"


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", CASES)
def test_uint8_matches_reference(reference, case, scale):
    """Exact except at exact .5 ties, which the fixture's float32 arithmetic rounds either way."""
    x = reference[f"{case}/input_uint8"]
    expected = reference[f"{case}/scale_{scale}_uint8"]
    out = imresize(x, scale)
    assert out.dtype == np.uint8 and out.shape == expected.shape
    diff = np.abs(out.astype(np.int64) - expected)
    assert diff.max() <= 1
    assert (diff == 0).mean() >= 0.999
    exact = imresize(x.astype(np.float64), scale)[diff > 0]
    assert np.all(np.abs(exact - np.floor(exact) - 0.5) < 1e-4), "mismatch away from a rounding tie"


@pytest.mark.parametrize("case", ["china_crop", "astronaut_64"])
def test_pil_differs_at_borders_where_ours_does_not(reference, case):
    """PIL's bicubic has no symmetric padding, so its LR images are off at the borders: why this module exists."""
    x = reference[f"{case}/input_uint8"]
    expected = reference[f"{case}/scale_0.25_uint8"].astype(np.int64)
    h, w = expected.shape[:2]
    pil = np.asarray(Image.fromarray(x).resize((w, h), Image.BICUBIC)).astype(np.int64)
    pil_diff = np.abs(pil - expected)
    assert pil_diff.max() > 2
    assert pil_diff[2:-2, 2:-2].max() <= 1
    assert np.abs(imresize(x, 0.25).astype(np.int64) - expected).max() <= 1


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_batch_equals_each(reference, dtype):
    a = reference["astronaut_64/input_uint8"]
    b = reference["gray_camera/input_uint8"][:, :64]
    if dtype != np.uint8:
        a, b = (a / 255.0).astype(dtype), (b / 255.0).astype(dtype)
    for scale in (0.25, 4.0):
        batch = imresize(np.stack([a, b]), scale)
        np.testing.assert_array_equal(batch[0], imresize(a, scale))
        np.testing.assert_array_equal(batch[1], imresize(b, scale))


def test_wrappers_match_imresize(reference):
    hr = reference["china_crop/input_uint8"]
    lr = bicubic_downscale(hr)
    np.testing.assert_array_equal(lr, imresize(hr, 0.25))
    np.testing.assert_array_equal(bicubic_upscale(lr), imresize(lr, 4.0))
    assert bicubic_upscale(lr).shape == hr.shape


@pytest.mark.parametrize("scale", SCALES + [1 / 3])
@pytest.mark.parametrize("shape", [(101, 157), (7, 9, 3), (2, 13, 5, 1)])
def test_output_shape_is_ceil(shape, scale):
    x = np.random.default_rng(0).random(shape)
    out = imresize(x, scale)
    hw = slice(1, 3) if x.ndim == 4 else slice(0, 2)
    expected = list(shape)
    expected[hw] = [math.ceil(n * scale) for n in shape[hw]]
    assert out.shape == tuple(expected)


def test_constant_image_is_preserved():
    """Weights sum to one and padding mirrors, so a flat image stays flat at every scale."""
    x = np.full((11, 17), 0.3)
    for scale in SCALES:
        np.testing.assert_allclose(imresize(x, scale), 0.3, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 64, 48), (1, 37, 21)])
def test_jax_downscale_equals_imresize_and_has_its_gradient(shape):
    """float32 photos on 0-255 (a batch of two; odd sizes whose outputs round up) as the float64 numpy imresize;
    the gradient of <g, down(x)> is the adjoint of the same matrices applied to g."""
    n, h, w = shape
    images = np.stack([p[:h, :w] for _, p in embedded_photos()[:n]]).astype(np.float32)
    expected = imresize(images.astype(np.float64), 0.25)
    out = jax.jit(bicubic_downscale_jax)(jnp.asarray(images))
    assert out.shape == expected.shape and out.dtype == jnp.float32
    err = np.abs(np.asarray(out, np.float64) - expected).max()
    print(f"{shape}: max |jax - numpy| = {err:.2g} on 0-255")
    assert err < 1e-4
    g = np.random.default_rng(0).normal(size=expected.shape)
    grad = jax.grad(lambda x: jnp.sum(bicubic_downscale_jax(x) * g))(jnp.asarray(images))
    adjoint = np.einsum("ih,nijc,jw->nhwc", _weight_matrix(h, 0.25), g, _weight_matrix(w, 0.25))
    np.testing.assert_allclose(np.asarray(grad), adjoint, rtol=0, atol=1e-5)
    assert np.abs(adjoint).max() > 0.1  # a gradient that reaches the input, not one of zeros
