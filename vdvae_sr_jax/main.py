"""Command line: train, evaluate or sample a VDVAE from an ml_collections config.

    python -m vdvae_sr_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m vdvae_sr_jax.main --config=configs/vdvae_imagenet64.py --config.checkpoint=ckpt/imagenet64 \
        --mode=evaluate --config.data.source=folder --config.data.folder=/data/imagenet64/val
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from vdvae_sr_jax import checkpoint, data, evaluate, train
from vdvae_sr_jax.model import init_params, model_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "An ml_collections config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where metrics, samples and the trained model go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "sample"], "What to run.")


def load_or_init_params(config, model):
    """Params from `config.checkpoint` (a converted model) or, if it is empty, the official init."""
    if not config.checkpoint:
        return init_params(model, jax.random.key(config.train.seed))
    params, metadata = checkpoint.load_params(config.checkpoint)
    if dict(metadata.get("model", {})) != dict(config.model):
        logging.warning("checkpoint %s was made for model %s, the config says %s",
                        config.checkpoint, metadata.get("model"), dict(config.model))
    return params


def eval_batches(config, images) -> list[np.ndarray]:
    """Centre crops of the first `data.eval_images` images at the model size, in device-sized batches."""
    size, n = config.model.image_size, config.train.batch_size_per_device
    crops = np.stack([data.center_crop(im, size) for im in images[: config.data.eval_images]])
    return [crops[i : i + n] for i in range(0, len(crops), n)]


def run_train(config, workdir: Path) -> dict:
    """Trains with the official update rule, logging JSONL metrics; evaluates and samples the EMA model."""
    model = model_from_config(config)
    images = [im for _, im in data.load_images(config.data, config.model.image_size)]
    tx = train.make_optimizer(config.train)
    state = train.init_state(load_or_init_params(config, model), tx, jax.random.key(config.train.seed + 1))
    step_fn = jax.jit(partial(train.train_step, loss_fn=train.elbo_loss(model), tx=tx, train=config.train),
                      donate_argnums=0)
    crops = data.random_crops(images, config.model.image_size, config.train.batch_size_per_device, config.train.seed)
    log_path = workdir / "metrics.jsonl"
    history = []
    with log_path.open("a") as log, tqdm(total=config.train.steps, desc="train", unit="step") as bar:
        start = time.perf_counter()
        for step in range(1, config.train.steps + 1):
            inp, target = data.normalize(next(crops), config.data, model.low_bit)
            state, metrics = step_fn(state, {"input": inp, "target": target})
            bar.update()
            if step % config.train.log_every == 0 or step == config.train.steps:
                record = {k: float(v) for k, v in jax.device_get(metrics).items()}
                record.update(step=step, skipped_total=int(state.skipped), seconds=time.perf_counter() - start)
                log.write(json.dumps(record) + "\n")
                log.flush()
                history.append(record)
                bar.set_postfix(elbo=f"{record['loss']:.3f}", skipped=record["skipped_total"])
    forward_model = model.clone(scan_unroll=1)  # unrolling only speeds up gradients on CPU
    result = evaluate.bits_per_dim(forward_model, state.ema_params, eval_batches(config, images), config.data)
    result["first_logged_elbo"], result["last_logged_elbo"] = history[0]["loss"], history[-1]["loss"]
    checkpoint.save_params(workdir / f"model-{config.train.steps}", state.ema_params,
                           {"model": config.model.to_dict(), "data": config.data.to_dict(), "ema": True})
    write_samples(config, forward_model, state.ema_params, workdir)
    return result


def write_samples(config, model, params, workdir: Path) -> Path:
    """A PNG grid: one row of prior samples per configured temperature."""
    rows = evaluate.temperature_grid(model, params, config.sample.temperatures, config.sample.num, config.train.seed)
    path = workdir / "samples.png"
    evaluate.save_grid(path, rows)
    return path


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    if _MODE.value == "train":
        result = run_train(config, workdir)
    elif _MODE.value == "evaluate":
        model = model_from_config(config)
        images = [im for _, im in data.load_images(config.data, config.model.image_size)]
        result = evaluate.bits_per_dim(model, load_or_init_params(config, model), eval_batches(config, images),
                                       config.data)
    else:
        model = model_from_config(config)
        result = {"samples": str(write_samples(config, model, load_or_init_params(config, model), workdir))}
    (workdir / f"{_MODE.value}_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
