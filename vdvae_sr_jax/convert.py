"""Converts an official VDVAE PyTorch state dict (`*-model.th`, `*-model-ema.th`) to this package's params.

Conversion is a rename, a transpose (OIHW -> HWIO for conv kernels, NCHW -> NHWC for the
`bias_xs`, `gain`, `bias` and `gate_param` tensors) and, for runs of identical blocks that the
model scans, a stack along a new leading axis. Every key and shape is checked before anything
is written. The command line runs from the repository root (the first form) or, after `pip install`,
from any directory (the second):

    python -m convert.vdvae --config=configs/vdvae_imagenet64.py \
        --input=imagenet64-iter-1600000-model-ema.th --output=checkpoints/imagenet64
    python -m vdvae_sr_jax.convert --config=configs/vdvae_imagenet64.py ...
"""

from __future__ import annotations

import re
from typing import Mapping

import flax
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdvae_sr_jax import cli
from vdvae_sr_jax.checkpoint import load_params, save_params
from vdvae_sr_jax.model import init_params, model_from_hparams
from vdvae_sr_jax.torch_reader import load_state_dict

_RUN = re.compile(r"^(enc_blocks|dec_blocks)_(\d+)_(\d+)$")
_INDEXED = re.compile(r"^(enc_blocks|dec_blocks|bias_xs)_(\d+)$")
_LEAF = {"kernel": "weight", "bias": "bias", "gate": "gate_param"}


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the `module.` prefix that DistributedDataParallel checkpoints carry."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


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


def to_flax_layout(name: str, array: np.ndarray) -> np.ndarray:
    """OIHW conv weights to HWIO; NCHW parameter tensors (bias_xs, gain, bias, gate) to NHWC."""
    if array.ndim != 4:
        return array
    return array.transpose(2, 3, 1, 0) if name == "kernel" else array.transpose(0, 2, 3, 1)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], template, source: str = "state dict"):
    """Maps an official state dict onto `template` (a params tree of arrays or ShapeDtypeStructs).

    Raises ValueError naming every missing, unexpected or mis-shaped key; returns float32 numpy params.
    """
    state_dict = strip_prefix(state_dict)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
    out, used, errors = {}, set(), []
    for path, leaf in flat.items():
        keys, stacked = torch_keys(path)
        missing = [k for k in keys if k not in state_dict]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            errors.append(f"missing key {missing[0]!r}{more}")
            continue
        used.update(keys)
        want = tuple(leaf.shape[1:]) if stacked else tuple(leaf.shape)
        arrays = [to_flax_layout(path[-1], np.asarray(state_dict[k], np.float32)) for k in keys]
        wrong = [(k, a) for k, a in zip(keys, arrays) if a.shape != want]
        if wrong:
            key, array = wrong[0]
            errors.append(
                f"key {key!r} has shape {tuple(np.shape(state_dict[key]))}, which is {array.shape} in "
                f"the Flax layout; the config needs {want}"
            )
            continue
        out[path] = np.stack(arrays) if stacked else arrays[0]
    errors += [f"unexpected key {k!r}" for k in sorted(set(state_dict) - used)]
    if errors:
        raise ValueError(f"{source} does not match the config:\n  " + "\n  ".join(errors))
    return flax.traverse_util.unflatten_dict(out)


def convert_checkpoint(model, path: str, encoder_only: bool = False):
    """Reads an official `.th` file (no pickled code runs) and returns params for `model`."""
    template = jax.eval_shape(lambda: init_params(model))
    state_dict = load_state_dict(path)
    if encoder_only:
        state_dict = {k: v for k, v in strip_prefix(state_dict).items() if k.startswith("encoder.")}
        template = {"encoder": template["encoder"]}
    return convert_state_dict(state_dict, template, source=str(path))


def lr_encoder_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `encoder.*` entries of a VDVAE state dict, renamed `lr_encoder.*` for a VDVAE-SR model."""
    return {"lr_" + k: v for k, v in strip_prefix(state_dict).items() if k.startswith("encoder.")}


def convert_sr_checkpoints(model, hr_path: str, lr_path: str):
    """Params of a VDVAESR from the thesis' two files: the gated HR model, and the LR model (encoder used)."""
    template = jax.eval_shape(lambda: init_params(model))
    state_dict = {**strip_prefix(load_state_dict(hr_path)), **lr_encoder_state_dict(load_state_dict(lr_path))}
    return convert_state_dict(state_dict, template, source=f"{hr_path} + {lr_path}")


def convert_to_orbax(config, source: str, output: str, encoder_only: bool = False):
    """Converts `source` for the model in `config` and writes it, with its config, to the new directory `output`."""
    model = model_from_hparams(config.model)
    params = convert_checkpoint(model, source, encoder_only)
    metadata = {"model": config.model.to_dict(), "data": config.data.to_dict(), "source": str(source),
                "encoder_only": encoder_only}
    return save_params(output, params, metadata)


def _main(argv) -> None:
    del argv
    cli.quiet_libraries()
    flag = flags.FLAGS
    path = convert_to_orbax(flag.config, flag.input, flag.output, flag.encoder_only)
    n = sum(x.size for x in jax.tree_util.tree_leaves(load_params(path)[0]))
    print(f"wrote {n:,} parameters from {flag.input} to {path}")


def run_cli() -> None:
    """The converter's command line (`python -m convert.vdvae`, `python -m vdvae_sr_jax.convert`). Its flags are
    defined here, not on import, so that importing the converter beside `vdvae_sr_jax.main` defines no flag twice."""
    config_flags.DEFINE_config_file("config", None, "The model's config file, e.g. configs/vdvae_imagenet64.py.")
    flags.DEFINE_string("input", None, "An official checkpoint, e.g. imagenet64-iter-1600000-model-ema.th.")
    flags.DEFINE_string("output", None, "A new directory for the orbax checkpoint.")
    flags.DEFINE_bool("encoder_only", False, "Export only the encoder (to initialise a VDVAE-SR LR encoder).")
    flags.mark_flags_as_required(["config", "input", "output"])
    app.run(_main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run_cli()
