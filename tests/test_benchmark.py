"""The speed benchmark on a tiny VDVAE-SR: its report's numbers agree with each other, and the search for the
largest batch stops at the first out-of-memory error."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from absl import app
from tiny_training import tiny_config

from benchmarks import kernel_bench
from benchmarks.benchmark import (
    GPU_TARGETS,
    DoesNotFit,
    benchmark,
    gelu_as_identity,
    gpu_target,
    jaxpr_flops,
    largest_batch,
    markdown,
    measure_or_out_of_memory,
    peak_tflops,
    train_inputs,
    train_step,
)
from vdvae_sr_jax import train
from vdvae_sr_jax.model import init_params, model_from_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return tiny_config(steps=2, batch_per_device=2, checkpoint_every=0)  # rolled scans; FLOPs count every block


def _state_bytes(config) -> int:
    trainable, _ = train.split_params(jax.eval_shape(lambda: init_params(model_from_config(config))),
                                      config.train.frozen)
    state = jax.eval_shape(lambda p: train.init_state(p, train.make_optimizer(config.train), jax.random.key(0)),
                           trainable)
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def test_training_report(config):
    record = benchmark(config, batch_size=2, mode="train", steps=2, warmup=1, profile_steps=2)
    assert record["batch_size"] == 2 and record["compile_time_s"] > record["compile_s"] > 0
    assert 0 < record["step_s_min"] <= record["step_s_median"] <= record["step_s_max"]
    assert record["images_per_s"] == pytest.approx(2 / record["step_s_median"])
    # XLA's cost analysis of the same step with every scan unrolled also counts the elementwise maths, which at
    # these tiny widths (16 channels, 4 in the bottleneck) is about a quarter of it (23%).
    unrolled = config.copy_and_resolve_references()
    unrolled.scan_unroll = 64
    args = train_inputs(unrolled, model_from_config(unrolled), 2)
    xla = train_step(unrolled, model_from_config(unrolled)).lower(*args).cost_analysis()["flops"]
    assert 0.6 * xla < record["flops_per_step"] < 0.9 * xla
    assert record["tflops_per_s"] == pytest.approx(record["flops_per_step"] / record["step_s_median"] / 1e12)
    assert record["donated_bytes"] == _state_bytes(config)  # the whole train state is updated in place
    assert record["peak_memory_bytes"] is None and record["mfu"] is None  # CPU: no allocator stats, no peak
    profile = record["profile"]  # the tiny model's convolutions are cheap, but they are there
    assert profile["steps"] == 2 and profile["categories"]["convolution"]["ms_per_step"] > 0
    table = markdown({"mode": "train", "results": [record]})
    assert table.splitlines()[2].startswith("| 2 |") and table.count("| n/a |") == 2  # peak memory and MFU
    assert "batch 2: Device time per step" in table
    compile_only = {k: record[k] for k in ("batch_size", "compile_time_s", "xla_temp_bytes", "flops_per_step")}
    assert markdown({"mode": "train", "results": [compile_only]}).count("n/a") == 5  # what --steps=0 leaves out


def test_upscale_report(config):
    record = benchmark(config, batch_size=3, mode="upscale", steps=2, warmup=1)
    lr_pixels = 3 * config.model.lr_image_size**2
    assert record["lr_pixels_per_s"] == pytest.approx(lr_pixels / record["step_s_median"])
    assert record["images_512_per_s"] == pytest.approx(record["lr_pixels_per_s"] / 512**2)
    assert record["flops_per_step"] > 0 and record["donated_bytes"] == 0
    assert "512² LR images/s" in markdown({"mode": "upscale", "results": [record]})


def test_peak_table_matches_device_kinds():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "float32") == 156.0
    assert peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert peak_tflops("TPU v5p", "bfloat16") == 459.0
    assert peak_tflops("NVIDIA L4", "bfloat16") == 121.0 and peak_tflops("NVIDIA L40S", "bfloat16") == 362.05
    assert peak_tflops("TPU v4", "float32") is None
    assert peak_tflops("cpu", "float32") is None


@pytest.mark.parametrize("too_large", [
    jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes"),
    DoesNotFit("batch 24 needs 70.0 GiB, the GPU gives 59.3"),  # --target_gpu: XLA's memory against the GPU's
])
def test_largest_batch_doubles_until_out_of_memory(too_large):
    def measure(batch):
        if batch > 12:
            raise too_large
        return {"batch_size": batch}

    def broken(batch):
        raise jax.errors.JaxRuntimeError("INTERNAL: a compiler bug")

    fits, records = largest_batch(measure, 3)
    assert fits == 12 and [r["batch_size"] for r in records] == [6, 12]
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        largest_batch(broken, 1)


def test_a_batch_out_of_memory_is_recorded_and_the_rest_kept():
    def measure(batch):
        if batch > 12:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes")
        return {"batch_size": batch, "compile_time_s": 1.0, "xla_temp_bytes": 0, "flops_per_step": 1e9}

    records = [measure_or_out_of_memory(measure, b) for b in (8, 16)]
    assert records[0]["compile_time_s"] == 1.0 and records[1] == {"batch_size": 16, "out_of_memory": True}
    table = markdown({"mode": "train", "results": records}).splitlines()
    assert table[3].startswith("| 16 | out of memory |") and table[3].count("|") == table[0].count("|")

    for bug in ("INTERNAL: a compiler bug",
                "RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested 344064, available: 232448"):
        def broken(batch, bug=bug):
            raise jax.errors.JaxRuntimeError(bug)

        with pytest.raises(jax.errors.JaxRuntimeError, match=bug.split(":")[0]):
            measure_or_out_of_memory(broken, 1)


def test_a_target_gpu_report_tabulates_memory_and_roofline():
    record = {"batch_size": 64, "compile_time_s": 50.0, "xla_memory_bytes": 12 * 2**30, "roofline_step_s": 0.2,
              "roofline_mfu": 0.25, "xla_temp_bytes": 11 * 2**30, "flops_per_step": 4.9e13,
              "roofline": {"peak_tflops": 989.4, "bandwidth_tb_s": 3.35, "launch_us": 2.0, "kinds": {
                  "total": {"launches": 10, "gbytes": 600.0, "tflops": 63.0, "ms": 200.0, "memory_ms": 179.0}}}}
    table = markdown({"mode": "train", "target_gpu": "h100", "results": [
        record, measure_or_out_of_memory(lambda b: (_ for _ in ()).throw(DoesNotFit("too large")), 128)]})
    lines = table.splitlines()
    assert lines[0].startswith("| batch | compile (s) | XLA memory (GiB) | roofline step (ms) | roofline MFU |")
    assert lines[2] == "| 64 | 50 | 12 | 200 | 0.25 | 11 | 49000 |"
    assert lines[3].startswith("| 128 | out of memory |") and lines[3].count("|") == lines[0].count("|")
    assert "| total | 10 | 600.0 | 63.00 | 200.0 | 179.0 |" in table


def test_jaxpr_flops_match_xla_on_the_unrolled_program():
    """Convolutions (padded, strided, dilated, grouped) and matrix products with their gradients, in a 3-step scan:
    the jaxpr count equals XLA's cost analysis of the loop unrolled, and is 3x its count of the rolled loop."""
    def block(x, w):
        y = jax.lax.conv_general_dilated(x, w["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y @ w["d"]

    def gradients(unroll):
        def f(ws, x, cotangent):
            _, vjp = jax.vjp(lambda ws, x: jax.lax.scan(lambda c, w: (block(c, w), None), x, ws, unroll=unroll)[0],
                             ws, x)
            return vjp(cotangent)
        return jax.jit(f)

    key = jax.random.key(0)
    ws = {"k": jax.random.normal(key, (3, 3, 3, 8, 8)), "d": jax.random.normal(key, (3, 8, 8))}
    x = jax.random.normal(key, (2, 6, 6, 8))
    counted = jaxpr_flops(jax.make_jaxpr(gradients(1))(ws, x, x).jaxpr)
    assert counted == gradients(3).lower(ws, x, x).cost_analysis()["flops"] == 672768
    assert counted == pytest.approx(3 * gradients(1).lower(ws, x, x).cost_analysis()["flops"], rel=1e-4)

    odd = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (2, 2), ((1, 2), (0, 1)), lhs_dilation=(1, 2), rhs_dilation=(2, 1),
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=2))
    x, w = jnp.ones((3, 4, 9, 7)), jnp.ones((6, 2, 3, 2))
    assert jaxpr_flops(jax.make_jaxpr(odd)(x, w).jaxpr) == odd.lower(x, w).cost_analysis()["flops"] == 5040


def test_a_target_gpu_without_the_cuda_plugin_is_a_usage_error():
    """--target_gpu, and kernel_bench's --compile_for."""
    assert {"a100", "h100", "h200", "l4"} <= set(GPU_TARGETS)
    if any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
        pytest.skip("JAX's CUDA plugin is installed here: the target compiles")
    message = r"compiling for the {} without it needs JAX's CUDA plugin \(pip install 'jax\[cuda12\]'\)"
    with pytest.raises(app.UsageError, match=message.format("h100")):
        gpu_target("h100")
    with pytest.raises(app.UsageError, match=message.format("l4")):  # kernel_bench --compile_for=l4
        kernel_bench.compile_for("l4", batch=4)


@pytest.mark.parametrize("flag", ["--free_gelu", "--roofline_tflops=790", "--roofline_tb_s=4.3"])
def test_target_only_flags_without_a_target_are_usage_errors(flag, subprocess_env):
    result = subprocess.run([sys.executable, "-m", "benchmarks.benchmark", "--config=configs/demo.py", flag],
                            cwd=ROOT, capture_output=True, text=True, env=subprocess_env)
    assert result.returncode == 1 and flag.split("=")[0] in result.stderr and "needs --target_gpu" in result.stderr


def test_gelu_as_identity_leaves_the_convolutions_and_no_erf(config):
    """--free_gelu's program: every GELU (and its gradient) gone, the model FLOPs the same."""
    model = model_from_config(config)
    args = jax.eval_shape(lambda: train_inputs(config, model, 2))

    def erfs_and_flops():
        jaxpr = jax.make_jaxpr(train_step(config, model_from_config(config)))(*args).jaxpr
        return str(jaxpr).count(" erf "), jaxpr_flops(jaxpr)

    erfs, flops = erfs_and_flops()
    with gelu_as_identity():
        free_erfs, free_flops = erfs_and_flops()
    assert erfs >= 20 and free_erfs == 0 and free_flops == flops > 0
    assert erfs_and_flops() == (erfs, flops)  # and only inside the context
