"""The programs the benchmarks time, built as the trainer builds them; no flags, so any benchmark can import them."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

from vdvae_sr_jax import data, train, trainer
from vdvae_sr_jax.model import VDVAESR, init_params


def train_step(config, model):
    """The trainer's jitted step of `model` (with the config's added loss terms and discriminator), with the state
    donated."""
    loss_fn, _, adversary = trainer.training_objective(config, model)
    step = partial(train.train_step, loss_fn=loss_fn, tx=train.make_optimizer(config.train), train=config.train,
                   adversary=adversary)
    return jax.jit(step, donate_argnums=0)


def train_inputs(config, model, batch_size: int) -> tuple:
    """A fresh training state, a batch of random images (on the device, as the trainer prefetches them), the
    frozen params and the LPIPS weights of a perceptual term."""
    trainable, frozen = train.split_params(init_params(model), config.train.frozen)
    _, critics, adversary = trainer.training_objective(config, model)
    state = trainer.new_state(config, model, trainable, train.make_optimizer(config.train), adversary)
    size = model.image_size
    hr = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), np.uint8)
    lr_factor = size // model.lr_image_size if isinstance(model, VDVAESR) else None
    lr_target = lr_factor is not None and config.train.get("lr_consistency_weight", 0.0) > 0
    batch = data.model_batch(hr, config.data, model.low_bit, lr_factor, lr_target)
    return state, jax.device_put(batch), frozen, critics
