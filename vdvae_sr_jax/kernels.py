"""Pallas Triton kernels for CUDA GPUs: matrix products of GELU(x) with one or more weights that apply the GELU as
they load x, and their gradients likewise fused. XLA runs a GELU as a kernel of its own, so GELU(x) and its gradient
each make a round trip through GPU memory; for a block's c1, which reads the 512-wide state, that is most of the
block's traffic.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# The forward kernel: rows of x per program (each program reads all of the weights from L2, so fewer, taller row
# tiles read them less often), and columns of x per step of the loop over them.
ROW_TILE = 128
COL_STEP = 64
# The backward kernel: columns of x per program, and rows of x per step of its loop over the program's rows.
BACKWARD_COLS = 128
BACKWARD_ROWS = 32
# Software pipeline stages of each kernel's loop (buffers of its tiles in shared memory). Three stages of the backward
# kernel's tiles need 184 KB for two products of 128, more than an A100 (164 KB) or an L4 (99 KB) has; two fit both.
FORWARD_STAGES = 3
BACKWARD_STAGES = 2
WIDTHS = (16, 32, 64, 128, 256)  # widths of one weight's product
MAX_WIDTH = 256  # the weights' widths summed: their [ROW_TILE, width] float32 accumulators stay in registers
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # the 16-bit inputs of the tensor-core products
MAX_SPLITS = 64  # programs sharing the rows in the backward kernel, each summing the weight gradients of its part
MIN_SPLIT_ROWS = 1024  # rows per part at least, so that the float32 partial sums stay small beside x and dy
_A_AND_S = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)  # Abramowitz & Stegun 7.1.26


def erf(x):
    """erf(x) by Abramowitz & Stegun 7.1.26 (within 6e-7 in float32): Pallas Triton lowers exp but not erf."""
    z = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (_A_AND_S[0] + t * (_A_AND_S[1] + t * (_A_AND_S[2] + t * (_A_AND_S[3] + t * _A_AND_S[4]))))
    y = 1.0 - poly * jnp.exp(-z * z)
    return jnp.where(x < 0, -y, y)


def _cdf(x):
    """Phi(x), the standard normal CDF."""
    return 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def gelu(x):
    """The exact GELU, x Phi(x), through `erf`."""
    return x * _cdf(x)


def gelu_and_grad(x):
    """(GELU(x), d GELU / dx = Phi(x) + x phi(x)), sharing one erf."""
    cdf = _cdf(x)
    return x * cdf, cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2 * math.pi))


def supports(m: int, k: int, widths, dtype) -> bool:
    """Whether `gelu_matmul` takes x [m, k] and weights [k, n] for n in `widths`, of this dtype: whole tiles,
    16-bit floats."""
    return (m % ROW_TILE == 0 and k % BACKWARD_COLS == 0 and all(n in WIDTHS for n in widths)
            and sum(widths) <= MAX_WIDTH and jnp.dtype(dtype) in DTYPES)


def _forward_kernel(x_ref, *refs):
    """y_i[rows] = GELU(x[rows]) @ w_i for each weight, over x's columns a tile at a time."""
    w_refs, y_refs = refs[: len(refs) // 2], refs[len(refs) // 2 :]

    def step(j, accs):
        cols = pl.ds(j * COL_STEP, COL_STEP)
        g = gelu(x_ref[:, cols].astype(jnp.float32)).astype(w_refs[0].dtype)
        return tuple(acc + jnp.dot(g, w_ref[cols, :], preferred_element_type=jnp.float32)
                     for acc, w_ref in zip(accs, w_refs))

    accs = jax.lax.fori_loop(0, x_ref.shape[1] // COL_STEP, step,
                             tuple(jnp.zeros(y_ref.shape, jnp.float32) for y_ref in y_refs))
    for y_ref, acc in zip(y_refs, accs):
        y_ref[...] = acc.astype(y_ref.dtype)


def _backward_kernel(x_ref, dx_rest_ref, *refs):
    """For this program's columns of x, over its part of the rows a step at a time: dx = dx_rest + (sum_i dy_i @
    w_i^T) GELU'(x), and each weight's partial sum of GELU(x)^T dy_i. x is read once for both gradients."""
    n = (len(refs) - 1) // 3
    dy_refs, w_refs, dx_ref, dw_refs = refs[:n], refs[n : 2 * n], refs[2 * n], refs[2 * n + 1 :]

    def step(i, accs):
        rows = pl.ds(i * BACKWARD_ROWS, BACKWARD_ROWS)
        g, grad = gelu_and_grad(x_ref[rows, :].astype(jnp.float32))
        dys = [dy_ref[rows, :] for dy_ref in dy_refs]
        d = sum(jax.lax.dot_general(dy, w_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                for dy, w_ref in zip(dys, w_refs))
        dx_ref[rows, :] = (dx_rest_ref[rows, :].astype(jnp.float32) + d * grad).astype(dx_ref.dtype)
        g = g.astype(dys[0].dtype)
        return tuple(acc + jax.lax.dot_general(g, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
                     for acc, dy in zip(accs, dys))

    accs = jax.lax.fori_loop(0, x_ref.shape[0] // BACKWARD_ROWS, step,
                             tuple(jnp.zeros(dw_ref.shape, jnp.float32) for dw_ref in dw_refs))
    for dw_ref, acc in zip(dw_refs, accs):
        dw_ref[...] = acc


def _params(width: int, stages: int) -> plt.CompilerParams:
    """Triton's launch parameters for a kernel whose accumulators are `width` wide in all (eight warps for [128, 256]
    float32)."""
    return plt.CompilerParams(num_warps=4 if width <= 128 else 8, num_stages=stages)


def _flops(m: int, k: int, ws, products: int = 1) -> dict:
    """The kernel's FLOPs as Pallas metadata, for profilers: `products` per weight."""
    return {"flops": str(2 * products * m * k * sum(w.shape[1] for w in ws))}


def _forward(x, ws, interpret: bool):
    m, k = x.shape
    return pl.pallas_call(
        _forward_kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((m, w.shape[1]), x.dtype) for w in ws),
        grid=(m // ROW_TILE,),
        in_specs=[pl.BlockSpec((ROW_TILE, k), lambda i: (i, 0))]
        + [pl.BlockSpec(w.shape, lambda i: (0, 0)) for w in ws],
        out_specs=tuple(pl.BlockSpec((ROW_TILE, w.shape[1]), lambda i: (i, 0)) for w in ws),
        compiler_params=_params(sum(w.shape[1] for w in ws), FORWARD_STAGES),
        interpret=interpret,
        metadata=_flops(m, k, ws),
    )(x, *ws)


def row_splits(m: int) -> int:
    """How many programs share the rows in the backward kernel: as many as MAX_SPLITS, so that even k /
    BACKWARD_COLS column tiles fill the GPU, but with MIN_SPLIT_ROWS rows each where m allows, in whole row steps.
    Their partial sums of the weight gradients, float32, then weigh at most a third of what the kernel reads."""
    splits = MAX_SPLITS
    while splits > 1 and (m % (splits * BACKWARD_ROWS) or m < splits * MIN_SPLIT_ROWS):
        splits //= 2
    return splits


def _backward(x, ws, dx_rest, dys, interpret: bool):
    """(dx, the weight gradients) from one kernel; each program sums its rows' part of the weight gradients."""
    m, k = x.shape
    splits, col_tiles = row_splits(m), k // BACKWARD_COLS
    rows = m // splits
    x_spec = pl.BlockSpec((rows, BACKWARD_COLS), lambda j, s: (s, j))
    dx, *partial_sums = pl.pallas_call(
        _backward_kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   *(jax.ShapeDtypeStruct((splits * k, w.shape[1]), jnp.float32) for w in ws)),
        grid=(col_tiles, splits),  # the first axis varies fastest: programs sharing dy's rows run together
        in_specs=[x_spec, x_spec]
        + [pl.BlockSpec((rows, dy.shape[1]), lambda j, s: (s, 0)) for dy in dys]
        + [pl.BlockSpec((BACKWARD_COLS, w.shape[1]), lambda j, s: (j, 0)) for w in ws],
        out_specs=(x_spec,
                   *(pl.BlockSpec((BACKWARD_COLS, w.shape[1]), lambda j, s: (s * col_tiles + j, 0)) for w in ws)),
        compiler_params=_params(sum(w.shape[1] for w in ws), BACKWARD_STAGES),
        interpret=interpret,
        metadata=_flops(m, k, ws, products=2),
    )(x, dx_rest, *dys, *ws)
    return dx, tuple(p.reshape(splits, k, -1).sum(axis=0).astype(w.dtype) for p, w in zip(partial_sums, ws))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def gelu_matmul(x, ws, interpret: bool = False):
    """(x, (GELU(x) @ w for w in ws)) for x [m, k] and a tuple of weights [k, n] (see `supports`), the products
    accumulated in float32, in x's dtype. x comes back unchanged so that the gradient of its other uses (a residual)
    reaches the backward kernel, which adds it in, instead of XLA in another pass over x's size; each product's
    gradient reaches it apart, so that none is concatenated."""
    return x, _forward(x, ws, interpret)


def _gelu_matmul_fwd(x, ws, interpret):
    return (x, _forward(x, ws, interpret)), (x, ws)


def _gelu_matmul_bwd(interpret, residuals, cotangents):
    (x, ws), (dx_rest, dys) = residuals, cotangents
    return _backward(x, ws, dx_rest, dys, interpret)


gelu_matmul.defvjp(_gelu_matmul_fwd, _gelu_matmul_bwd)


def gelu_pointwise(x, kernels, interpret: bool = False):
    """`gelu_matmul` over the channels of x [..., k] with (1, 1, k, n) kernels: (x, the 1x1 convs of GELU(x))."""
    *lead, k = x.shape
    x_out, ys = gelu_matmul(x.reshape(-1, k), tuple(w.reshape(k, -1) for w in kernels), interpret)
    return x_out.reshape(x.shape), tuple(y.reshape(*lead, -1) for y in ys)
