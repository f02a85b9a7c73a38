"""The layers: Conv is nn.Conv with autodiff's gradients on every platform, and takes `concatenate`'s parts apart;
GELU is the exact one, with one array kept for its backward pass; add_bias sums its gradient in float32."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from vdvae_sr_jax import layers
from vdvae_sr_jax.layers import Conv, add_bias, gelu


@pytest.mark.parametrize("size", [1, 3])
def test_conv_is_nn_conv(size):
    """nn.Conv's params (names, shapes and init), outputs and gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 16))
    init = nn.initializers.lecun_normal()
    ours = Conv(8, size, init)
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
    expected = jax.vjp(layers.conv2d, x, kernel)[1](dy)
    for rule in (layers._cpu_conv_grads, layers._conv_grads):
        for x_grad, kernel_grad in ((True, True), (True, False), (False, True)):
            grads = rule(layers._ConvResiduals(x if kernel_grad else None, kernel, x_grad), dy)
            for got, want, wanted in zip(grads, expected, (x_grad, kernel_grad)):
                assert (got is not None) == wanted, (rule.__name__, x_grad, kernel_grad)
                if wanted:
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for argnums in (0, 1, (0, 1)):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x, k: (layers.same_conv(x, k) * dy).sum(), argnums))(x, kernel).jaxpr
        conds = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
        assert len(conds) == (2 if size == 1 else 1)  # a 1x1 kernel's forward is platform-dependent too
        for branch in jaxprs_in_params(conds[-1].params):
            products = [eqn for eqn in branch.eqns if eqn.primitive.name in ("conv_general_dilated", "dot_general")]
            assert len(products) == len(np.atleast_1d(argnums)), (argnums, branch)




def test_a_1x1_kernel_is_a_matrix_product_on_the_cpu_and_a_convolution_elsewhere():
    keys = jax.random.split(jax.random.key(0), 2)
    x, kernel = jax.random.normal(keys[0], (2, 6, 5, 64)), jax.random.normal(keys[1], (1, 1, 64, 48))
    np.testing.assert_allclose(layers.pointwise_product(x, kernel), layers.conv2d(x, kernel), rtol=1e-5, atol=1e-5)
    (cond,) = [eqn for eqn in jax.make_jaxpr(layers._forward)(x, kernel).jaxpr.eqns if eqn.primitive.name == "cond"]
    ops = [{eqn.primitive.name for eqn in branch.eqns} & {"dot_general", "conv_general_dilated"}
           for branch in jaxprs_in_params(cond.params)]
    assert sorted(ops, key=str) == [{"conv_general_dilated"}, {"dot_general"}]
    assert jax.jit(layers.same_conv).lower(x, kernel).as_text().count("stablehlo.dot_general") == 1


def test_gelu_and_its_gradient_match_torch():
    torch = pytest.importorskip("torch")
    x = np.linspace(-8, 8, 16001, dtype=np.float32)
    t = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(t).sum().backward()
    value, grad = jax.vmap(jax.value_and_grad(gelu))(jnp.asarray(x))
    np.testing.assert_allclose(value, torch.nn.functional.gelu(t).detach().numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=0, atol=2e-6)
    assert np.abs(np.asarray(value) - np.asarray(jax.nn.gelu(x, approximate=True))).max() > 1e-4  # not tanh's


def _products(jaxpr) -> int:
    """Convolutions and matrix products in a jaxpr and every jaxpr nested in it (both branches of a platform cond)."""
    own = sum(eqn.primitive.name in ("conv_general_dilated", "dot_general") for eqn in jaxpr.eqns)
    return own + sum(_products(inner) for eqn in jaxpr.eqns for inner in jaxprs_in_params(eqn.params))


@pytest.mark.parametrize("size", [1, 3])
def test_a_conv_of_gelu_of_concatenate_is_that_of_the_joined_array(size):
    """Conv(gelu(concatenate([a, b]))) equals Conv(gelu(jnp.concatenate)), outputs and gradients, and a part whose
    gradient is not wanted (a frozen encoder's activations) gets no input-gradient product."""
    keys = jax.random.split(jax.random.key(0), 4)
    a, b = jax.random.normal(keys[0], (2, 6, 5, 4)), jax.random.normal(keys[1], (2, 6, 5, 3))
    conv = Conv(8, size, nn.initializers.lecun_normal())
    params = jax.tree.map(lambda p: p + 0.1, conv.init(keys[2], jnp.concatenate([a, b], -1)))
    weights = jax.random.normal(keys[3], (2, 6, 5, 8))

    def loss(params, a, b, join):
        return (conv.apply(params, gelu(join([a, b]))) * weights).sum()

    kept_apart, joined = (partial(loss, join=join) for join in (layers.concatenate, partial(jnp.concatenate, axis=-1)))
    np.testing.assert_allclose(kept_apart(params, a, b), joined(params, a, b), rtol=1e-6)
    got, want = (jax.grad(f, argnums=(0, 1, 2))(params, a, b) for f in (kept_apart, joined))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
    assert layers.concatenate([a, b]).shape == (2, 6, 5, 7)
    with_b, without_b = (_products(jax.make_jaxpr(jax.grad(kept_apart, argnums))(params, a, b).jaxpr)
                         for argnums in ((0, 1, 2), (0, 1)))
    assert with_b - without_b == 2  # b's input gradient, in the CPU's branch and the other platforms'


def test_gelu_backward_keeps_one_array():
    """GELU'(x) is kept for the backward pass, not the formula's three intermediates (which a rolled scan stacks)."""
    x = jnp.linspace(-4, 4, 64).reshape(8, 8)
    _, backward = jax.vjp(gelu, x)
    assert [leaf.shape for leaf in jax.tree.leaves(backward) if leaf.ndim] == [x.shape]
    expected = jax.grad(lambda x: (0.5 * x * (1 + jax.lax.erf(x / np.sqrt(2)))).sum())(x)
    np.testing.assert_allclose(backward(jnp.ones_like(x))[0], expected, rtol=0, atol=1e-6)


def test_add_bias_sums_its_bfloat16_gradient_in_float32():
    """4096 bfloat16 gradients of 1 + 2^-7: summed in bfloat16 they come to 512, in float32 to the exact 4128."""
    y = jnp.zeros((16, 16, 16, 2), jnp.bfloat16)
    dy = jnp.full(y.shape, 1.0 + 2**-7, jnp.bfloat16)
    _, vjp = jax.vjp(add_bias, y, jnp.zeros(2, jnp.float32))
    dyy, dbias = vjp(dy)
    assert dbias.dtype == jnp.float32 and dyy.dtype == jnp.bfloat16
    np.testing.assert_allclose(dbias, [4096 * (1 + 2**-7)] * 2, rtol=1e-6)
