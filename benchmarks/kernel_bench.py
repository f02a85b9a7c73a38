"""The Pallas GELU-matmul kernels (`vdvae_sr_jax.kernels`) against XLA's GELU and 1x1 convolution, on sr64's c1
shapes: each side's largest error in the products and the gradients, against XLA in float32, and the device time of
each side's forward and backward pass. Needs a CUDA GPU; `--interpret` runs the kernels through Pallas's interpreter
instead (any device, for checking the numbers only). `--compile_for` compiles them for GPUs that are not here
(`benchmarks/gpu_targets`; needs JAX's CUDA plugin) and says whether each fits, since a kernel that asks for more
shared memory than a GPU has fails in its compile.

    python -m benchmarks.kernel_bench --batch=64
    python -m benchmarks.kernel_bench --compile_for=h100,a100,l4
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import benchmark
from vdvae_sr_jax import kernels
from vdvae_sr_jax.model import gelu_product

_BATCH = flags.DEFINE_integer("batch", 64, "Images per batch.")
_RUNS = flags.DEFINE_integer("runs", 20, "Timed runs of each program; their median is reported.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the kernels through Pallas's interpreter (no GPU needed).")
_COMPILE_FOR = flags.DEFINE_list("compile_for", [], "Only compile the kernels for these GPU targets, without them.")
# (resolution, input channels, output widths) of sr64's c1 products: enc.c1 and prior.c1 together, resnet.c1.
LABELS = ("y", "dx", "dw")  # the products, the gradient of x, the weights' gradients
SHAPES = ((64, 512, (128, 128)), (64, 512, (128,)), (32, 512, (128, 128)), (32, 512, (128,)))


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
    # XLA's GELU then a 1x1 convolution, as the model runs without the kernels; then the kernels.
    for name, fn in (("xla", partial(gelu_product, pointwise="conv")),
                     ("pallas", partial(kernels.gelu_pointwise, interpret=interpret))):
        forward, both = programs(fn)
        outputs[name] = both(x, ws, dx_rest, dys)
        record[f"{name}_forward_ms"] = 1e3 * median_seconds(forward, (x, ws), runs)
        record[f"{name}_forward_backward_ms"] = 1e3 * median_seconds(both, (x, ws, dx_rest, dys), runs)
    exact = programs(partial(gelu_product, pointwise="conv"))[1](
        *jax.tree.map(lambda a: a.astype(jnp.float32), (x, ws, dx_rest, dys)))
    for name in ("xla", "pallas"):
        for label, got, want in zip(LABELS, outputs[name], exact):
            record[f"{name}_{label}_error"] = max(float(jnp.abs(g.astype(jnp.float32) - w).max() / jnp.abs(w).max())
                                                  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return record


def compile_for(target: str, batch: int) -> list[dict]:
    """The forward and backward pass of the kernels at each of SHAPES compiled for the named GPU target: whether it
    compiles, and XLA's error where it does not."""
    sharding = jax.sharding.SingleDeviceSharding(benchmark.gpu_target(target))

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)

    records = []
    for res, k, widths in SHAPES:
        x = spec(batch, res, res, k)
        args = (x, tuple(spec(1, 1, k, n) for n in widths), x, tuple(spec(batch, res, res, n) for n in widths))
        record = {"target": target, "batch": batch, "resolution": res, "in_channels": k,
                  "outputs": "+".join(map(str, widths)), "compiles": True}
        try:
            programs(kernels.gelu_pointwise)[1].lower(*args).compile()
        except jax.errors.JaxRuntimeError as error:
            record.update(compiles=False, error=str(error).splitlines()[0])
        records.append(record)
    return records


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
    if _COMPILE_FOR.value:
        records = [r for target in _COMPILE_FOR.value for r in compile_for(target, _BATCH.value)]
        print(json.dumps(records, indent=1))
        if not all(r["compiles"] for r in records):
            raise SystemExit("some kernels do not compile for their GPU")
        return
    if not _INTERPRET.value and jax.default_backend() != "gpu":
        raise app.UsageError(f"the kernels need a CUDA GPU, and JAX runs on {jax.default_backend()}: "
                             "pass --interpret to check their numbers here")
    print(jax.devices()[0].device_kind)
    records = [compare(_BATCH.value, *shape, _RUNS.value, _INTERPRET.value) for shape in SHAPES]
    print(json.dumps(records, indent=1))
    print(markdown(records))


if __name__ == "__main__":
    app.run(main)
