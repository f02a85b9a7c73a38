"""The speed benchmark on a tiny VDVAE-SR: its report's numbers agree with each other, its command line writes the
JSON and the table, and the search for the largest batch stops at the first out-of-memory error."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from tiny_training import tiny_config

from benchmarks.benchmark import (
    benchmark,
    jaxpr_flops,
    largest_batch,
    markdown,
    measure_or_out_of_memory,
    peak_tflops,
    train_inputs,
    train_step,
    upscale_inputs,
    upscale_step,
)
from configs import demo
from vdvae_sr_jax import train
from vdvae_sr_jax.model import init_params, model_from_config

ROOT = Path(__file__).resolve().parents[1]
# tiny_config's model, as overrides of configs/demo.py on the command line
TINY_MODEL = {"width": 16, "zdim": 2, "image_size": 16, "lr_image_size": 4, "lr_width": 16,
              "enc_blocks": "16x1,16d2,8x1,8d2,4x1,4d4,1x1", "dec_blocks": "1x1,4m1,8m4,8x1,16m8,16x1",
              "lr_enc_blocks": "4x1,4d4,1x1"}


def _run(*flags, env):
    return subprocess.run([sys.executable, "-m", "benchmarks.benchmark", *flags], cwd=ROOT, capture_output=True,
                          text=True, env=env)


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


def test_peak_table_matches_device_kinds():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "float32") == 156.0
    assert peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert peak_tflops("TPU v5p", "bfloat16") == 459.0
    assert peak_tflops("NVIDIA L4", "bfloat16") == 121.0 and peak_tflops("NVIDIA L40S", "bfloat16") == 362.05
    assert peak_tflops("TPU v4", "float32") is None
    assert peak_tflops("cpu", "float32") is None


def test_largest_batch_doubles_until_out_of_memory():
    def measure(batch):
        if batch > 12:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes")
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


def test_the_upscale_command_line_writes_the_report_and_the_table(tmp_path, subprocess_env):
    """Upscaling with the Pallas variant, which on the CPU runs XLA's ops: the JSON names the variant, its FLOPs are
    the reference's counted in-process, its throughput follows from the step time, and the table is printed."""
    output = tmp_path / "report.json"
    result = _run("--config=configs/demo.py", *(f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()),
                  "--mode=upscale", "--config.variant=pallas", "--batch_sizes=3", "--steps=2", "--warmup=1",
                  f"--output={output}", env=subprocess_env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert {k: report[k] for k in ("config", "mode", "platform", "compute_dtype", "variant", "steps")} == {
        "config": "configs/demo.py", "mode": "upscale", "platform": "cpu", "compute_dtype": "float32",
        "variant": "pallas", "steps": 2}
    (record,) = report["results"]
    assert record["batch_size"] == 3 and record["compile_time_s"] > 0 and record["donated_bytes"] == 0
    assert record["lr_pixels_per_s"] == pytest.approx(3 * 4**2 / record["step_s_median"])
    assert record["images_512_per_s"] == pytest.approx(record["lr_pixels_per_s"] / 512**2)
    config = demo.get_config()
    config.model.update(TINY_MODEL)
    model = model_from_config(config)
    args = jax.eval_shape(lambda: upscale_inputs(config, model, 3))
    assert record["flops_per_step"] == jaxpr_flops(jax.make_jaxpr(upscale_step(config, model))(*args).jaxpr) > 0
    table = markdown(report)
    assert "512² LR images/s" in table.splitlines()[0] and result.stdout.rstrip().endswith(table)


@pytest.mark.parametrize("flags, message", [
    (["--find_max_batch"], "--find_max_batch needs a GPU or TPU"),
    (["--mode=upscale", "--config=configs/demo_vdvae.py"], "--mode=upscale needs a VDVAE-SR config"),
])
def test_usage_errors(flags, message, subprocess_env):
    result = _run("--config=configs/demo.py", *flags, env=subprocess_env)
    assert result.returncode == 1 and message in result.stderr
