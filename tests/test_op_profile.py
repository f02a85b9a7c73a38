"""The profile summary: device time per XLA op and per kind of op, from a GPU-like trace and a real CPU one."""

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

from benchmarks import op_profile


def _event(kernel: int, start_us: float, duration_us: float, hlo_op: str | None = None) -> str:
    stats = f'stats {{ metadata_id: 100 str_value: "{hlo_op}" }}' if hlo_op else ""
    return f"events {{ metadata_id: {kernel} offset_ps: {int(start_us * 1e6)} duration_ps: {int(duration_us * 1e6)} " \
           f"{stats} }}"


def _plane(name: str, lines: dict[str, list[str]], kernels: list[str]) -> str:
    text = "".join(f'lines {{ name: "{line}" {" ".join(events)} }}' for line, events in lines.items())
    text += "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{k}" }} }}' for i, k in enumerate(kernels, 1))
    text += 'stat_metadata { key: 100 value { id: 100 name: "hlo_op" } }'
    return f'planes {{ name: "{name}" {text} }}'


KERNELS = ["sm90_xmma_fprop_implicit_gemm", "loop_add_fusion_2", "cutlass_gemm", "while_5", "conv_general_dilated"]


def test_a_gpu_trace_is_summed_per_op_and_kind():
    # Two steps on device 0: a cuDNN convolution (two kernels), an elementwise fusion and a cuBLAS matmul on two
    # streams; the derived "XLA Ops" line, device 1 and the host are not counted.
    stream_a = [_event(1, 0, 30, "cudnn-conv-bias-activation.3"), _event(1, 40, 10, "cudnn-conv-bias-activation.3"),
                _event(2, 60, 4, "loop_add_fusion.2"), _event(1, 100, 30, "cudnn-conv-bias-activation.3"),
                _event(1, 140, 10, "cudnn-conv-bias-activation.3"), _event(2, 160, 4, "loop_add_fusion.2")]
    stream_b = [_event(3, 70, 6, "cublas-gemm.1"), _event(3, 170, 6, "cublas-gemm.1")]
    trace = (_plane("/device:GPU:0", {"Stream #13(compute)": stream_a, "Stream #14(compute)": stream_b,
                                      "XLA Ops": [_event(1, 0, 500)]}, KERNELS)
             + _plane("/device:GPU:1", {"Stream #13(compute)": [_event(2, 0, 900)]}, KERNELS)
             + _plane("/host:CPU", {"python": [_event(5, 0, 900, "conv_general_dilated.0")]}, KERNELS))
    summary = op_profile.summarize(ProfileData.from_text_proto(trace), steps=2)
    assert summary["source"] == "/device:GPU:0: stream lines"
    assert summary["busy_ms_per_step"] == pytest.approx(0.050)
    assert {k: round(v["ms_per_step"] * 1e3, 6) for k, v in summary["categories"].items()} == {
        "convolution": 40, "matmul": 6, "fusion": 4}
    assert sum(c["share"] for c in summary["categories"].values()) == pytest.approx(1)
    top = summary["top_ops"]
    assert [(o["op"], o["category"], o["calls_per_step"]) for o in top] == [
        ("cudnn-conv-bias-activation.3", "convolution", 2), ("cublas-gemm.1", "matmul", 1),
        ("loop_add_fusion.2", "fusion", 1)]
    assert top[0]["kernels"] == ["sm90_xmma_fprop_implicit_gemm"] and top[0]["share"] == pytest.approx(0.8)
    table = op_profile.markdown(summary).splitlines()
    assert table[0] == "Device time per step: 0.05 ms (/device:GPU:0: stream lines)"
    assert table[4] == "| convolution | 0.04 | 80.0% |"
    assert table[-1] == "| loop_add_fusion.2 | fusion | 1 | 0.004 | 8.0% |"


def test_nested_host_ops_count_their_self_time():
    # A while loop (0-100 us) running a convolution (10-60 us) on the same thread, then another op after it.
    host = {"tf_XLAEigen/1": [_event(4, 0, 100, "while.5"), _event(5, 10, 50, "conv_general_dilated.0"),
                              _event(2, 120, 5, "wrapped_tanh")],
            "python": [_event(5, 0, 900)]}  # no hlo_op: Python, not XLA
    summary = op_profile.summarize(ProfileData.from_text_proto(_plane("/host:CPU", host, KERNELS)), 1, on_host=True)
    assert summary["source"] == "/host:CPU: XLA thunks"
    assert {o["op"]: round(o["ms_per_step"] * 1e3, 6) for o in summary["top_ops"]} == {
        "conv_general_dilated.0": 50, "while.5": 50, "wrapped_tanh": 5}
    assert summary["categories"]["fusion"]["ms_per_step"] == pytest.approx(0.005)


def test_a_cpu_trace_counts_each_scan_iteration_and_reads_fusions_from_the_hlo(tmp_path):
    def body(carry, w):
        return jnp.tanh(jax.lax.conv_general_dilated(carry, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO",
                                                                                                     "NHWC"))), None

    f = jax.jit(lambda x, ws: jax.lax.scan(body, x, ws)[0] @ jnp.ones((8, 8)))
    x, ws = jnp.ones((2, 32, 32, 8)), jnp.full((3, 3, 3, 8, 8), 0.01)
    compiled = f.lower(x, ws).compile()
    compiled(x, ws).block_until_ready()

    def run():
        for _ in range(2):
            compiled(x, ws).block_until_ready()

    hlo = compiled.as_text()
    opcodes = op_profile.hlo_opcodes(hlo)
    loops = [name for name, ops in opcodes.items() if "while" in ops]
    assert len(loops) == 1 and opcodes[loops[0]] == {"while"}  # a loop's body is not what the loop op costs
    summary = op_profile.profile_steps(run, 2, tmp_path, hlo)
    convs = [o for o in summary["top_ops"] if o["category"] == "convolution"]
    assert len(convs) == 1 and convs[0]["calls_per_step"] == 3  # the scan's three iterations
    matmuls = [o for o in summary["top_ops"] if o["category"] == "matmul"]
    assert len(matmuls) == 1 and "dot" in opcodes[matmuls[0]["op"]]  # XLA:CPU runs it as a fusion
    assert summary["categories"]["convolution"]["ms_per_step"] == pytest.approx(convs[0]["ms_per_step"])
    assert sum(o["ms_per_step"] for o in summary["top_ops"]) == pytest.approx(summary["busy_ms_per_step"])


def test_a_gpu_trace_without_device_planes_says_so():
    host_only = ProfileData.from_text_proto(_plane("/host:CPU", {"python": [_event(5, 0, 9, "fusion.1")]}, KERNELS))
    with pytest.raises(ValueError, match="no /device: plane.*CUPTI.*/host:CPU"):
        op_profile.summarize(host_only, steps=1)


def test_the_compiled_hlo_tells_what_a_fusion_holds():
    hlo = """HloModule m

%fused_conv (p0: bf16[2,8,8,4], p1: bf16[3,3,4,4]) -> bf16[2,8,8,4] {
  %p0 = bf16[2,8,8,4]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,4,4]{3,2,1,0} parameter(1)
  ROOT %c = bf16[2,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

ENTRY %main (a: bf16[2,8,8,4], b: bf16[3,3,4,4]) -> (bf16[2,8,8,4], bf16[2,8,8,4]) {
  %a = bf16[2,8,8,4]{3,2,1,0} parameter(0)
  %b = bf16[3,3,4,4]{3,2,1,0} parameter(1)
  %fusion.7 = bf16[2,8,8,4]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_conv
  %gemm_fusion_copy.2 = bf16[2,8,8,4]{3,2,1,0} copy(%a)
  %cudnn-conv.1 = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$convForward"
  %g = bf16[2,8,8,4]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  ROOT %t = (bf16[2,8,8,4]{3,2,1,0}, bf16[2,8,8,4]{3,2,1,0}) tuple(%fusion.7, %gemm_fusion_copy.2)
}
"""
    opcodes = op_profile.hlo_opcodes(hlo)
    assert opcodes["fusion.7"] == {"fusion", "parameter", "convolution"} and opcodes["cudnn-conv.1"] == {"custom-call"}
    stream = [_event(2, 0, 7, "fusion.7"), _event(2, 10, 3, "gemm_fusion_copy.2"), _event(1, 20, 5, "cudnn-conv.1")]
    profile = ProfileData.from_text_proto(_plane("/device:GPU:0", {"Stream #7": stream}, KERNELS))
    by_name = {o["op"]: o["category"] for o in op_profile.summarize(profile, 1)["top_ops"]}
    assert by_name == {"fusion.7": "fusion", "gemm_fusion_copy.2": "matmul", "cudnn-conv.1": "convolution"}
    by_hlo = {o["op"]: o["category"] for o in op_profile.summarize(profile, 1, hlo_text=hlo)["top_ops"]}
    assert by_hlo == {"fusion.7": "convolution", "gemm_fusion_copy.2": "copy/transpose", "cudnn-conv.1": "convolution"}
