"""Checks a config's values before anything runs, so that an impossible value is one error naming its key rather
than a run that trains nothing, divides by zero or scans the wrong folder."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


class ConfigError(ValueError):
    """Config values that cannot work; the message names each key, its value and what it must be."""


def _whole(low: int) -> tuple[Callable[[Any], bool], str]:
    return lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low, \
        f"a whole number of at least {low}"


def _number(low: float, high: float = np.inf, *, open_low: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v) -> bool:
        return (isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)
                and (v > low if open_low else v >= low) and v <= high)

    bound = f"above {low:g}" if open_low else f"at least {low:g}"
    return ok, f"a number {bound}" + (f" and at most {high:g}" if np.isfinite(high) else "")


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices)


def _all_in(values, choices) -> bool:
    return isinstance(values, (tuple, list)) and len(values) > 0 and all(v in choices for v in values)


def _temperatures(v) -> bool:
    values = np.atleast_1d(np.asarray(v, dtype=object))
    return values.size > 0 and all(_number(0.0)[0](t) for t in values)


# Key -> (test, what the value must be). Keys a config lacks are skipped: older configs and other models.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.width": _whole(1),
    "model.zdim": _whole(1),
    "model.image_size": _whole(1),
    "model.lr_image_size": _whole(1),
    "data.source": _one_of("embedded", "folder", "tfds"),
    "data.preprocess": _one_of("crops", "thesis"),
    "data.downscale": _one_of("matlab", "pil"),
    "data.eval_images": _whole(1),
    "data.workers": _whole(0),
    "train.steps": _whole(1),
    "train.batch_size_per_device": _whole(1),
    "train.steps_per_epoch": _whole(1),
    "train.log_every": _whole(1),
    "train.checkpoint_every": _whole(1),
    "train.keep_checkpoints": _whole(1),
    "train.sample_every": _whole(0),
    "train.skip_warning_steps": _whole(1),
    "train.warmup_iters": _whole(0),
    "train.lr": _number(0.0, open_low=True),
    "train.wd": _number(0.0),
    "train.grad_clip": _number(0.0, open_low=True),
    "train.ema_rate": _number(0.0, 1.0),
    "train.adam_beta1": _number(0.0, 1.0),
    "train.adam_beta2": _number(0.0, 1.0),
    "train.adam_eps": _number(0.0),
    "train.lr_consistency_weight": _number(0.0),
    "train.perceptual_weight": _number(0.0),
    "train.perceptual_net": _one_of("lpips_vgg", "lpips_alex"),
    "train.adversarial_weight": _number(0.0),
    "train.disc_widths": (lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(_whole(1)[0](w) for w in v),
                          "a tuple of one or more whole numbers of at least 1, e.g. \"(64,128,256)\""),
    "train.disc_lr": _number(0.0, open_low=True),
    "data.tfds_download": (lambda v: isinstance(v, bool), "True or False"),
    "init.sr_checkpoint": (lambda v: isinstance(v, str), "a path (a training workdir or an exported VDVAE-SR), or ''"),
    "train.disc_beta1": _number(0.0, 1.0),
    "train.disc_beta2": _number(0.0, 1.0),
    "sample.num": _whole(1),
    "sample.temperatures": (_temperatures, "one or more numbers of at least 0"),
    "upscale.temperature": (_temperatures, "a number of at least 0, or one per layer"),
    "upscale.num_samples": _whole(1),
    "upscale.overlap": _whole(0),
    "upscale.batch_per_device": _whole(1),
    "upscale.max_pixels": _whole(0),
    "upscale.decode": _one_of("sample", "mean"),
    "upscale.back_projection_steps": _whole(0),
    "evaluate.temperatures": (_temperatures, "one or more numbers of at least 0"),
    "evaluate.num_samples": _whole(1),
    "evaluate.max_images": _whole(0),
    "evaluate.ntire_samples": _whole(2),
    "evaluate.back_projection_steps": _whole(0),
    "evaluate.decodings": (lambda v: _all_in(v, ("sample", "mean", "sample+ibp", "mean+ibp")),
                           "a tuple of some of 'sample', 'mean', 'sample+ibp', 'mean+ibp', e.g. \"('sample','mean')\""),
    "evaluate.protocols": (lambda v: _all_in(v, ("whole", "thesis", "ntire")),
                           "a tuple of some of 'whole', 'thesis', 'ntire', e.g. \"('whole','ntire')\""),
    "compute_dtype": _one_of("float32", "bfloat16", "float16"),
    "scan_unroll": _whole(1),
}


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def problems(config) -> list[str]:
    """Each impossible value of `config` as 'KEY=VALUE: must be ...'; besides the table, cross-field rules."""
    found = []
    for key, (ok, must) in RULES.items():
        value = _get(config, key)
        if value is not _MISSING and not ok(value):
            found.append(f"{key}={value!r}: must be {must}")
    if _get(config, "data.source") == "folder" and not _get(config, "data.folder"):
        found.append("data.folder='': data.source='folder' needs the folder of training images "
                     "(--config.data.folder=DIR)")
    skip = _get(config, "train.skip_threshold")
    if skip is not _MISSING and not (skip == -1 or _number(0.0, open_low=True)[0](skip)):
        found.append(f"train.skip_threshold={skip!r}: must be above 0, or -1 to never skip")
    decodings, steps = _get(config, "evaluate.decodings"), _get(config, "evaluate.back_projection_steps")
    if steps == 0 and isinstance(decodings, (tuple, list)) and any(str(d).endswith("+ibp") for d in decodings):
        found.append("evaluate.back_projection_steps=0: the '+ibp' rows of evaluate.decodings need at least 1 step")
    if _get(config, "model.lr_image_size") is _MISSING:
        for term in ("lr_consistency", "perceptual", "adversarial"):
            weight = _get(config, f"train.{term}_weight")
            if weight is not _MISSING and weight != 0:
                found.append(f"train.{term}_weight={weight!r}: the added loss terms need a VDVAE-SR (a config with "
                             "model.lr_image_size); use 0 for a VDVAE")
    widths, size = _get(config, "train.disc_widths"), _get(config, "model.image_size")
    if (_get(config, "train.adversarial_weight") not in (_MISSING, 0) and isinstance(widths, (tuple, list))
            and isinstance(size, int) and size < 3 * 2 ** (len(widths) - 1)):
        found.append(f"train.disc_widths={tuple(widths)!r}: {len(widths) - 1} halvings leave the discriminator no "
                     f"patch of a {size}-pixel image; use at most {max(1, (size // 3).bit_length())} widths")
    tile, overlap = _get(config, "model.lr_image_size"), _get(config, "upscale.overlap")
    if isinstance(tile, int) and isinstance(overlap, int) and not overlap < tile:
        found.append(f"upscale.overlap={overlap!r}: must be less than the LR tile, model.lr_image_size={tile}")
    return found


def validate(config) -> None:
    """Raises a ConfigError naming every impossible value of `config`, in one line."""
    found = problems(config)
    if found:
        raise ConfigError(f"invalid config ({len(found)} value{'s' if len(found) > 1 else ''}): " + "; ".join(found))
