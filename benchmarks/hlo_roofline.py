"""A roofline of a compiled XLA program from its optimised HLO text: the bytes each kernel reads and writes and the
FLOPs of its convolutions and matrix products, times the trip counts of the loops around it.

Each kernel is taken at the slower of its FLOPs at the peak rate and its bytes at the memory bandwidth, plus a
fixed launch cost: a lower bound on the step time for XLA's own choice of kernels, which tells how far the fusion
structure lets a device go. `benchmark.py --target_gpu` applies it to a GPU program compiled without the GPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

from benchmarks import op_profile

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
# Ops that launch nothing: they name, pack or unpack buffers.
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
        "opt-barrier", "partition-id", "replica-id", "async-done", "copy-done", "domain"}
SLICES = {"slice", "dynamic-slice", "gather"}
# Ops whose every output element needs all of an input, or that hand an input on whole (as a fusion's output);
# any other op (elementwise, broadcast, transpose) needs only the input elements under the output elements used.
WHOLE = {"tuple", "reduce", "reduce-window", "dot", "convolution", "scatter", "sort", "select-and-scatter",
         "dynamic-update-slice", "custom-call", "fusion", "concatenate", "pad", "reverse", "iota", "rng"}
# Parts of an op_name path that say how JAX traced the op, not where in the model it is.
_TRACING = re.compile(r"^(?:\w*\(.*\)|while|body|cond|closed_call|branch_\d+_fun)$")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    root: bool


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of the program: `count` launches per run, each reading and writing that many bytes; `source` is
    the model op it comes from (see `source`)."""

    name: str
    kind: str
    count: int
    bytes_read: int
    bytes_written: int
    flops: int
    source: str = ""


def array_bytes(type_text: str) -> int:
    """Bytes of the arrays in an HLO type (a tuple's elements summed)."""
    return sum(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(type_text))


def array_dims(type_text: str) -> tuple[int, ...]:
    """The dimensions of the first array in an HLO type."""
    match = _ARRAY.search(type_text)
    return tuple(int(d) for d in match.group(2).split(",") if d) if match else ()


def _split_operands(rest: str) -> tuple[str, str]:
    """(operand list, attributes) of the text after an opcode's opening parenthesis."""
    depth = 1
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """(each computation's instructions, the entry computation's name) of a module's HLO text."""
    computations: dict[str, list[Instruction]] = {}
    entry, body = None, None
    for line in hlo_text.splitlines():
        if header := _HEADER.match(line):
            body = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.startswith("}"):
            body = None
        elif body is not None and (match := _INSTRUCTION.match(line)):
            operands, attributes = _split_operands(match.group(5))
            body.append(Instruction(match.group(2), match.group(3), match.group(4),
                                    tuple(re.findall(r"%([\w.\-]+)", operands)), attributes, bool(match.group(1))))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _attribute(instruction: Instruction, key: str) -> str | None:
    match = re.search(rf"\b{key}=%?([\w.\-]+)", instruction.attributes)
    return match.group(1) if match else None


def source(attributes: str) -> str:
    """The model op an instruction comes from: the last three parts of its op_name, less JAX's tracing wrappers,
    with numbers after an underscore as N (so that every run of scanned blocks counts as one), and "(backward)"
    where autodiff transposed it; "" without an op_name."""
    op_name = re.search(r'op_name="([^"]*)"', attributes)
    if op_name is None:
        return ""
    parts = [part for part in op_name.group(1).split("/") if not _TRACING.match(part)]
    where = re.sub(r"_\d+", "_N", "/".join(parts[-3:]))
    return f"{where} (backward)" if "transpose(" in op_name.group(1) else where


def custom_call_target(instruction: Instruction) -> str:
    """The library function a custom call calls (a cuDNN convolution, a cuBLAS matmul), or ""."""
    match = re.search(r'custom_call_target="([^"]+)"', instruction.attributes)
    return match.group(1) if match else ""


def trip_count(instruction: Instruction) -> int:
    """A while loop's trip count as XLA inferred it (its `known_trip_count`); 1 where XLA could not."""
    match = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
    return int(match.group(1)) if match else 1


def conv_flops(instruction: Instruction, types: dict[str, str]) -> int:
    """2 per multiply-add of a convolution (an HLO convolution or a cuDNN call), from its kernel and the forward
    convolution's output; padding taps counted."""
    labels = re.search(r"dim_labels=\w+_(\w+)->(\w+)", instruction.attributes)
    if labels is None:
        return 0
    target = custom_call_target(instruction)
    operand_types = [types[o] for o in instruction.operands]
    if "BackwardFilter" in target:  # (x, dy) -> dW
        kernel, output = array_dims(instruction.type), array_dims(operand_types[1])
    elif "BackwardInput" in target:  # (dy, W) -> dx
        kernel, output = array_dims(operand_types[1]), array_dims(operand_types[0])
    else:  # (x, W, ...) -> y
        kernel, output = array_dims(operand_types[1]), array_dims(instruction.type)
    out_features = output[labels.group(2).index("f")]
    return 2 * math.prod(output) // out_features * math.prod(kernel)


def dot_flops(instruction: Instruction, types: dict[str, str]) -> int:
    """2 per multiply-add of an HLO dot or a cuBLAS matmul call."""
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
    if contracting is None:
        contracting = re.search(r'"lhs_contracting_dimensions":\[([\d",]*)\]', instruction.attributes)
    lhs = array_dims(types[instruction.operands[0]])
    depth = math.prod(lhs[int(d)] for d in contracting.group(1).replace('"', "").split(",") if d) if contracting else 1
    return 2 * math.prod(array_dims(instruction.type)) * depth


class _Program:
    """The parsed module, with every instruction's type by name (names are unique in a module)."""

    def __init__(self, hlo_text: str):
        self.computations, self.entry = parse(hlo_text)
        self.types = {i.name: i.type for body in self.computations.values() for i in body}

    def opcodes(self, instruction: Instruction) -> frozenset[str]:
        """An instruction's opcode and those of the computations it calls (a fusion's), as op_profile classifies."""
        called = self.computations.get(_attribute(instruction, "calls"), ())
        return frozenset({instruction.opcode}).union(*(self.opcodes(i) for i in called))

    def flops(self, instruction: Instruction) -> int:
        """FLOPs of an instruction, and of the computations it calls (a fusion's dots); a Pallas kernel's as its
        pallas_call's metadata states them."""
        target = custom_call_target(instruction)
        if stated := re.search(r"serialized_metadata ?= ?.*?flops\\22: ?\\22(\d+)", instruction.attributes):
            return int(stated.group(1))
        if instruction.opcode == "convolution" or "conv" in target:
            return conv_flops(instruction, self.types)
        if instruction.opcode == "dot" or re.search(r"gemm|matmul", target):
            return dot_flops(instruction, self.types)
        called = _attribute(instruction, "calls")
        return sum(self.flops(i) for i in self.computations.get(called, ()))

    def fusion_bytes(self, instruction: Instruction) -> tuple[int, int]:
        """(read, written) bytes of a fusion: an operand that the fused code only slices counts as its slices, the
        buffer a dynamic-update-slice updates in place (directly or through bitcasts, as a rolled loop's stack in a
        layout whose loop axis is not the outermost) as nothing read and its update written."""
        body = self.computations[_attribute(instruction, "calls")]
        users = defaultdict(list)
        for i in body:
            for operand in i.operands:
                users[operand].append(i)
        memo: dict[str, int | None] = {}

        def slices_only(name: str) -> int | None:
            """Elements of `name` that the fused code reads if every use of it ends in slices (XLA computes a
            fused elementwise op only where its output is used), else None."""
            if name not in memo:
                uses = users[name]
                if not uses or any(u.opcode not in SLICES and (u.opcode in WHOLE or u.root) for u in uses):
                    memo[name] = None
                else:
                    parts = [math.prod(array_dims(u.type)) if u.opcode in SLICES else slices_only(u.name)
                             for u in uses]
                    memo[name] = None if None in parts else sum(parts)
            return memo[name]

        def updated_in_place(name: str) -> bool:
            uses = users[name]
            return bool(uses) and all(u.opcode == "dynamic-update-slice" and u.operands[0] == name
                                      or u.opcode == "bitcast" and updated_in_place(u.name) for u in uses)

        read = 0
        for parameter in (i for i in body if i.opcode == "parameter"):
            if updated_in_place(parameter.name):
                continue
            size = math.prod(array_dims(parameter.type))
            sliced = slices_only(parameter.name)
            read += array_bytes(parameter.type) * (size if sliced is None else min(size, sliced)) // max(size, 1)
        by_name = {i.name: i for i in body}
        root = next(i for i in body if i.root)
        outputs = [by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
        written = sum(array_bytes(self.types[o.operands[1]]) if o.opcode == "dynamic-update-slice"
                      else array_bytes(o.type) for o in outputs)
        return read, written

    def kernels(self, computation: str, count: int = 1) -> list[Kernel]:
        """The kernels a computation launches, each run `count` times; loops and calls are entered."""
        out = []
        for instruction in self.computations[computation]:
            if instruction.opcode in FREE:
                continue
            if instruction.opcode == "while":
                out += self.kernels(_attribute(instruction, "body"), count * trip_count(instruction))
            elif instruction.opcode in ("call", "conditional", "async-start"):
                called = re.findall(r"(?:to_apply|calls|branch_computations=\{|true_computation|false_computation)"
                                    r"=?%([\w.\-]+)", instruction.attributes)
                for name in called:
                    out += self.kernels(name, count)
            else:
                out.append(self._kernel(instruction, count))
        return out

    def _kernel(self, instruction: Instruction, count: int) -> Kernel:
        if instruction.opcode == "fusion":
            read, written = self.fusion_bytes(instruction)
        elif instruction.opcode == "dynamic-update-slice":
            read = written = array_bytes(self.types[instruction.operands[1]])
        else:
            read = sum(array_bytes(self.types[o]) for o in instruction.operands)
            written = array_bytes(re.sub(r"\b[su]8\[\d+\]", "", instruction.type))  # less cuDNN's or cuBLAS's scratch
        kind = op_profile.category(f"{instruction.name} {custom_call_target(instruction)}", self.opcodes(instruction))
        return Kernel(instruction.name, kind, count, read, written, self.flops(instruction),
                      source(instruction.attributes))


def kernels(hlo_text: str) -> list[Kernel]:
    """Every kernel a compiled module's run launches, from its optimised HLO text."""
    program = _Program(hlo_text)
    return program.kernels(program.entry)


def roofline(hlo_text: str, peak_flops: float, bandwidth: float, launch_s: float = 2e-6, n_sources: int = 25) -> dict:
    """The program's kernels summed per kind (op_profile's categories) and in all: launches, GB moved, TFLOPs, and
    the roofline time in ms (each kernel at the slower of FLOPs/`peak_flops` and bytes/`bandwidth`, plus
    `launch_s`); `memory_ms` is the bytes alone at the bandwidth. `sources` sums them likewise for the `n_sources`
    costliest model ops (`source`), where to look for what to fuse."""
    def row():
        return {"launches": 0, "gbytes": 0.0, "tflops": 0.0, "ms": 0.0, "memory_ms": 0.0}

    rows, sources = defaultdict(row), defaultdict(row)
    for k in kernels(hlo_text):
        moved = k.bytes_read + k.bytes_written
        seconds = max(k.flops / peak_flops, moved / bandwidth) + launch_s
        for r in rows[k.kind], rows["total"], sources[k.source]:
            r["launches"] += k.count
            r["gbytes"] += k.count * moved / 1e9
            r["tflops"] += k.count * k.flops / 1e12
            r["ms"] += k.count * seconds * 1e3
            r["memory_ms"] += k.count * moved / bandwidth * 1e3
    costliest = sorted(sources.items(), key=lambda kv: -kv[1]["ms"])[:n_sources]
    return {"peak_tflops": peak_flops / 1e12, "bandwidth_tb_s": bandwidth / 1e12, "launch_us": launch_s * 1e6,
            "kinds": dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms"])),
            "sources": [{"source": name, **r} for name, r in costliest]}


def markdown(report: dict) -> str:
    """A roofline report as a Markdown table, one row per kind of kernel."""
    rows = [f"roofline at {report['peak_tflops']:.0f} TFLOP/s, {report['bandwidth_tb_s']:.2f} TB/s and "
            f"{report['launch_us']:.1f} µs a launch:",
            "| kernels | launches | GB | TFLOP | ms | bytes alone (ms) |", "|---|---|---|---|---|---|"]
    rows += [f"| {kind} | {r['launches']} | {r['gbytes']:.1f} | {r['tflops']:.2f} | {r['ms']:.1f} | "
             f"{r['memory_ms']:.1f} |" for kind, r in report["kinds"].items()]
    if report.get("sources"):
        rows += ["", "| costliest model ops | launches | GB | TFLOP | ms | bytes alone (ms) |",
                 "|---|---|---|---|---|---|"]
        rows += [f"| {r['source'] or '(no op_name)'} | {r['launches']} | {r['gbytes']:.1f} | {r['tflops']:.2f} | "
                 f"{r['ms']:.1f} | {r['memory_ms']:.1f} |" for r in report["sources"]]
    return "\n".join(rows)

