"""The HLO roofline's kernels, bytes and FLOPs, on programs XLA compiled here and one it compiled for an H100."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo_roofline

# `jax.grad` of sum((conv3x3(gelu(x), w) + x)²) in bf16, x [2, 8, 8, 16], w [3, 3, 16, 16], compiled for
# `benchmark.gpu_target("h100")` on a machine without a GPU.
H100_CONV_GRAD = Path(__file__).parent / "data" / "h100_conv_grad.hlo"


def _compiled(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_an_elementwise_program_reads_and_writes_its_array_once():
    (kernel,) = hlo_roofline.kernels(_compiled(lambda x: x * 2 + 1, jnp.ones((512, 256))))
    assert (kernel.kind, kernel.count, kernel.bytes_read, kernel.bytes_written, kernel.flops) == (
        "fusion", 1, 512 * 256 * 4, 512 * 256 * 4, 0)


def test_convolution_and_matmul_flops():
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    (kernel,) = hlo_roofline.kernels(_compiled(conv, jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5))))
    assert (kernel.kind, kernel.flops) == ("convolution", 2 * (2 * 8 * 8 * 5) * (3 * 3 * 4))
    assert kernel.bytes_read == (2 * 8 * 8 * 4 + 3 * 3 * 4 * 5) * 4 and kernel.bytes_written == 2 * 8 * 8 * 5 * 4
    (kernel,) = hlo_roofline.kernels(_compiled(jnp.dot, jnp.ones((32, 64)), jnp.ones((64, 16))))
    assert (kernel.kind, kernel.flops) == ("matmul", 2 * 32 * 16 * 64)


def test_a_loop_body_counts_once_per_trip_and_a_stacked_output_writes_one_slice():
    def scan(x):
        return jax.lax.scan(lambda c, _: (jnp.sin(c) * 2.0, c), x, None, length=7)

    kernels = hlo_roofline.kernels(_compiled(scan, jnp.ones((256, 256))))
    in_loop = [k for k in kernels if k.count == 7]
    fusions = [k for k in in_loop if k.kind == "fusion" and k.bytes_written == 256 * 256 * 4]
    assert len(fusions) == 2  # sin(c) * 2, and c written into the [7, 256, 256] stack in place
    assert max(k.bytes_written for k in in_loop) == 256 * 256 * 4  # a trip writes one slice, not the stack


def test_a_fusion_reads_only_the_slices_of_a_converted_operand():
    """As XLA:GPU fuses the bf16 cast of the flat f32 params with each layer's slice of them."""
    hlo = """HloModule m

%fused (p: f32[65536]) -> (bf16[256], bf16[8,32]) {
  %p = f32[65536]{0} parameter(0)
  %c = bf16[65536]{0} convert(%p)
  %a = bf16[256]{0} slice(%c), slice={[0:256]}
  %b = bf16[256]{0} slice(%c), slice={[1024:1280]}
  %r = bf16[8,32]{1,0} bitcast(%b)
  ROOT %t = (bf16[256]{0}, bf16[8,32]{1,0}) tuple(%a, %r)
}

ENTRY %main (v: f32[65536]) -> (bf16[256], bf16[8,32]) {
  %v = f32[65536]{0} parameter(0)
  ROOT %f = (bf16[256]{0}, bf16[8,32]{1,0}) fusion(%v), kind=kLoop, calls=%fused
}
"""
    (kernel,) = hlo_roofline.kernels(hlo)
    assert (kernel.bytes_read, kernel.bytes_written) == (2 * 256 * 4, 2 * 256 * 2)


def test_a_stack_updated_in_place_through_a_bitcast_is_not_read():
    """As XLA:GPU writes a block's weight gradient into a rolled loop's stack, laid out with the loop axis inside."""
    hlo = """HloModule m

%fused (stack: f32[32,3,3,16,8], grad: bf16[8,3,3,16], i: s32[]) -> f32[8,32,3,3,16] {
  %stack = f32[32,3,3,16,8]{3,2,1,0,4} parameter(0)
  %view = f32[8,32,3,3,16]{4,3,2,1,0} bitcast(%stack)
  %grad = bf16[8,3,3,16]{3,2,1,0} parameter(1)
  %one = bf16[8,1,3,3,16]{4,3,2,1,0} bitcast(%grad)
  %update = f32[8,1,3,3,16]{4,3,2,1,0} convert(%one)
  %zero = s32[] constant(0)
  %i = s32[] parameter(2)
  ROOT %dus = f32[8,32,3,3,16]{4,3,2,1,0} dynamic-update-slice(%view, %update, %zero, %i, %zero, %zero, %zero)
}

ENTRY %main (s: f32[32,3,3,16,8], g: bf16[8,3,3,16], i: s32[]) -> f32[8,32,3,3,16] {
  %s = f32[32,3,3,16,8]{3,2,1,0,4} parameter(0)
  %g = bf16[8,3,3,16]{3,2,1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %f = f32[8,32,3,3,16]{4,3,2,1,0} fusion(%s, %g, %i), kind=kLoop, calls=%fused
}
"""
    (kernel,) = hlo_roofline.kernels(hlo)
    update = 8 * 3 * 3 * 16
    assert (kernel.bytes_read, kernel.bytes_written) == (update * 2 + 4, update * 4)


def test_cudnn_calls_of_a_gpu_program():
    kernels = {k.name: k for k in hlo_roofline.kernels(H100_CONV_GRAD.read_text())}
    convs = [k for k in kernels.values() if k.kind == "convolution"]
    assert sorted(k.name.rsplit(".", 1)[0] for k in convs) == [
        "cudnn-conv-bias-activation", "cudnn-conv-bw-filter", "cudnn-conv-bw-input"]
    assert all(k.flops == 2 * (2 * 8 * 8 * 16) * (3 * 3 * 16) for k in convs)  # forward, dx and dW alike
    forward = kernels["cudnn-conv-bias-activation.3"]
    x, w, bias = 2 * 8 * 8 * 16 * 2, 3 * 3 * 16 * 16 * 2, 16 * 2
    assert forward.bytes_read == x + w + bias + x  # GELU(x), the kernel, the bias and the residual x
    assert forward.bytes_written == x  # not cuDNN's scratch buffer
    assert kernels["cudnn-conv-bw-filter.1"].bytes_written == w


def test_a_cublas_matmul_call():
    """As XLA:GPU calls cuBLASLt for a dot that Triton does not take: the call's scratch buffer is not output."""
    hlo = """HloModule m

ENTRY %main (a: bf16[64,32], b: bf16[32,16]) -> (bf16[64,16], s8[1024]) {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  ROOT %custom-call.1 = (bf16[64,16]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],\
"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
}
"""  # a backslash-newline continues the HLO line
    (kernel,) = hlo_roofline.kernels(hlo)
    assert (kernel.kind, kernel.flops) == ("matmul", 2 * 64 * 16 * 32)
    assert (kernel.bytes_read, kernel.bytes_written) == ((64 * 32 + 32 * 16) * 2, 64 * 16 * 2)


def test_a_pallas_kernel_has_the_flops_its_call_states():
    """As `vdvae_sr_jax.kernels` states them in the pallas_call's metadata, which XLA:GPU keeps in the Triton
    call's backend config (its Triton IR shortened here)."""
    hlo = """HloModule m

ENTRY %main (x: bf16[256,512], w: bf16[512,128]) -> bf16[256,128] {
  %x = bf16[256,512]{1,0} parameter(0)
  %w = bf16[512,128]{1,0} parameter(1)
  ROOT %pallas_call.3 = bf16[256,128]{1,0} custom-call(%x, %w), custom_call_target="__gpu$xla.gpu.triton", \
operand_layout_constraints={bf16[256,512]{1,0}, bf16[512,128]{1,0}}, api_version=API_VERSION_TYPED_FFI, \
backend_config={debug = false, grid_x = 4 : i32, grid_y = 1 : i32, grid_z = 1 : i32, ir = "ML\\EFR\\01", \
name = "_forward_kernel", num_stages = 3 : i32, num_warps = 4 : i32, \
serialized_metadata = "{\\22flops\\22: \\2233554432\\22}"}
}
"""
    (kernel,) = hlo_roofline.kernels(hlo)
    assert (kernel.kind, kernel.flops) == ("pallas", 2 * 256 * 512 * 128)
    assert (kernel.bytes_read, kernel.bytes_written) == ((256 * 512 + 512 * 128) * 2, 256 * 128 * 2)


def test_roofline_takes_each_kernel_at_its_slower_bound():
    hlo = H100_CONV_GRAD.read_text()
    kernels = hlo_roofline.kernels(hlo)
    peak, bandwidth, launch = 1e12, 1e9, 1e-6
    report = hlo_roofline.roofline(hlo, peak, bandwidth, launch)
    total = report["kinds"]["total"]
    moved = sum(k.bytes_read + k.bytes_written for k in kernels)
    assert total["launches"] == len(kernels) == 9
    assert total["gbytes"] == pytest.approx(moved / 1e9)
    assert total["tflops"] == pytest.approx(3 * 589824 / 1e12)
    expected = sum(max(k.flops / peak, (k.bytes_read + k.bytes_written) / bandwidth) + launch for k in kernels)
    assert total["ms"] == pytest.approx(expected * 1e3)
    assert total["memory_ms"] == pytest.approx(moved / bandwidth * 1e3)
    assert sum(r["launches"] for kind, r in report["kinds"].items() if kind != "total") == 9
    assert "| convolution | 3 |" in hlo_roofline.markdown(report)


def test_sources_name_the_model_op_and_share_out_the_roofline():
    """Each kernel's model op: the op_name's last three parts without JAX's tracing, one name for every run of
    scanned blocks, backward ops apart; the costliest ops' rows add up to the total."""
    scanned = ('metadata={op_name="jit(train_step)/transpose(jvp(VDVAESR))/VDVAESR._elbo/decoder/while/body/'
               'closed_call/dec_blocks_62_74.<lambda>/dec_blocks_62_74.posterior/resnet/resnet.after_c1/c4/add"}')
    assert hlo_roofline.source(scanned) == "resnet.after_c1/c4/add (backward)"
    assert hlo_roofline.source(scanned.replace("62_74", "13_24")) == hlo_roofline.source(scanned)
    assert hlo_roofline.source('metadata={op_name="jit(loss)/jvp()/mul"}') == "mul"
    assert hlo_roofline.source("backend_config={}") == ""
    hlo = H100_CONV_GRAD.read_text()
    report = hlo_roofline.roofline(hlo, 1e12, 1e9, 1e-6)
    by_source = {r["source"]: r for r in report["sources"]}
    assert by_source["conv_general_dilated"]["launches"] == 1  # the forward convolution
    assert by_source["conv_general_dilated (backward)"]["launches"] == 2  # its input and its kernel gradients
    assert by_source["conv_general_dilated (backward)"]["tflops"] == pytest.approx(2 * 589824 / 1e12)
    for key in ("launches", "gbytes", "ms"):
        assert sum(r[key] for r in report["sources"]) == pytest.approx(report["kinds"]["total"][key])
    assert "| conv_general_dilated (backward) | 2 |" in hlo_roofline.markdown(report)
    assert len(hlo_roofline.roofline(hlo, 1e12, 1e9, 1e-6, n_sources=2)["sources"]) == 2
