"""Speed of a config's training step or SR tile sampling at several batch sizes, as JSON and a Markdown table.

For each batch: compile time, median device-synchronised step time after warm-up, images/s, peak device
memory, XLA's temporary memory, model FLOPs per step (the convolutions and matrix products in the step's jaxpr,
each scan body counted once per iteration, recomputation left out), achieved TFLOP/s and the fraction of the
device's peak (MFU); with --profile_steps, the device time per kind of op from a JAX profiler trace.

    python -m benchmarks.benchmark --config=configs/sr64.py --batch_sizes=1,2 --steps=5
    python -m benchmarks.benchmark --config=configs/sr64.py --mode=upscale --batch_sizes=16,64 --compute_dtype=bfloat16
    python -m benchmarks.benchmark --config=configs/sr64.py --compute_dtype=bfloat16 --config.variant=pallas \
        --batch_sizes=64 --profile_steps=3
    python -m benchmarks.benchmark --config=configs/sr256.py --remat --find_max_batch --output=sr256.json
"""

from __future__ import annotations

from vdvae_sr_jax import huge_pages

if __name__ == "__main__":
    huge_pages.restart_with_huge_pages()  # first: glibc reads its tunables only when a process starts

import json
import math
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.extend.core import ClosedJaxpr, Jaxpr
from ml_collections import config_flags

from benchmarks import op_profile
from benchmarks.programs import train_inputs, train_step
from vdvae_sr_jax import data, evaluate
from vdvae_sr_jax.model import VDVAESR, init_params, model_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "A VDVAE or VDVAE-SR config file.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2"], "Batch sizes (one device) to measure.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "upscale"], "A training step, or SR sampling of LR tiles.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per batch size; their median is reported. 0 measures "
                               "compile time and FLOPs only.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_REMAT = flags.DEFINE_bool("remat", None, "Set config.remat (rematerialise top-down blocks); default: the config's.")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"], "Set config.compute_dtype.")
_FIND_MAX = flags.DEFINE_bool("find_max_batch", False, "Double the largest batch size until the device is out of "
                              "memory (GPU or TPU only).")
_PROFILE = flags.DEFINE_integer("profile_steps", 0, "After timing, trace this many steps with the JAX profiler and "
                                "report the device time per kind of op and of the costliest ops.")
_OUTPUT = flags.DEFINE_string("output", "", "Where to write the JSON report.")

UPSCALE_SIZE = 512  # upscaling throughput is reported in LR images of UPSCALE_SIZE^2 pixels

# Dense peak TFLOP/s per JAX device from vendor datasheets: (bf16, fp32), where fp32 is the TF32 tensor-core rate
# on A100/H100/H200/L4/L40S (XLA's default precision runs float32 convolutions and matmuls in TF32 there). A TPU v2/v3
# device is one of a chip's two cores. TPUs publish no fp32 peak; the V100 has no bf16 units. Matched in order.
PEAK_TFLOPS = (
    (("h100 pcie",), 756.0, 378.0),
    (("h100",), 989.4, 494.7),
    (("h200",), 989.4, 494.7),
    (("a100",), 312.0, 156.0),
    (("l40s",), 362.05, 183.0),
    (("l4",), 121.0, 60.0),
    (("v100",), None, 15.7),
    (("tpu v2",), 22.5, None),
    (("tpu v3",), 61.5, None),
    (("tpu v4",), 275.0, None),
    (("tpu v5 lite", "tpu v5e"), 197.0, None),
    (("tpu v5",), 459.0, None),
    (("tpu v6",), 918.0, None),
)


def peak_tflops(device_kind: str, compute_dtype: str) -> float | None:
    """The device's dense peak TFLOP/s at the compute dtype, or None where the device or dtype is not in the table."""
    kind = device_kind.lower()
    for names, bf16, fp32 in PEAK_TFLOPS:
        if any(name in kind for name in names):
            return bf16 if compute_dtype == "bfloat16" else fp32
    return None


def peak_memory_bytes(device) -> int | None:
    """The device allocator's peak bytes in use so far (in this process); None where it keeps no statistics (CPU)."""
    stats = device.memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def _inner_jaxprs(param) -> list:
    """The jaxprs an equation parameter holds: a jaxpr, a closed jaxpr, or a tuple of them (cond's branches)."""
    if isinstance(param, ClosedJaxpr):
        return [param.jaxpr]
    if isinstance(param, Jaxpr):
        return [param]
    if isinstance(param, (tuple, list)):
        return [j for p in param for j in _inner_jaxprs(p)]
    return []


def _valid_taps(n: int, k: int, stride: int, pad: tuple[int, int], lhs_dilation: int, rhs_dilation: int) -> int:
    """(output position, kernel tap) pairs along one spatial axis that land on an input pixel, not on padding."""
    dilated = (n - 1) * lhs_dilation + 1
    m = (dilated + sum(pad) - (k - 1) * rhs_dilation - 1) // stride + 1
    taps = (o * stride + t * rhs_dilation - pad[0] for o in range(m) for t in range(k))
    return sum(1 for i in taps if 0 <= i < dilated and i % lhs_dilation == 0)


def _conv_flops(lhs: tuple, rhs: tuple, out: tuple, params: dict) -> int:
    """2 per multiply-add of a convolution, skipping taps on padding as XLA's cost analysis does."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    valid = math.prod(
        _valid_taps(lhs[lhs_spec[2 + d]], rhs[rhs_spec[2 + d]], params["window_strides"][d], params["padding"][d],
                    params["lhs_dilation"][d], params["rhs_dilation"][d])
        for d in range(len(lhs_spec) - 2)
    )
    return 2 * out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]] * valid


def jaxpr_flops(jaxpr) -> int:
    """FLOPs of the convolutions and matrix products in a jaxpr (2 per multiply-add): a scan body counts once per
    iteration, a cond its costliest branch. XLA's own cost analysis counts a loop body once, and JAX on GPU gives
    none before compiling."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
            total += _conv_flops(lhs.shape, rhs.shape, out.shape, eqn.params)
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            total += 2 * eqn.outvars[0].aval.size * math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
        elif eqn.primitive.name == "cond":
            total += max((jaxpr_flops(j) for j in _inner_jaxprs(eqn.params["branches"])), default=0)
        else:
            inner = sum(jaxpr_flops(j) for p in eqn.params.values() for j in _inner_jaxprs(p))
            total += eqn.params["length"] * inner if eqn.primitive.name == "scan" else inner
    return total


def model_flops(config, make_step, args) -> int:
    """FLOPs of one step of the config's program, without rematerialisation (recomputed activations are not model
    FLOPs) and with the reference blocks (Pallas kernels hide their products in kernel bodies)."""
    config = config.copy_and_resolve_references()
    config.remat = False
    config.variant = "reference"
    return jaxpr_flops(jax.make_jaxpr(make_step(config, model_from_config(config)))(*args).jaxpr)


def upscale_step(config, model):
    """Jitted SR sampling of a batch of LR tiles."""
    return jax.jit(partial(evaluate.sr_sample, model))


def upscale_inputs(config, model, batch_size: int) -> tuple:
    """Params, a batch of random LR tiles, temperature 1 and an rng."""
    size = model.lr_image_size
    lr = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), np.uint8)
    return init_params(model), jax.device_put(data.normalize(lr, config.data)[0]), jnp.float32(1.0), jax.random.key(0)


PROGRAMS = {"train": (train_step, train_inputs), "upscale": (upscale_step, upscale_inputs)}


def compile_program(fn, args) -> tuple:
    """(compiled, trace-and-lower seconds, XLA compile seconds, CPU seconds of both in this process): on a shared
    machine the CPU time is the steadier measure."""
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at, time.process_time() - cpu_start


def compile_record(batch_size: int, seconds: tuple[float, float, float], memory, flops: int) -> dict:
    """A batch size's compile measurements: (trace-and-lower, XLA compile, CPU) seconds, XLA's temporary and
    donated bytes, and the model FLOPs per step."""
    lower_s, compile_s, cpu_s = seconds
    return {
        "batch_size": batch_size,
        "trace_and_lower_s": lower_s,
        "compile_s": compile_s,
        "compile_time_s": lower_s + compile_s,
        "compile_cpu_s": cpu_s,
        "xla_temp_bytes": memory.temp_size_in_bytes,
        "donated_bytes": memory.alias_size_in_bytes,
        "flops_per_step": flops,
    }


def step_seconds(compiled, args, steps: int, warmup: int, carries_state: bool) -> tuple[list[float], tuple]:
    """(seconds of each of `steps` calls after `warmup` untimed ones, each waited for with block_until_ready; the
    next call's args): a training step's output state is the next step's input, since the old one is donated."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if carries_state:
            args = (out[0], *args[1:])
    return times, args


def benchmark(config, batch_size: int, mode: str = "train", steps: int = 10, warmup: int = 2,
              profile_steps: int = 0) -> dict:
    """One batch size's measurements: compile time, memory and FLOPs, then (if `steps`) step time and throughput,
    then (if `profile_steps`) the device time per kind of op."""
    make_step, make_inputs = PROGRAMS[mode]
    model = model_from_config(config)
    args = make_inputs(config, model, batch_size)
    compiled, lower_s, compile_s, cpu_s = compile_program(make_step(config, model), args)
    logging.info("batch %d: traced and lowered in %.1f s, compiled in %.1f s (%.1f CPU s)", batch_size, lower_s,
                 compile_s, cpu_s)
    record = compile_record(batch_size, (lower_s, compile_s, cpu_s), compiled.memory_analysis(),
                            model_flops(config, make_step, args))
    carries_state = mode == "train"
    if steps:
        times, args = step_seconds(compiled, args, steps, warmup, carries_state)
        record.update(throughput(record, times, config, mode))
    if profile_steps:
        try:
            with tempfile.TemporaryDirectory() as trace_dir:
                record["profile"] = op_profile.profile_steps(
                    lambda: step_seconds(compiled, args, profile_steps, 0, carries_state), profile_steps, trace_dir,
                    compiled.as_text())
        except Exception as error:  # noqa: BLE001 (a profiler that cannot see the device must not lose the timings)
            logging.warning("batch %d: no profile: %s", batch_size, error)
            record["profile_error"] = str(error)
    return record


def throughput(record: dict, times: list[float], config, mode: str) -> dict:
    """Step time statistics, images/s (and LR pixels/s when upscaling), peak memory, TFLOP/s and MFU."""
    median = statistics.median(times)
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, config.compute_dtype)
    tflops = record["flops_per_step"] / median / 1e12
    batch_size = record["batch_size"]
    out = {
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "images_per_s": batch_size / median,
        "peak_memory_bytes": peak_memory_bytes(device),
        "tflops_per_s": tflops,
        "mfu": None if peak is None else tflops / peak,
    }
    if mode == "upscale":
        lr_pixels = batch_size * config.model.lr_image_size**2 / median
        out.update(lr_pixels_per_s=lr_pixels, images_512_per_s=lr_pixels / UPSCALE_SIZE**2)
    return out


def is_out_of_memory(error: jax.errors.JaxRuntimeError) -> bool:
    """Whether an error is XLA running out of device memory. A kernel that asks for more shared memory than an SM
    has is also RESOURCE_EXHAUSTED, but no batch size would fit it."""
    return "RESOURCE_EXHAUSTED" in str(error) and "Shared memory" not in str(error)


def measure_or_out_of_memory(measure, batch_size: int) -> dict:
    """`measure(batch_size)`, or a record that says the batch did not fit, so that one batch too large for the device
    does not lose the others' measurements."""
    try:
        return measure(batch_size)
    except jax.errors.JaxRuntimeError as error:
        if not is_out_of_memory(error):
            raise
        logging.warning("batch %d: out of device memory: %s", batch_size, error)
        return {"batch_size": batch_size, "out_of_memory": True}


def largest_batch(measure, fits: int) -> tuple[int, list[dict]]:
    """Doubles a batch size that fits until `measure(batch)` runs out of memory: (the largest that fit, the records
    of the doubled sizes that fit)."""
    records = []
    while True:
        try:
            records.append(measure(2 * fits))
        except jax.errors.JaxRuntimeError as error:
            if not is_out_of_memory(error):
                raise
            return fits, records
        fits *= 2


def _cell(value, scale: float = 1.0) -> str:
    """A number to 3 significant digits (integers above 1000 in full), or n/a."""
    if value is None:
        return "n/a"
    value *= scale
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def markdown(report: dict) -> str:
    """The report's measurements as a Markdown table, one row per batch size, then each profiled batch's profile."""
    upscale = report["mode"] == "upscale"
    head = ["batch", "compile (s)", "step (ms)", "images/s"]
    head += ["LR Mpixel/s", f"{UPSCALE_SIZE}² LR images/s"] if upscale else []
    head += ["peak memory (GiB)", "XLA temp (GiB)", "GFLOP/step", "TFLOP/s", "MFU"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        if r.get("out_of_memory"):
            rows.append(f"| {r['batch_size']} | out of memory |" + " |" * (len(head) - 2))
            continue
        cells = [str(r["batch_size"]), _cell(r["compile_time_s"]), _cell(r.get("step_s_median"), 1e3),
                 _cell(r.get("images_per_s"))]
        if upscale:
            cells += [_cell(r.get("lr_pixels_per_s"), 1e-6), _cell(r.get("images_512_per_s"))]
        cells += [_cell(r.get("peak_memory_bytes"), 2**-30), _cell(r["xla_temp_bytes"], 2**-30),
                  _cell(r["flops_per_step"], 1e-9), _cell(r.get("tflops_per_s")), _cell(r.get("mfu"))]
        rows.append("| " + " | ".join(cells) + " |")
    rows += [f"\nbatch {r['batch_size']}: {op_profile.markdown(r['profile'])}" for r in report["results"]
             if "profile" in r]
    return "\n".join(rows)


def main(argv) -> None:
    del argv
    jax.config.update("jax_enable_compilation_cache", False)  # a cached executable would hide the compile time
    config, device = _CONFIG.value, jax.devices()[0]
    if _FIND_MAX.value and device.platform == "cpu":
        raise app.UsageError("--find_max_batch needs a GPU or TPU: on CPU the OS, not XLA, runs out of memory")
    if _MODE.value == "upscale" and not isinstance(model_from_config(config), VDVAESR):
        raise app.UsageError("--mode=upscale needs a VDVAE-SR config")
    if _REMAT.value is not None:
        config.remat = _REMAT.value
    if _DTYPE.value is not None:
        config.compute_dtype = _DTYPE.value
    measure = partial(benchmark, config, mode=_MODE.value, steps=_STEPS.value, warmup=_WARMUP.value,
                      profile_steps=_PROFILE.value)
    batch_sizes = sorted(int(b) for b in _BATCH_SIZES.value)  # the allocator's peak only rises
    report = {
        "config": config_flags.get_config_filename(flags.FLAGS["config"]), "mode": _MODE.value,
        "device": device.device_kind, "platform": device.platform, "compute_dtype": config.compute_dtype,
        "remat": config.remat, "scan_unroll": config.scan_unroll, "variant": config.variant,
        "steps": _STEPS.value, "warmup": _WARMUP.value,
    }
    report["results"] = [measure_or_out_of_memory(measure, b) for b in batch_sizes]
    if _FIND_MAX.value:
        fitted = [r["batch_size"] for r in report["results"] if not r.get("out_of_memory")]
        if not fitted:
            raise app.UsageError(f"none of --batch_sizes={_BATCH_SIZES.value} fits on the device")
        report["max_batch_size"], more = largest_batch(measure, fitted[-1])
        report["results"] += more
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(markdown(report))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
