"""Trains the demo VDVAE-SR to overfit a few embedded photos, then compares its Y-PSNR with bicubic's.

    python -m benchmarks.overfit_psnr --workdir=runs/overfit --steps=1500 --images=4 --temperature=0.1
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from configs.demo import get_config
from vdvae_sr_jax import data, evaluate, figures, metrics, trainer
from vdvae_sr_jax.model import model_from_config
from vdvae_sr_jax.resize import bicubic_upscale

_WORKDIR = flags.DEFINE_string("workdir", "runs/overfit", "Run directory (resumes if it exists).")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps.")
_IMAGES = flags.DEFINE_integer("images", 4, "How many embedded photos to overfit.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.1, "Sampling temperature for the SR images.")


def main(argv) -> None:
    del argv
    workdir = Path(_WORKDIR.value)
    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    config = get_config()
    for name, image in data.embedded_photos()[: _IMAGES.value]:
        Image.fromarray(data.center_crop(image, config.model.image_size)).save(folder / f"{Path(name).stem}.png")
    config.data.source, config.data.folder, config.data.preprocess = "folder", str(folder), "thesis"
    config.data.eval_images = _IMAGES.value
    config.train.steps, config.train.steps_per_epoch, config.train.sample_every = _STEPS.value, 500, 500
    config.train.checkpoint_every = 500
    train_result = trainer.run(config, workdir)

    model = model_from_config(config)
    params = trainer.latest_ema_params(config, model, workdir)
    hr = np.stack([im for _, im in data.folder_images(folder)])
    factor = model.image_size // model.lr_image_size
    lr = data.downscale(hr, factor, "matlab")
    sr = np.asarray(evaluate.sr_sample(model.clone(scan_unroll=1), params, data.normalize(lr, config.data)[0],
                                       jnp.float32(_TEMPERATURE.value), jax.random.key(0)))
    bicubic = bicubic_upscale(lr, factor)
    result = {
        "train": train_result,
        "temperature": _TEMPERATURE.value,
        "psnr_y_sr": [metrics.psnr_y(s, h, factor) for s, h in zip(sr, hr)],
        "psnr_y_bicubic": [metrics.psnr_y(b, h, factor) for b, h in zip(bicubic, hr)],
    }
    result["mean_psnr_y_sr"] = float(np.mean(result["psnr_y_sr"]))
    result["mean_psnr_y_bicubic"] = float(np.mean(result["psnr_y_bicubic"]))
    figures.save_grid(workdir / "overfit.png", [np.stack(r) for r in zip(lr.repeat(factor, 1).repeat(factor, 2),
                                                                          bicubic, sr, hr)],
                      labels=["LR", "bicubic", f"t={_TEMPERATURE.value:g} sample", "HR"])
    (workdir / "overfit_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
