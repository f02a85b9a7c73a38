"""The Pallas GELU-matmul kernels: their erf and GELU, their products and gradients (through Pallas's interpreter)
against XLA's, and the model's `variant="pallas"`, which lowers to them for CUDA and to XLA's ops elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_training import tiny_config

from benchmarks import kernel_bench
from vdvae_sr_jax import data, kernels, train, variants
from vdvae_sr_jax.layers import gelu
from vdvae_sr_jax.model import init_params, model_from_config


def test_erf_gelu_and_its_gradient_match_xla():
    x = jnp.linspace(-8.0, 8.0, 200_001)
    value, grad = kernels.gelu_and_grad(x)
    assert float(jnp.abs(kernels.erf(x) - jax.lax.erf(x)).max()) < 6e-7
    assert float(jnp.abs(kernels.gelu(x) - gelu(x)).max()) < 2e-6 and float(jnp.abs(value - gelu(x)).max()) < 2e-6
    assert float(jnp.abs(grad - jax.vmap(jax.grad(gelu))(x)).max()) < 1e-6


def test_supports_whole_tiles_of_16_bit_floats():
    assert kernels.supports(4096, 512, [128, 128], jnp.bfloat16) and kernels.supports(128, 128, [16], jnp.float16)
    assert kernels.supports(4096, 512, [256], jnp.bfloat16)
    assert not kernels.supports(64, 128, [16], jnp.float16)  # half a row tile
    assert not kernels.supports(4096 + 64, 512, [256], jnp.bfloat16)  # a partial row tile
    assert not kernels.supports(4096, 96, [256], jnp.bfloat16)  # a partial column tile
    assert not kernels.supports(4096, 512, [512], jnp.bfloat16)  # too wide a product for the registers
    assert not kernels.supports(4096, 512, [256, 128], jnp.bfloat16)  # so are the products together
    assert not kernels.supports(4096, 512, [128, 96], jnp.bfloat16)  # not a tile width
    assert not kernels.supports(4096, 512, [256], jnp.float32)
    # sr64's c1 rows at batch 64: 64x64, 32x32, 16x16 and 8x8; whole row steps; at least MIN_SPLIT_ROWS a part
    assert [kernels.row_splits(64 * r * r) for r in (64, 32, 16, 8)] == [64, 64, 16, 4]
    assert kernels.row_splits(192) == 1 and kernels.row_splits(3 * 1024) == 2


def _xla_gelu_matmul(x, ws):
    """What the kernels compute, in XLA's ops: GELU in float32, the products of bf16 inputs accumulated in float32."""
    g = gelu(x.astype(jnp.float32)).astype(ws[0].dtype)
    return x, tuple(jnp.dot(g, w, preferred_element_type=jnp.float32).astype(x.dtype) for w in ws)


@pytest.mark.parametrize("widths", [(64,), (128, 128), (32, 16)])
def test_gelu_matmul_and_its_gradients_match_xla(widths, monkeypatch):
    monkeypatch.setattr(kernels, "MIN_SPLIT_ROWS", 64)
    m, k = 256, 256  # two row tiles of four column steps; the backward kernel in two column tiles of 4 row parts
    keys = jax.random.split(jax.random.key(0), 2 + 2 * len(widths))
    x = (2 * jax.random.normal(keys[0], (m, k))).astype(jnp.bfloat16)
    dx_rest = jax.random.normal(keys[1], (m, k)).astype(jnp.bfloat16)  # the gradient of x's other uses
    ws = tuple((0.05 * jax.random.normal(key, (k, n))).astype(jnp.bfloat16) for key, n in zip(keys[2:], widths))
    dys = tuple(jax.random.normal(key, (m, n)).astype(jnp.bfloat16) for key, n in zip(keys[2 + len(widths):], widths))
    (x_out, ys), vjp = jax.vjp(lambda x, ws: kernels.gelu_matmul(x, ws, True), x, ws)
    (_, ys_ref), vjp_ref = jax.vjp(_xla_gelu_matmul, x, ws)
    assert [(y.dtype, y.shape) for y in ys] == [(jnp.bfloat16, (m, n)) for n in widths]
    np.testing.assert_array_equal(x_out, x)
    results = jax.tree.leaves((ys, vjp((dx_rest, dys))))
    references = jax.tree.leaves((ys_ref, vjp_ref((dx_rest, dys))))
    assert len(results) == len(references) == 1 + 2 * len(widths)  # each product, dx, and each weight's gradient
    for got, want in zip(results, references):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape and np.abs(want).max() > 1.0
        # a bf16 rounding of the result apart at most: both accumulate in float32, in different orders
        np.testing.assert_allclose(got, want, rtol=0, atol=2**-7 * np.abs(want).max())
        assert np.abs(got - want).mean() < 2**-10 * np.abs(want).max()


def _pallas_triton_calls(lowered_text: str) -> set[str]:
    return {kernel for kernel in ("_forward_kernel", "_backward_kernel") if f'name = "{kernel}"' in lowered_text}


def test_unknown_variant_is_an_error_naming_the_key():
    config = tiny_config(steps=1, batch_per_device=4, checkpoint_every=1)
    config.variant = "triton"
    with pytest.raises(ValueError, match="config.variant is 'triton'.*reference, pallas"):
        model_from_config(config)


def test_kernel_bench_compares_the_kernels_with_xla():
    """benchmarks/kernel_bench.py on one small shape, the kernels interpreted: both sides timed, and both sides'
    products and gradients within a bf16 rounding of XLA's in float32."""
    record = kernel_bench.compare(batch=1, res=16, k=256, widths=(64, 32), runs=1, interpret=True)
    assert (record["resolution"], record["in_channels"], record["outputs"]) == (16, 256, "64+32")
    times = [record[f"{side}_{what}_ms"] for side in ("xla", "pallas") for what in ("forward", "forward_backward")]
    assert all(t > 0 for t in times)
    assert all(0 < record[f"{side}_{label}_error"] < 2**-7 for side in ("xla", "pallas") for label in ("y", "dx", "dw"))
    assert "| 16 | 256 → 64+32 |" in kernel_bench.markdown([record])


def test_pallas_in_float32_warns_that_xla_runs(caplog):
    config = tiny_config(steps=1, batch_per_device=4, checkpoint_every=1)
    config.variant = "pallas"
    with caplog.at_level("WARNING"):
        model_from_config(config)
    assert "bfloat16 and float16 only; compute_dtype=float32 runs XLA's ops" in caplog.text
    caplog.clear()
    config.compute_dtype = "bfloat16"
    with caplog.at_level("WARNING"):
        model_from_config(config)
    assert not caplog.text


def test_pallas_variant_runs_the_kernels_on_cuda_and_equals_the_reference(monkeypatch):
    """The `pallas` variant has the reference's params; its train step lowered for CUDA calls both kernels and on
    the CPU none; with the kernels run by Pallas's interpreter, as on a GPU, its loss and gradients in bfloat16 are
    the reference's within a bfloat16 rounding. With 128 channels every c1 at 8x8 and up fits the kernels."""
    config = tiny_config(steps=1, batch_per_device=2, checkpoint_every=1)
    config.model.update(width=128, lr_width=128)
    config.compute_dtype = "bfloat16"
    reference = model_from_config(config)
    rng = np.random.default_rng(5)  # random params, drawn on the host: no init to compile
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                          jax.eval_shape(lambda: init_params(reference)))
    config.variant = "pallas"
    pallas = model_from_config(config)
    assert jax.tree.structure(jax.eval_shape(lambda: init_params(pallas))) == jax.tree.structure(params)
    trainable, frozen = train.split_params(params, config.train.frozen)
    hr = np.stack([data.center_crop(im, reference.image_size) for _, im in data.embedded_photos()[:2]])
    batch = data.model_batch(hr, config.data, reference.low_bit, reference.image_size // reference.lr_image_size)
    args = (trainable, frozen, batch, jax.random.key(4))
    traced = jax.jit(jax.value_and_grad(train.elbo_loss(pallas), has_aux=True)).trace(*args)
    assert not _pallas_triton_calls(traced.lower().as_text())
    assert _pallas_triton_calls(traced.lower(lowering_platforms=("cuda",)).as_text()) == {"_forward_kernel",
                                                                                           "_backward_kernel"}
    calls = []

    def interpreted(x, weights):
        calls.append(x.shape)
        return kernels.gelu_pointwise(x, weights, interpret=True)

    monkeypatch.setattr(variants, "gelu_pointwise", interpreted)
    (loss, _), grads = jax.jit(jax.value_and_grad(train.elbo_loss(reference), has_aux=True))(*args)
    (p_loss, _), p_grads = jax.jit(jax.value_and_grad(train.elbo_loss(pallas), has_aux=True))(*args)
    assert {shape[1] for shape in calls} == {8, 16}  # every c1 at 8x8 and 16x16; the others are Block's own
    assert 1.0 < float(loss) < 20.0 and abs(float(p_loss) - float(loss)) <= 2e-3 * float(loss)
    errors = [float(np.linalg.norm(np.asarray(p, np.float32) - g) / np.linalg.norm(g))
              for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(p_grads)) if np.abs(g).max() > 0]
    summary = f"relative gradient errors: median {np.median(errors):.4f}, max {max(errors):.4f}"
    assert len(errors) > 50 and np.median(errors) < 0.005 and max(errors) < 0.02, summary  # 0.0014, 0.0054
