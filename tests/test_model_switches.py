"""The model's speed switches (remat, 1x1 convs as matrix products) give the same params, loss and gradients; a
Conv is nn.Conv, with autodiff's gradients on every platform; bfloat16 compute keeps the bias gradients as close
to float32 as the kernels'."""

from collections import Counter

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params
from tiny_training import tiny_config

from vdvae_sr_jax import data, train
from vdvae_sr_jax import model as vdvae
from vdvae_sr_jax.model import Conv, init_params, model_from_config


def _model(**switches):
    config = tiny_config(steps=1, batch_per_device=4, checkpoint_every=1)
    config.update(switches)
    return config, model_from_config(config)


def _loss_and_grads(params, **switches):
    config, model = _model(**switches)
    trainable, frozen = train.split_params(params, config.train.frozen)
    hr = np.stack([data.center_crop(im, model.image_size) for _, im in data.embedded_photos()[:4]])
    batch = data.model_batch(hr, config.data, model.low_bit, model.image_size // model.lr_image_size)
    grad_fn = jax.jit(jax.value_and_grad(train.elbo_loss(model), has_aux=True))
    args = (trainable, frozen, batch, jax.random.key(4))
    (loss, _), grads = grad_fn(*args)
    return float(loss), grads, grad_fn.lower(*args).cost_analysis()["flops"], _count_nested(grad_fn, args)


def _count_nested(fn, args) -> Counter:
    """How many conv and dot_general equations the function's jaxpr holds, sub-jaxprs (scan bodies) included, and of
    a cond its first branch (same_conv's gradients are one on the CPU and one elsewhere)."""
    def visit(jaxpr) -> Counter:
        counts = Counter()
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                counts[eqn.primitive.name] += 1
            subs = list(jaxprs_in_params(eqn.params))
            for sub in subs[:1] if eqn.primitive.name == "cond" else subs:
                counts += visit(sub)
        return counts

    return visit(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.fixture(scope="module")
def reference():
    """Params, and the loss, gradients, FLOPs and op counts of the default model."""
    params = init_params(_model()[1], jax.random.key(3))
    return params, _loss_and_grads(params)


@pytest.mark.parametrize("switch, value, rtol", [("remat", True, 1e-6), ("pointwise", "dot", 3e-5)])
def test_switch_keeps_param_names_loss_and_gradients(reference, switch, value, rtol):
    params, (loss, grads, flops, ops) = reference
    switched = jax.eval_shape(lambda: init_params(_model(**{switch: value})[1]))
    assert jax.tree_util.tree_structure(switched) == jax.tree_util.tree_structure(params)
    s_loss, s_grads, s_flops, s_ops = _loss_and_grads(params, **{switch: value})
    if switch == "remat":
        assert s_flops > 1.1 * flops  # the backward pass recomputes the top-down blocks' forward pass (1.18x)
    else:
        # c1, c4, z_proj and out_conv (and c2, c3 at 1x1 and 2x2) become matrix products of the same FLOPs; on the
        # CPU, 1x1 convolutions have matrix products for gradients either way (`same_conv`)
        moved = s_ops["dot_general"] - ops["dot_general"]
        assert moved == ops["conv_general_dilated"] - s_ops["conv_general_dilated"]
        assert moved > s_ops["conv_general_dilated"] / 2 and ops["dot_general"] > moved
        assert abs(s_flops - flops) <= 0.02 * flops
    assert 1.0 < loss < 10.0 and abs(s_loss - loss) <= rtol * loss
    flat, s_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(s_grads)
    assert len(flat) > 50
    for (path, g), r in zip(flat, s_flat):
        scale = max(np.abs(g).max(), 1e-12)
        np.testing.assert_allclose(r, g, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("size, dot", [(1, False), (1, True), (3, False)])
def test_conv_is_nn_conv(size, dot):
    """As a convolution or a matrix product: nn.Conv's params (names, shapes and init), outputs and gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 16))
    init = nn.initializers.lecun_normal()
    ours = Conv(8, size, init, dot=dot)
    pad = size // 2
    theirs = nn.Conv(8, (size, size), padding=((pad, pad), (pad, pad)), kernel_init=init)
    params = ours.init(jax.random.key(2), x)
    jax.tree.map(np.testing.assert_array_equal, params, theirs.init(jax.random.key(2), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
    expected = theirs.apply(params, x)
    np.testing.assert_allclose(ours.apply(params, x), expected, rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.key(3), expected.shape)  # a loss that weighs every output differently
    def grads(module):
        return jax.grad(lambda p, x: (module.apply(p, x) * weights).sum(), argnums=(0, 1))(params, x)

    jax.tree.map(lambda o, c: np.testing.assert_allclose(o, c, rtol=1e-5, atol=1e-5), grads(ours), grads(theirs))


@pytest.mark.parametrize("size", [1, 3])
def test_same_conv_gradients_are_autodiffs_on_every_platform(size):
    """Both of same_conv's gradient rules (the CPU's forward convolutions, or matrix products for a 1x1 kernel; other
    platforms' transposes) give autodiff's gradients, and compute only those autodiff computes: none for an input
    image or a frozen kernel."""
    keys = jax.random.split(jax.random.key(0), 3)
    x, kernel, dy = (jax.random.normal(k, s) for k, s in zip(keys, [(2, 6, 5, 4), (size, size, 4, 3), (2, 6, 5, 3)]))
    expected = jax.vjp(vdvae._conv, x, kernel)[1](dy)
    for rule in (vdvae._forward_conv_grads, vdvae._conv_grads):
        for x_grad, kernel_grad in ((True, True), (True, False), (False, True)):
            grads = rule(vdvae._ConvResiduals(x if kernel_grad else None, kernel, x_grad), dy)
            for got, want, wanted in zip(grads, expected, (x_grad, kernel_grad)):
                assert (got is not None) == wanted, (rule.__name__, x_grad, kernel_grad)
                if wanted:
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for argnums in (0, 1, (0, 1)):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x, k: (vdvae.same_conv(x, k) * dy).sum(), argnums))(x, kernel).jaxpr
        (cond,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
        for branch in jaxprs_in_params(cond.params):
            products = [eqn for eqn in branch.eqns if eqn.primitive.name in ("conv_general_dilated", "dot_general")]
            assert len(products) == len(np.atleast_1d(argnums)), (argnums, branch)


def test_bfloat16_bias_gradients_are_as_close_to_float32_as_the_kernels(reference):
    """Summed in bfloat16, a bias gradient over 16x16x4 positions was 1.4% off float32 (median over the biases; 31%
    at worst), twice the kernels' 0.7%: `add_bias` sums it in float32."""
    params, (_, grads, _, _) = reference
    _, bf16_grads, _, _ = _loss_and_grads(params, compute_dtype="bfloat16")
    errors = {"bias": [], "kernel": []}
    for (path, g), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(bf16_grads)):
        name = path[-1].key
        if name in errors and np.abs(g).max() > 0:
            errors[name].append(float(np.linalg.norm(np.asarray(b, np.float32) - g) / np.linalg.norm(g)))
    bias, kernel = np.array(errors["bias"]), np.array(errors["kernel"])
    summary = f"bias errors median {np.median(bias):.4f}, max {bias.max():.4f}; kernels {np.median(kernel):.4f}"
    assert len(bias) > 30 and len(kernel) > 30
    assert np.median(bias) < np.median(kernel) < 0.02, summary  # 0.0025 < 0.0072 (bfloat16 sums: 0.0136)
    assert bias.max() < 0.05 and kernel.max() < 0.05, summary  # 0.016, 0.024 (bfloat16 sums: 0.31)
