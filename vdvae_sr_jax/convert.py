"""Converts an official VDVAE PyTorch state dict (`*-model.th`, `*-model-ema.th`) to this package's params.

Conversion is a rename, a transpose (OIHW -> HWIO for conv kernels, NCHW -> NHWC for the
`bias_xs`, `gain`, `bias` and `gate_param` tensors) and, for runs of identical blocks that the
model scans, a stack along a new leading axis. Every key and shape is checked against the config
before any tensor data is read, and the output directory before that. The command line runs from
the repository root (the first forms) or, after `pip install`, from any directory (the last):

    python -m convert.vdvae --config=configs/vdvae_imagenet64.py \
        --input=imagenet64-iter-1600000-model-ema.th --output=checkpoints/imagenet64
    python -m convert.vdvae --config=configs/sr64.py --input=<thesis HR model>.th \
        --lr_input=<thesis LR model>.th --output=checkpoints/sr64
    python -m vdvae_sr_jax.convert --config=configs/vdvae_imagenet64.py ...

A user error (a missing or damaged file, an unsafe pickle, a checkpoint of another model, an
existing output) ends the command with its message and exit status 1; VDVAE_SR_TRACEBACK=1
shows the traceback instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import flax
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdvae_sr_jax import cli
from vdvae_sr_jax.checkpoint import load_params, save_params
from vdvae_sr_jax.model import VDVAESR, init_params, model_from_hparams
from vdvae_sr_jax.torch_reader import open_checkpoint

_RUN = re.compile(r"^(enc_blocks|dec_blocks)_(\d+)_(\d+)$")
_INDEXED = re.compile(r"^(enc_blocks|dec_blocks|bias_xs)_(\d+)$")
_LEAF = {"kernel": "weight", "bias": "bias", "gate": "gate_param"}
_LINES_PER_FAULT = 5  # of each kind in a report; the summary counts them all


class ConversionError(ValueError):
    """A checkpoint that does not fit the config, or is ambiguous; the message names the faults and sums them up."""


def strip_prefix(state_dict: Mapping[str, Any], source: str = "state dict") -> dict[str, Any]:
    """Drops the `module.` prefix that DistributedDataParallel checkpoints carry. A key present both with and
    without it is refused, since either could be the one meant."""
    out = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if name in out:
            raise ConversionError(f"{source} holds both 'module.{name}' and '{name}'; it is unclear which to convert")
        out[name] = value
    return out


def torch_keys(path: tuple[str, ...]) -> tuple[list[str], bool]:
    """The official key(s) behind one param path, and whether they are stacked (a scanned run)."""
    keys = [""]
    stacked = False
    for i, part in enumerate(path):
        is_leaf = i == len(path) - 1
        if (m := _RUN.match(part)) is not None:
            first, last = int(m.group(2)), int(m.group(3))
            keys = [f"{k}{m.group(1)}.{j}." for k in keys for j in range(first, last + 1)]
            stacked = True
        elif (m := _INDEXED.match(part)) is not None:
            keys = [f"{k}{m.group(1)}.{m.group(2)}" + ("" if is_leaf else ".") for k in keys]
        elif is_leaf and part in _LEAF:
            keys = [k + _LEAF[part] for k in keys]
        else:
            keys = [k + part + ("" if is_leaf else ".") for k in keys]
    return keys, stacked


def _flax_axes(name: str, ndim: int) -> tuple[int, ...] | None:
    """The transpose from the official layout: OIHW conv weights to HWIO, NCHW tensors (bias_xs, gain, bias, gate)
    to NHWC; None for tensors that keep theirs."""
    if ndim != 4:
        return None
    return (2, 3, 1, 0) if name == "kernel" else (0, 2, 3, 1)


def to_flax_layout(name: str, array: np.ndarray) -> np.ndarray:
    """An official tensor in the Flax layout of param `name`."""
    axes = _flax_axes(name, array.ndim)
    return array if axes is None else array.transpose(axes)


def _flax_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = _flax_axes(name, len(shape))
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def _report(source: str, missing: list[str], misshaped: list[str], unexpected: list[str]) -> str:
    """At most `_LINES_PER_FAULT` lines of each kind of fault, then a summary line."""
    lines = []
    for kind, faults in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
        lines += faults[:_LINES_PER_FAULT]
        if len(faults) > _LINES_PER_FAULT:
            lines.append(f"... and {len(faults) - _LINES_PER_FAULT} more {kind} keys")
    summary = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped: "
               "is --config the model this file was saved from?")
    return f"{source} does not match the config:\n  " + "\n  ".join(lines) + "\n" + summary


def match_keys(shapes: Mapping[str, tuple[int, ...]], template, source: str = "state dict"):
    """`{param path: (official keys, stacked)}` for every param of `template` (arrays or ShapeDtypeStructs), given
    the checkpoint's `{key: shape}`. Raises ConversionError naming each missing, unexpected or mis-shaped key."""
    plan, used, missing, misshaped = {}, set(), [], []
    for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(template)).items():
        keys, stacked = torch_keys(path)
        want = tuple(leaf.shape[1:]) if stacked else tuple(leaf.shape)
        present = [k for k in keys if k in shapes]
        used.update(present)
        missing += [f"missing key {k!r}" for k in keys if k not in shapes]
        wrong = [
            f"key {k!r} has shape {tuple(shapes[k])}, which is {_flax_shape(path[-1], shapes[k])} in the Flax "
            f"layout; the config needs {want}"
            for k in present if _flax_shape(path[-1], shapes[k]) != want
        ]
        misshaped += wrong
        plan[path] = keys, stacked
    unexpected = [f"unexpected key {k!r}" for k in sorted(set(shapes) - used)]
    if missing or misshaped or unexpected:
        raise ConversionError(_report(source, missing, misshaped, unexpected))
    return plan


def _assemble(plan, arrays: Mapping[str, np.ndarray]):
    """float32 params from the official arrays, transposed and, for scanned runs, stacked."""
    out = {}
    for path, (keys, stacked) in plan.items():
        layers = [to_flax_layout(path[-1], np.asarray(arrays[k], np.float32)) for k in keys]
        out[path] = np.stack(layers) if stacked else layers[0]
    return flax.traverse_util.unflatten_dict(out)


def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` of arrays or of `TensorRecord`s, which declare a shape before their data is read."""
    return {key: tuple(value.shape) for key, value in tensors.items()}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], template, source: str = "state dict"):
    """Maps an official state dict onto `template` (a params tree of arrays or ShapeDtypeStructs).

    Raises ConversionError naming every missing, unexpected or mis-shaped key; returns float32 numpy params.
    """
    state_dict = strip_prefix(state_dict, source)
    return _assemble(match_keys(_shapes(state_dict), template, source), state_dict)


def _template(model):
    return jax.eval_shape(lambda: init_params(model))


def convert_file(path: str | os.PathLike[str], template, encoder_only: bool = False):
    """Reads an official `.th` file (no pickled code runs) and maps it onto `template`, or onto its encoder alone.
    Keys and shapes are checked before any tensor data is read, and only the tensors the template needs are."""
    with open_checkpoint(path) as checkpoint:
        tensors = strip_prefix(checkpoint.tensors, str(path))
        if encoder_only:
            tensors = {k: v for k, v in tensors.items() if k.startswith("encoder.")}
            template = {"encoder": template["encoder"]}
        plan = match_keys(_shapes(tensors), template, str(path))
        return _assemble(plan, checkpoint.read(tensors))


def convert_checkpoint(model, path: str | os.PathLike[str], encoder_only: bool = False):
    """Params for `model` from an official `.th` file (`convert_file`)."""
    return convert_file(path, _template(model), encoder_only)


def lr_encoder_state_dict(state_dict: Mapping[str, Any], source: str = "state dict") -> dict[str, Any]:
    """The `encoder.*` entries of a VDVAE state dict, renamed `lr_encoder.*` for a VDVAE-SR model."""
    return {"lr_" + k: v for k, v in strip_prefix(state_dict, source).items() if k.startswith("encoder.")}


def convert_sr_checkpoints(model, hr_path: str | os.PathLike[str], lr_path: str | os.PathLike[str]):
    """Params of a VDVAESR from the thesis' two files: the gated HR model, and the LR model (encoder used)."""
    source = f"{hr_path} + {lr_path}"
    with open_checkpoint(hr_path) as hr, open_checkpoint(lr_path) as lr:
        hr_tensors = strip_prefix(hr.tensors, str(hr_path))
        lr_tensors = lr_encoder_state_dict(lr.tensors, str(lr_path))
        clash = sorted(set(hr_tensors) & set(lr_tensors))
        if clash:
            raise ConversionError(f"{hr_path} already holds {clash[0]!r}, which the LR encoder of {lr_path} provides")
        plan = match_keys({**_shapes(hr_tensors), **_shapes(lr_tensors)}, _template(model), source)
        return _assemble(plan, {**hr.read(hr_tensors), **lr.read(lr_tensors)})


def convert_to_orbax(config, source: str | os.PathLike[str], output: str | os.PathLike[str],
                     encoder_only: bool = False, lr_source: str | os.PathLike[str] | None = None) -> Path:
    """Converts `source` for the model in `config` and writes it, with its config, to the new directory `output`.

    A VDVAE-SR config takes the thesis' pair: `source` the HR model with its gates, `lr_source` the LR model whose
    encoder becomes the LR encoder. `output` must not exist; that is checked before anything is read.
    """
    if Path(output).exists():
        raise FileExistsError(f"{output} already exists; choose a new output directory or remove it")
    model = model_from_hparams(config.model)
    is_sr = isinstance(model, VDVAESR)
    if lr_source is not None and (encoder_only or not is_sr):
        raise ConversionError("an LR model (--lr_input) goes with a VDVAE-SR config (one that sets "
                              "model.lr_enc_blocks) and without --encoder_only")
    if is_sr and not encoder_only and lr_source is None:
        raise ConversionError("the config is a VDVAE-SR model (model.lr_enc_blocks is set): give the LR model as "
                              "well (--lr_input), or convert with the HR model's own config")
    if lr_source is None:
        params = convert_checkpoint(model, source, encoder_only)
    else:
        params = convert_sr_checkpoints(model, source, lr_source)
    metadata = {"model": config.model.to_dict(), "data": config.data.to_dict(), "source": str(source),
                "lr_source": None if lr_source is None else str(lr_source), "encoder_only": encoder_only}
    return save_params(output, params, metadata)


@cli.one_line_errors
def _main(argv) -> None:
    del argv
    cli.quiet_libraries()
    flag = flags.FLAGS
    path = convert_to_orbax(flag.config, flag.input, flag.output, flag.encoder_only, flag.lr_input)
    n = sum(x.size for x in jax.tree_util.tree_leaves(load_params(path)[0]))
    sources = flag.input if flag.lr_input is None else f"{flag.input} and {flag.lr_input}"
    print(f"wrote {n:,} parameters from {sources} to {path}")


def run_cli() -> None:
    """The converter's command line (`python -m convert.vdvae`, `python -m vdvae_sr_jax.convert`). Its flags are
    defined here, not on import, so that importing the converter beside `vdvae_sr_jax.main` defines no flag twice."""
    config_flags.DEFINE_config_file("config", None, "The model's config file, e.g. configs/vdvae_imagenet64.py.")
    flags.DEFINE_string("input", None, "An official checkpoint, e.g. imagenet64-iter-1600000-model-ema.th; with "
                        "--lr_input, the thesis' HR model (with its gates).")
    flags.DEFINE_string("lr_input", None, "For a VDVAE-SR config: the thesis' LR model, whose encoder becomes the "
                        "LR encoder.")
    flags.DEFINE_string("output", None, "A new directory for the orbax checkpoint.")
    flags.DEFINE_bool("encoder_only", False, "Export only the encoder (to initialise a VDVAE-SR LR encoder).")
    flags.mark_flags_as_required(["config", "input", "output"])
    app.run(_main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run_cli()
