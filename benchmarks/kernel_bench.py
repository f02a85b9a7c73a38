"""The Pallas GELU-matmul kernels (`vdvae_sr_jax.kernels`) against XLA's GELU and matrix product, on sr64's c1
shapes: each side's largest error in the products and the gradients, against XLA in float32, and the device time of
each side's forward and backward pass. Needs a CUDA GPU; `--interpret` runs the kernels through Pallas's interpreter
instead (any device, for checking the numbers only).

    python -m benchmarks.kernel_bench --batch=64
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vdvae_sr_jax import kernels
from vdvae_sr_jax.layers import gelu

_BATCH = flags.DEFINE_integer("batch", 64, "Images per batch.")
_RUNS = flags.DEFINE_integer("runs", 20, "Timed runs of each program; their median is reported.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the kernels through Pallas's interpreter (no GPU needed).")
LABELS = ("y", "dx", "dw")  # the products, the gradient of x, the weights' gradients
# (resolution, input channels, output widths) of sr64's c1 products at its two largest resolutions: enc.c1 of the
# state and the activations side by side, then prior.c1 and resnet.c1 (and the encoder's blocks) of the state.
SHAPES = ((64, 1024, (128,)), (64, 512, (128,)), (32, 1024, (128,)), (32, 512, (128,)))


def xla_gelu_pointwise(x, ws, precision=None):
    """What `kernels.gelu_pointwise` computes, in XLA's ops: (x, the 1x1 convs of GELU(x) by each (1, 1, k, n)
    weight), as one product of GELU(x) with the weights side by side."""
    k = x.shape[-1]
    y = jnp.dot(gelu(x), jnp.concatenate([w.reshape(k, -1) for w in ws], axis=-1), precision=precision)
    return x, tuple(jnp.split(y, np.cumsum([w.shape[-1] for w in ws])[:-1], axis=-1))


def programs(fn):
    """Jitted forward pass and forward-and-backward pass of `fn(x, ws) -> (x, ys)`; the backward pass gets the
    gradient of x's other uses (dx_rest) and of each y."""
    forward = jax.jit(lambda x, ws: fn(x, ws)[1])

    def both(x, ws, dx_rest, dys):
        out, vjp = jax.vjp(fn, x, ws)
        return out[1], *vjp((dx_rest, dys))

    return forward, jax.jit(both)


def median_seconds(fn, args, runs: int) -> float:
    """Median wall time of `runs` calls after one warm-up, each waited for."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(batch: int, res: int, k: int, widths: tuple, runs: int, interpret: bool = False) -> dict:
    """One shape: both sides' times, and their largest errors in each output (of all products, of all weights'
    gradients, ...) against XLA's in float32, relative to its largest magnitude."""
    keys = iter(jax.random.split(jax.random.key(0), 2 + 2 * len(widths)))
    x = (2 * jax.random.normal(next(keys), (batch, res, res, k))).astype(jnp.bfloat16)
    dx_rest = jax.random.normal(next(keys), x.shape).astype(jnp.bfloat16)
    ws = tuple((0.05 * jax.random.normal(next(keys), (1, 1, k, n))).astype(jnp.bfloat16) for n in widths)
    dys = tuple(jax.random.normal(next(keys), (batch, res, res, n)).astype(jnp.bfloat16) for n in widths)
    record = {"batch": batch, "resolution": res, "in_channels": k, "outputs": "+".join(map(str, widths))}
    outputs = {}
    for name, fn in (("xla", xla_gelu_pointwise),
                     ("pallas", partial(kernels.gelu_pointwise, interpret=interpret))):
        forward, both = programs(fn)
        outputs[name] = both(x, ws, dx_rest, dys)
        record[f"{name}_forward_ms"] = 1e3 * median_seconds(forward, (x, ws), runs)
        record[f"{name}_forward_backward_ms"] = 1e3 * median_seconds(both, (x, ws, dx_rest, dys), runs)
    exact = programs(partial(xla_gelu_pointwise, precision=jax.lax.Precision.HIGHEST))[1](
        *jax.tree.map(lambda a: a.astype(jnp.float32), (x, ws, dx_rest, dys)))
    for name in ("xla", "pallas"):
        for label, got, want in zip(LABELS, outputs[name], exact):
            record[f"{name}_{label}_error"] = max(float(jnp.abs(g.astype(jnp.float32) - w).max() / jnp.abs(w).max())
                                                  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return record


def markdown(records: list[dict]) -> str:
    """The records as a Markdown table."""
    rows = ["| resolution | in → out | forward, XLA / Pallas (ms) | forward + backward, XLA / Pallas (ms) | "
            f"largest error against float32, XLA / Pallas ({', '.join(LABELS)}) |", "|---|---|---|---|---|"]
    for r in records:
        errors = ", ".join(f"{r[f'xla_{label}_error']:.0e} / {r[f'pallas_{label}_error']:.0e}" for label in LABELS)
        rows.append(f"| {r['resolution']} | {r['in_channels']} → {r['outputs']} | {r['xla_forward_ms']:.3f} / "
                    f"{r['pallas_forward_ms']:.3f} | {r['xla_forward_backward_ms']:.3f} / "
                    f"{r['pallas_forward_backward_ms']:.3f} | {errors} |")
    return "\n".join(rows)


def main(argv) -> None:
    del argv
    if not _INTERPRET.value and jax.default_backend() != "gpu":
        raise app.UsageError(f"the kernels need a CUDA GPU, and JAX runs on {jax.default_backend()}: "
                             "pass --interpret to check their numbers here")
    print(jax.devices()[0].device_kind)
    records = [compare(_BATCH.value, *shape, _RUNS.value, _INTERPRET.value) for shape in SHAPES]
    print(json.dumps(records, indent=1))
    print(markdown(records))


if __name__ == "__main__":
    app.run(main)
