"""Pallas Triton kernels for CUDA GPUs: a matrix product of GELU(x) that applies the GELU as it loads x, and its
gradients likewise fused. XLA runs a GELU as a kernel of its own, so GELU(x) and its gradient each make a round
trip through GPU memory; for a block's c1, which reads the 512-wide state, that is most of the block's traffic.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# The forward and input-gradient kernels: rows of x per program (each program reads all of w from L2, so fewer,
# taller row tiles read it less often), and columns of x per step of the loop over them.
ROW_TILE = 128
COL_STEP = 64
# The weight-gradient kernel: columns of x (rows of dw) per program, and rows of x per step of its loop.
WGRAD_COLS = 128
WGRAD_ROWS = 64
WIDTHS = (16, 32, 64, 128, 256)  # product widths N whose [ROW_TILE, N] float32 tile stays in registers
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # the 16-bit inputs of the tensor-core products
MAX_SPLITS = 64  # programs summing the weight gradient over parts of the rows, each into its own partial sum
MIN_SPLIT_ROWS = 1024  # rows per part at least, so that the float32 partial sums stay small beside x and dy
_A_AND_S = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)  # Abramowitz & Stegun 7.1.26


def erf(x):
    """erf(x) by Abramowitz & Stegun 7.1.26 (within 6e-7 in float32): Pallas Triton lowers exp but not erf."""
    z = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (_A_AND_S[0] + t * (_A_AND_S[1] + t * (_A_AND_S[2] + t * (_A_AND_S[3] + t * _A_AND_S[4]))))
    y = 1.0 - poly * jnp.exp(-z * z)
    return jnp.where(x < 0, -y, y)


def gelu(x):
    """The exact GELU, x Phi(x), through `erf`."""
    return x * 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def gelu_grad(x):
    """d GELU / dx = Phi(x) + x phi(x)."""
    return 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0)))) + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2 * math.pi))


def supports(m: int, k: int, n: int, dtype) -> bool:
    """Whether `gelu_matmul` takes x [m, k] and w [k, n] of this dtype: whole tiles, 16-bit floats."""
    return m % ROW_TILE == 0 and k % WGRAD_COLS == 0 and n in WIDTHS and jnp.dtype(dtype) in DTYPES


def _forward_kernel(x_ref, w_ref, y_ref):
    """y[rows] = GELU(x[rows]) @ w, over x's columns a tile at a time."""

    def step(j, acc):
        cols = pl.ds(j * COL_STEP, COL_STEP)
        g = gelu(x_ref[:, cols].astype(jnp.float32)).astype(w_ref.dtype)
        return acc + jnp.dot(g, w_ref[cols, :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // COL_STEP, step, jnp.zeros(y_ref.shape, jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _input_grad_kernel(dy_ref, w_ref, x_ref, dx_rest_ref, dx_ref):
    """dx[rows] = dx_rest[rows] + (dy[rows] @ w^T) GELU'(x[rows]), a tile of x's columns at a time; dy[rows] is
    read once."""
    dy = dy_ref[...]

    def step(j, carry):
        cols = pl.ds(j * COL_STEP, COL_STEP)
        d = jax.lax.dot_general(dy, w_ref[cols, :], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dx = dx_rest_ref[:, cols].astype(jnp.float32) + d * gelu_grad(x_ref[:, cols].astype(jnp.float32))
        dx_ref[:, cols] = dx.astype(dx_ref.dtype)
        return carry

    jax.lax.fori_loop(0, x_ref.shape[1] // COL_STEP, step, 0)


def _weight_grad_kernel(x_ref, dy_ref, dw_ref):
    """dw[cols] = sum over this program's rows of GELU(x[rows, cols])^T @ dy[rows], a row tile at a time."""

    def step(i, acc):
        rows = pl.ds(i * WGRAD_ROWS, WGRAD_ROWS)
        g = gelu(x_ref[rows, :].astype(jnp.float32)).astype(dy_ref.dtype)
        return acc + jax.lax.dot_general(g, dy_ref[rows, :], (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    dw_ref[...] = jax.lax.fori_loop(0, x_ref.shape[0] // WGRAD_ROWS, step, jnp.zeros(dw_ref.shape, jnp.float32))


def _params(n: int) -> plt.CompilerParams:
    """Triton's launch parameters for a kernel whose tiles are n wide (eight warps for a [128, 256] float32 tile)."""
    return plt.CompilerParams(num_warps=4 if n <= 128 else 8, num_stages=3)


def _forward(x, w, interpret: bool):
    (m, k), n = x.shape, w.shape[1]
    return pl.pallas_call(
        _forward_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(m // ROW_TILE,),
        in_specs=[pl.BlockSpec((ROW_TILE, k), lambda i: (i, 0)), pl.BlockSpec((k, n), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((ROW_TILE, n), lambda i: (i, 0)),
        compiler_params=_params(n),
        interpret=interpret,
        metadata={"flops": str(2 * m * k * n)},
    )(x, w)


def _input_grad(dy, w, x, dx_rest, interpret: bool):
    (m, k), n = x.shape, w.shape[1]
    return pl.pallas_call(
        _input_grad_kernel,
        out_shape=jax.ShapeDtypeStruct((m, k), x.dtype),
        grid=(m // ROW_TILE,),
        in_specs=[pl.BlockSpec((ROW_TILE, n), lambda i: (i, 0)), pl.BlockSpec((k, n), lambda i: (0, 0)),
                  pl.BlockSpec((ROW_TILE, k), lambda i: (i, 0)), pl.BlockSpec((ROW_TILE, k), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((ROW_TILE, k), lambda i: (i, 0)),
        compiler_params=_params(n),
        interpret=interpret,
        metadata={"flops": str(2 * m * k * n)},
    )(dy, w, x, dx_rest)


def weight_grad_splits(m: int) -> int:
    """How many programs share the rows in the weight gradient: as many as MAX_SPLITS, so that even k / WGRAD_COLS
    column tiles fill the GPU, but with MIN_SPLIT_ROWS rows each where m allows, in whole row steps. Their partial
    sums, k x n float32 each, then weigh at most a third of what the kernel reads."""
    splits = MAX_SPLITS
    while splits > 1 and (m % (splits * WGRAD_ROWS) or m < splits * MIN_SPLIT_ROWS):
        splits //= 2
    return splits


def _weight_grad(x, dy, interpret: bool):
    (m, k), n = x.shape, dy.shape[1]
    splits, col_tiles = weight_grad_splits(m), k // WGRAD_COLS
    rows = m // splits
    partial_sums = pl.pallas_call(
        _weight_grad_kernel,
        out_shape=jax.ShapeDtypeStruct((splits * k, n), jnp.float32),
        grid=(col_tiles, splits),  # the first axis varies fastest: programs sharing dy's rows run together
        in_specs=[pl.BlockSpec((rows, WGRAD_COLS), lambda j, s: (s, j)),
                  pl.BlockSpec((rows, n), lambda j, s: (s, 0))],
        out_specs=pl.BlockSpec((WGRAD_COLS, n), lambda j, s: (s * col_tiles + j, 0)),
        compiler_params=_params(n),
        interpret=interpret,
        metadata={"flops": str(2 * m * k * n)},
    )(x, dy)
    return partial_sums.reshape(splits, k, n).sum(axis=0)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def gelu_matmul(x, w, interpret: bool = False):
    """(x, GELU(x) @ w) for x [m, k] and w [k, n] (see `supports`), the product accumulated in float32, in x's
    dtype. x comes back unchanged so that the gradient of its other uses (a residual) reaches the backward pass,
    whose kernel adds it in, instead of XLA in another pass over x's size. `interpret` runs the kernels through
    Pallas's interpreter on any backend (for tests)."""
    return x, _forward(x, w, interpret)


def _gelu_matmul_fwd(x, w, interpret):
    return (x, _forward(x, w, interpret)), (x, w)


def _gelu_matmul_bwd(interpret, residuals, cotangents):
    (x, w), (dx_rest, dy) = residuals, cotangents
    return _input_grad(dy, w, x, dx_rest, interpret), _weight_grad(x, dy, interpret).astype(w.dtype)


gelu_matmul.defvjp(_gelu_matmul_fwd, _gelu_matmul_bwd)


def gelu_pointwise(x, kernel, interpret: bool = False):
    """`gelu_matmul` over the channels of x [..., k] with a (1, 1, k, n) kernel: (x, the 1x1 conv of GELU(x))."""
    *lead, k = x.shape
    n = kernel.shape[-1]
    x_out, y = gelu_matmul(x.reshape(-1, k), kernel.reshape(k, n), interpret)
    return x_out.reshape(x.shape), y.reshape(*lead, n)
