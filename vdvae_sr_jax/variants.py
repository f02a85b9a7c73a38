"""Opt-in variants of the model's `Block` for speed, with the reference's params and maths; `config.variant` picks
one. None is on by default: each waits for a GPU measurement that shows it a win.

- `reference`: `model.Block`, as upstream.
- `pallas`: each block's c1 of GELU(x) runs, on a CUDA GPU, as one Pallas kernel that applies the GELU as it loads
  x (`kernels.gelu_matmul`), since XLA writes GELU(x) to memory and reads it back; bfloat16 or float16 compute.
"""

from __future__ import annotations

import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdvae_sr_jax import kernels
from vdvae_sr_jax.layers import Concatenated, add_bias, gelu, same_conv
from vdvae_sr_jax.model import Block


def _xla_gelu_pointwise(x, weights):
    """`kernels.gelu_pointwise` as XLA's ops: (x, the 1x1 convs of GELU(x))."""
    return x, tuple(same_conv(gelu(x), kernel) for kernel in weights)


def gelu_pointwise(x, weights):
    """(x, the 1x1 convs of GELU(x)) by the Pallas kernel in a program compiled for CUDA, by XLA elsewhere. Use the
    x returned for x's other uses: the backward kernel then adds their gradient to the products'."""
    return jax.lax.platform_dependent(x, weights, cuda=kernels.gelu_pointwise, default=_xla_gelu_pointwise)


class PallasBlock(Block):
    """`Block` with c1 through `gelu_pointwise` where the kernel tiles the shape; otherwise `Block` itself."""

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        rows = math.prod(x.shape[:-1])
        if isinstance(x, Concatenated) or not kernels.supports(rows, x.shape[-1], [self.middle_width], dtype):
            return super().__call__(x)
        kernel, bias = self.c1.weights(x.shape[-1])
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        x, (xhat,) = gelu_pointwise(x, (kernel,))
        return self.finish(x, add_bias(xhat, bias))


VARIANTS = {"reference": Block, "pallas": PallasBlock}


def block_for(config) -> type[Block]:
    """The Block class of `config.variant`, checked against the compute dtype."""
    if config.variant not in VARIANTS:
        raise ValueError(f"config.variant is {config.variant!r}; it must be one of {', '.join(VARIANTS)}")
    if config.variant == "pallas" and jnp.dtype(config.compute_dtype) not in kernels.DTYPES:
        logging.warning("config.variant='pallas' has kernels for bfloat16 and float16 only; compute_dtype=%s runs "
                        "XLA's ops", config.compute_dtype)
    return VARIANTS[config.variant]
