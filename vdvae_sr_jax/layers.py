"""The layers the model is built of: GELU and a stride-1 'same' convolution with nn.Conv's params.

Each holds one platform-specific speed choice, behind the same maths as the textbook op:
- `gelu` has a hand-written derivative, so that a backward pass keeps one array per GELU (autodiff of the
  formula keeps three, and a rolled scan stacks each of them);
- `add_bias` sums a bias gradient in float32 whatever the compute dtype (bfloat16 sums drift far from float32's);
- `same_conv` writes its gradients on the CPU as forward convolutions and matrix products, the forms XLA:CPU
  hands to its fast library inside loops, and a 1x1 kernel's forward as a matrix product, which XLA:CPU runs faster
  than the convolution; other platforms convolve and differentiate as usual.
- `concatenate` keeps arrays joined on the channels apart through `gelu` and into a `Conv`, which sums a product
  per part: a part that is the same in every block of a scan (the encoder's activations, read by each top-down
  block's posterior) is then neither copied into the join nor stored once per block for the backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

Array = Any


@flax.struct.dataclass
class Concatenated:
    """Arrays joined on the last (channel) axis, kept apart; see `concatenate`."""

    parts: tuple

    @property
    def shape(self) -> tuple:
        return self.parts[0].shape[:-1] + (sum(part.shape[-1] for part in self.parts),)

    @property
    def dtype(self):
        return jnp.result_type(*self.parts)


def concatenate(parts) -> Concatenated:
    """`jnp.concatenate(parts, axis=-1)` for `gelu` and a `Conv`, which take each part on its own."""
    return Concatenated(tuple(parts))


def gelu(x):
    """The exact GELU as the official code computes it, x/2 (1 + erf(x/sqrt 2)), not the tanh approximation."""
    return Concatenated(tuple(map(_gelu, x.parts))) if isinstance(x, Concatenated) else _gelu(x)


@jax.custom_jvp
def _gelu(x):
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@_gelu.defjvp
def _gelu_jvp(primals, tangents):
    """GELU'(x) = Phi(x) + x phi(x)."""
    (x,), (t,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    return x * cdf, (cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))) * t


@jax.custom_vjp
def add_bias(y, bias):
    """y + bias in y's dtype, with the bias gradient summed over every position in float32."""
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    return add_bias(y, bias), bias


def _add_bias_bwd(bias, dy):
    axes = tuple(range(dy.ndim - bias.ndim))
    return dy, jnp.sum(dy, axes, dtype=jnp.float32).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def conv2d(x, kernel, pad: int | None = None):
    """NHWC by HWIO, stride 1, `pad` on every side (default: 'same' for an odd kernel)."""
    pad = kernel.shape[0] // 2 if pad is None else pad
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def pointwise_product(x, kernel):
    """`conv2d` of x by a 1x1 kernel, as a matrix product over the channels."""
    return jnp.dot(x, kernel[0, 0])


def _forward(x, kernel):
    """`conv2d`, a 1x1 kernel's as `pointwise_product` on the CPU."""
    if kernel.shape[0] != 1:
        return conv2d(x, kernel)
    return jax.lax.platform_dependent(x, kernel, cpu=pointwise_product, default=conv2d)


@jax.custom_vjp
def same_conv(x, kernel):
    """`conv2d` of x [N, H, W, in] by an odd (k, k, in, out) kernel: on the CPU a 1x1 kernel's is a matrix product
    and the gradients are `_cpu_conv_grads`; elsewhere the convolution and autodiff's gradients."""
    return _forward(x, kernel)


@flax.struct.dataclass
class _ConvResiduals:
    """What `same_conv`'s gradients need: x for the kernel's gradient (None when the kernel is frozen), the kernel,
    and whether x's gradient is wanted (not an input image's), so that none is computed that autodiff would skip."""

    x: Array | None
    kernel: Array
    x_grad: bool = flax.struct.field(pytree_node=False)


def _same_conv_fwd(x, kernel):
    return _forward(x.value, kernel.value), _ConvResiduals(x.value if kernel.perturbed else None, kernel.value,
                                                           x.perturbed)


def _same_conv_bwd(res: _ConvResiduals, dy):
    if isinstance(dy, SymbolicZero):
        return None, None
    return jax.lax.platform_dependent(res, dy, cpu=_cpu_conv_grads, default=_conv_grads)


def _conv_grads(res: _ConvResiduals, dy):
    """(dx, dkernel), None where not wanted, as JAX transposes a convolution."""
    x_like = jax.ShapeDtypeStruct(dy.shape[:-1] + res.kernel.shape[2:3], res.kernel.dtype)
    dx = jax.linear_transpose(lambda x: conv2d(x, res.kernel), x_like)(dy)[0] if res.x_grad else None
    dkernel = None if res.x is None else jax.linear_transpose(lambda k: conv2d(res.x, k), res.kernel)(dy)[0]
    return dx, dkernel


def _cpu_conv_grads(res: _ConvResiduals, dy):
    """`_conv_grads` as NHWC-by-HWIO convolutions (dkernel: x with batch and channels swapped, by dy as an image-sized
    window), or matrix products over the pixels for a 1x1 kernel: XLA:CPU's own gradient convolutions in a rolled
    scan take forms its fast library (YNNPACK) does not run."""
    if res.kernel.shape[0] == 1:
        dx = pointwise_product(dy, res.kernel.swapaxes(2, 3)) if res.x_grad else None
        if res.x is None:
            return dx, None
        pixels = ((0, 1, 2), (0, 1, 2))
        if res.x.shape[-1] <= dy.shape[-1]:
            return dx, jax.lax.dot_general(res.x, dy, (pixels, ((), ())))[None, None]
        return dx, jax.lax.dot_general(dy, res.x, (pixels, ((), ()))).T[None, None]
    dx = conv2d(dy, jnp.flip(res.kernel, (0, 1)).swapaxes(2, 3)) if res.x_grad else None
    if res.x is None:
        return dx, None
    dkernel = conv2d(res.x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), pad=res.kernel.shape[0] // 2)
    return dx, dkernel.transpose(1, 2, 0, 3)


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd, symbolic_zeros=True)


class Conv(nn.Module):
    """A stride-1 'same' conv with nn.Conv's params, (k, k, in, out) and (out,); `dtype` is the compute dtype."""

    features: int
    kernel_size: int
    kernel_init: Any
    dtype: Any = None

    @nn.compact
    def weights(self, in_features: int):
        """The (k, k, in_features, out) kernel and (out,) bias, for a variant that makes the product itself."""
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, in_features, self.features))
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,))

    def __call__(self, x):
        kernel, bias = self.weights(x.shape[-1])
        parts = x.parts if isinstance(x, Concatenated) else (x,)
        starts = np.cumsum([0] + [part.shape[-1] for part in parts])
        y = sum(same_conv(*nn.dtypes.promote_dtype(part, kernel[:, :, start:end], dtype=self.dtype))
                for part, start, end in zip(parts, starts[:-1], starts[1:]))
        return add_bias(y, bias)


def get_conv(out_dim: int, kernel_size: int, *, zero_weights: bool = False, scale: float = 1.0, dtype=None,
             name: str | None = None) -> Conv:
    """A conv initialised as PyTorch's default (uniform, fan-in) times `scale`, or zero; zero bias."""
    init = (nn.initializers.zeros if zero_weights
            else nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform"))
    return Conv(out_dim, kernel_size, init, dtype=dtype, name=name)


def get_3x3(out_dim: int, **kwargs) -> Conv:
    return get_conv(out_dim, 3, **kwargs)


def get_1x1(out_dim: int, **kwargs) -> Conv:
    return get_conv(out_dim, 1, **kwargs)
