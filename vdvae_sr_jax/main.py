"""Command line: train, evaluate or sample a VDVAE or VDVAE-SR from an ml_collections config.

    python -m vdvae_sr_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m vdvae_sr_jax.main --config=configs/sr64.py --workdir=runs/sr64 --config.train.batch_size_per_device=8
    python -m vdvae_sr_jax.main --config=configs/vdvae_imagenet64.py --config.checkpoint=checkpoints/imagenet64 \
        --mode=evaluate --config.data.source=folder --config.data.folder=/data/imagenet64/val

Rerunning `train` with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdvae_sr_jax import checkpoint, data, evaluate, trainer
from vdvae_sr_jax.model import VDVAESR, model_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "An ml_collections config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and samples go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "sample"], "What to run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")


def trained_params(config, model, workdir: Path):
    """EMA params of the newest training checkpoint in `workdir`, else those of `config.checkpoint`."""
    if (workdir / "checkpoints").is_dir():
        params = trainer.latest_ema_params(config, model, workdir)
        if params is not None:
            return params
    if not config.checkpoint:
        raise SystemExit(f"nothing to {_MODE.value}: {workdir} has no training checkpoint and config.checkpoint "
                         "is empty; train first, or convert an official model with `python -m convert.vdvae`")
    return checkpoint.load_params(config.checkpoint)[0]


def eval_images(config) -> np.ndarray:
    """Centre crops at the model size of the first `data.eval_images` validation images."""
    images = data.load_images(config.data, config.model.image_size, split="validation")
    return np.stack([data.center_crop(im, config.model.image_size) for _, im in images[: config.data.eval_images]])


def main(argv) -> None:
    del argv
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    model = model_from_config(config)
    if _MODE.value == "train":
        try:
            result = trainer.run(config, workdir)
        except (FileNotFoundError, ImportError) as error:  # a missing dataset or optional extra: one clear line
            raise SystemExit(str(error)) from None
    else:
        forward_model = model.clone(scan_unroll=1)  # unrolling only speeds up gradients on CPU
        params = trained_params(config, model, workdir)
        hr = eval_images(config)
        if _MODE.value == "evaluate":
            result = evaluate.bits_per_dim(forward_model, params, [hr], config.data)
        elif isinstance(model, VDVAESR):
            path = trainer.write_sr_samples(config, forward_model, params, hr, workdir / "samples.png")
            result = {"samples": str(path)}
        else:
            rows = evaluate.temperature_grid(forward_model, params, config.sample.temperatures, config.sample.num,
                                             config.train.seed)
            evaluate.save_grid(workdir / "samples.png", rows)
            result = {"samples": str(workdir / "samples.png")}
    (workdir / f"{_MODE.value}_result.json").write_text(json.dumps(result, indent=1))
    logging.info("%s", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
