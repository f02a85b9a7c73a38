"""Where a step's device time goes: a JAX profiler trace summed per XLA op and per kind of op (convolutions,
matrix products, XLA's generated fusions, copies), to tell compute-bound kernels from memory-bound ones.

On a GPU the events are the kernels on the device's streams, attributed to their HLO op; on a TPU, the device's
"XLA Ops" line; on the CPU, the host threads' XLA thunks (which run concurrently, so their sum can exceed the
step's wall time). Times are self times: an op's nested ops (a while loop's body) count for themselves.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import jax

# Each kind: the HLO opcodes that make an op one (its own, or any in the computations it calls, as a fusion
# does), and a pattern for op and kernel names where the opcodes do not tell (library calls, or no HLO at hand).
# Tried in this order: Pallas kernels (`vdvae_sr_jax.kernels`) are custom calls of their own, cuDNN's convolution
# kernels are "implicit gemm"s, and Triton matmuls are "gemm_fusion"s.
# "fusion" is the elementwise and reduction code XLA generates itself (XLA:CPU "wraps" a lone elementwise op).
CATEGORIES = (
    ("pallas", set(), re.compile(r"pallas_call|xla\.gpu\.triton|triton_kernel_call")),
    ("convolution", {"convolution"}, re.compile(r"cudnn-conv|convolution|conv_general|fprop|dgrad|wgrad")),
    ("matmul", {"dot"}, re.compile(r"gemm|cublas|\bdot|matmul")),
    ("copy/transpose", {"copy", "transpose"}, re.compile(r"copy|transpose")),
    ("fusion", {"fusion"}, re.compile(r"fusion|wrapped_")),
)

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^)]*\)|\S+) ([\w\-]+)\(")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")


def hlo_opcodes(hlo_text: str) -> dict[str, frozenset[str]]:
    """For each instruction of a compiled module's HLO text, its opcode and those of the computations it calls
    (through `calls=`: fusions and their nested fusions, not while-loop bodies)."""
    own: dict[str, tuple[str, str | None]] = {}
    body: dict[str, list[str]] = defaultdict(list)
    computation = None
    for line in hlo_text.splitlines():
        if match := _COMPUTATION.match(line):
            computation = match.group(1)
        elif (match := _INSTRUCTION.match(line)) and computation is not None:
            calls = _CALLS.search(line)
            own[match.group(1)] = (match.group(2), calls.group(1) if calls else None)
            body[computation].append(match.group(1))

    def opcodes(name: str, seen: frozenset = frozenset()) -> frozenset[str]:
        opcode, called = own[name]
        inner = {op for i in body.get(called, ()) if called not in seen for op in opcodes(i, seen | {called})}
        return frozenset({opcode} | inner)

    return {name: opcodes(name) for name in own}


def category(names: str, opcodes: frozenset[str] = frozenset()) -> str:
    """The kind of an op from its HLO opcodes (see `hlo_opcodes`), else from its and its kernels' names (a cuDNN or
    cuBLAS call is a `custom-call`): one of CATEGORIES' names, or "other"."""
    by_opcode = (name for name, kinds, _ in CATEGORIES if opcodes & kinds)
    by_name = (name for name, _, pattern in CATEGORIES if pattern.search(names))
    return next(by_opcode, None) or next(by_name, "other")


def _device_events(profile, on_host: bool) -> tuple[str, list]:
    """(where the events came from, lists of one line's events each) for the first device in the trace, or with
    `on_host` (the CPU backend) for the host's XLA thunks."""
    names = [p.name for p in profile.planes]
    if on_host:
        host = next((p for p in profile.planes if p.name == "/host:CPU"), None)
        if host is None:
            raise ValueError(f"no /host:CPU plane in the trace: {names}")
        return "/host:CPU: XLA thunks", [[e for e in line.events if "hlo_op" in dict(e.stats)] for line in host.lines]
    device = min((p for p in profile.planes if p.name.startswith("/device:")), key=lambda p: p.name, default=None)
    if device is None:
        raise ValueError(f"no /device: plane in the trace (is CUPTI installed?): {names}")
    streams = [line for line in device.lines if line.name.startswith("Stream")]
    chosen = streams or [line for line in device.lines if line.name == "XLA Ops"]
    return f"{device.name}: {'stream' if streams else 'XLA Ops'} lines", [list(line.events) for line in chosen]


def _self_times(events: list) -> list[list]:
    """[op, kernel, self ns] of one line's events, less the time of the events nested in each."""
    out: list[list] = []
    stack: list[tuple[float, list]] = []  # (end, entry in out) of the enclosing events
    for event in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
        while stack and stack[-1][0] <= event.start_ns:
            stack.pop()
        if stack:
            stack[-1][1][2] -= event.duration_ns
        out.append([dict(event.stats).get("hlo_op") or event.name, event.name, event.duration_ns])
        stack.append((event.start_ns + event.duration_ns, out[-1]))
    return out


def summarize(profile, steps: int, on_host: bool = False, hlo_text: str = "", top: int = 25) -> dict:
    """Per-step device time by category and of the `top` costliest ops, from a `jax.profiler.ProfileData`; with
    `on_host`, of the XLA:CPU thunks instead. `hlo_text`, the compiled program's, tells what each fusion holds."""
    source, lines = _device_events(profile, on_host)
    per_op: dict[str, list] = defaultdict(lambda: [0.0, 0, set()])
    for events in lines:
        for op, kernel, ns in _self_times(events):
            per_op[op][0] += ns
            per_op[op][1] += 1
            per_op[op][2].add(kernel)
    total = sum(ns for ns, _, _ in per_op.values())
    if not total:
        raise ValueError(f"the trace has no device time ({source})")
    opcodes = hlo_opcodes(hlo_text)
    kinds = {op: category(" ".join([op, *sorted(kernels)]), opcodes.get(op, frozenset()))
             for op, (_, _, kernels) in per_op.items()}
    by_category: dict[str, float] = defaultdict(float)
    for op, (ns, _, _) in per_op.items():
        by_category[kinds[op]] += ns
    ranked = sorted(per_op.items(), key=lambda item: -item[1][0])[:top]
    return {
        "source": source,
        "steps": steps,
        "busy_ms_per_step": total / steps / 1e6,
        "categories": {name: {"ms_per_step": ns / steps / 1e6, "share": ns / total}
                       for name, ns in sorted(by_category.items(), key=lambda item: -item[1])},
        "top_ops": [{"op": op, "category": kinds[op], "kernels": sorted(kernels)[:3], "calls_per_step": n / steps,
                     "ms_per_step": ns / steps / 1e6, "share": ns / total}
                    for op, (ns, n, kernels) in ranked],
    }


def profile_steps(run, steps: int, trace_dir: str | Path, hlo_text: str = "") -> dict:
    """Traces `run()` (which runs `steps` steps of the program compiled to `hlo_text` and waits for them) into
    `trace_dir` and summarises it."""
    with jax.profiler.trace(str(trace_dir)):
        run()
    traces = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"the profiler wrote no *.xplane.pb under {trace_dir}")
    profile = jax.profiler.ProfileData.from_file(str(traces[-1]))
    return summarize(profile, steps, jax.default_backend() == "cpu", hlo_text)


def markdown(summary: dict, top: int = 10) -> str:
    """The categories, then the `top` costliest ops, as Markdown tables."""
    rows = [f"Device time per step: {summary['busy_ms_per_step']:.3g} ms ({summary['source']})", "",
            "| kind | ms/step | share |", "|---|---|---|"]
    rows += [f"| {name} | {c['ms_per_step']:.3g} | {c['share']:.1%} |" for name, c in summary["categories"].items()]
    rows += ["", "| op | kind | calls/step | ms/step | share |", "|---|---|---|---|---|"]
    rows += [f"| {o['op']} | {o['category']} | {o['calls_per_step']:.3g} | {o['ms_per_step']:.3g} | {o['share']:.1%} |"
             for o in summary["top_ops"][:top]]
    return "\n".join(rows)
