"""Dataset-level evaluation of a VDVAE: the ELBO in nats and bits per dimension, and sample grids."""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vdvae_sr_jax import distributions as D
from vdvae_sr_jax.data import model_batch
from vdvae_sr_jax.model import VDVAE, VDVAESR
from vdvae_sr_jax.train import model_inputs


@partial(jax.jit, static_argnums=0)
def _per_image_elbo(model: VDVAE, params, batch, rng):
    stats = model.apply({"params": params}, *model_inputs(batch), rngs={"sample": rng})
    return stats["distortion"] + stats["rate"]


def mean_elbo(model: VDVAE, params, make_batch, hr_uint8: np.ndarray, n_devices: int, seed: int) -> float:
    """Mean per-image ELBO (nats/dim) of uint8 images, `n_devices` at a time; `make_batch` turns this host's
    share of a global uint8 batch into sharded model inputs. The last batch is padded by repeating an image."""
    n = len(hr_uint8)
    padded = np.concatenate([hr_uint8, np.repeat(hr_uint8[-1:], -n % n_devices, axis=0)])
    n_proc, index = jax.process_count(), jax.process_index()
    local = n_devices // n_proc
    values = []
    for k, start in enumerate(range(0, len(padded), n_devices)):
        chunk = padded[start : start + n_devices][index * local : (index + 1) * local]
        rng = jax.random.fold_in(jax.random.key(seed), k)
        elbo = _per_image_elbo(model, params, make_batch(chunk), rng)  # split over the devices of every process
        values.append(multihost_utils.process_allgather(elbo, tiled=True))
    return float(np.concatenate(values)[:n].mean())


def bits_per_dim(model: VDVAE, params, batches: Iterable[np.ndarray], data, seed: int = 0) -> dict[str, float]:
    """Mean negative ELBO over all images of uint8 `batches`, in nats/dim and bits/dim (non-finite ones excluded);
    for a VDVAESR, the conditional ELBO given the images' x4 bicubic downscales."""
    values = []
    rng = jax.random.key(seed)
    lr_factor = model.image_size // model.lr_image_size if isinstance(model, VDVAESR) else None
    for k, batch in enumerate(batches):
        inputs = model_batch(batch, data, model.low_bit, lr_factor)
        values.append(np.asarray(_per_image_elbo(model, params, inputs, jax.random.fold_in(rng, k))))
    values = np.concatenate(values)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise FloatingPointError("every image gave a non-finite ELBO")
    nats = float(finite.mean())
    return {"nats_per_dim": nats, "bits_per_dim": nats / math.log(2.0), "n_images": int(values.size),
            "n_nonfinite": int(values.size - finite.size)}


@partial(jax.jit, static_argnums=(0, 2))
def sample_images(model: VDVAE, params, n: int, temperature, rng) -> jax.Array:
    """`n` uint8 images from the prior at `temperature` (one number or one per layer)."""
    images = model.apply({"params": params}, n, temperature, rngs={"sample": rng}, method=VDVAE.sample)
    return D.to_uint8(images)


@partial(jax.jit, static_argnames=("model", "decode"))
def sr_sample(model: VDVAESR, params, lr_input, temperature, rng, decode: str = "sample") -> jax.Array:
    """uint8 SR images from p(z | LR) at `temperature` for normalised LR inputs, pixels decoded by `decode`
    ('sample' or 'mean', see VDVAE.pixels)."""
    images = model.apply({"params": params}, lr_input, temperature, decode=decode, rngs={"sample": rng},
                         method=VDVAESR.sample)
    return D.pixels_to_uint8(images, decode)


def temperature_grid(model: VDVAE, params, temperatures, n: int, seed: int) -> list[np.ndarray]:
    """One row of `n` prior samples per temperature, all from the same seed."""
    rng = jax.random.key(seed)
    return [np.asarray(sample_images(model, params, n, jnp.float32(t), rng)) for t in temperatures]


@partial(jax.jit, static_argnums=0)
def _inject_latents(model: VDVAE, params, batch, k, temperature, rng) -> jax.Array:
    """uint8 images whose first `k` latents (traced: one compile for every k) come from the posterior of `batch`
    and the rest from the prior."""
    posterior_rng, prior_rng = jax.random.split(rng)
    stats = model.apply({"params": params}, *model_inputs(batch), rngs={"sample": posterior_rng})
    images = model.apply({"params": params}, batch["input"].shape[0], temperature, latents=stats["z"], n_latents=k,
                         rngs={"sample": prior_rng}, method=VDVAE.sample)
    return D.to_uint8(images)


def latent_injection_grid(model: VDVAE, params, hr_uint8: np.ndarray, data, layer_counts, temperature: float,
                          seed: int) -> list[np.ndarray]:
    """Upstream's latent-injection figure: one row per k in `layer_counts` (images from the first k posterior
    latents of `hr_uint8` and the rest from the prior at `temperature`), then the originals."""
    batch = model_batch(hr_uint8, data, model.low_bit, None)
    rng = jax.random.key(seed)
    rows = [np.asarray(_inject_latents(model, params, batch, jnp.int32(k), jnp.float32(temperature), rng))
            for k in layer_counts]
    return rows + [hr_uint8]


def injection_layer_counts(n_layers: int, n_rows: int) -> list[int]:
    """Up to `n_rows` latent counts from 0 (all from the prior) to all layers, spaced geometrically: the first
    layers fix the most of an image."""
    return sorted({0} | {round(n_layers ** (i / (n_rows - 2))) for i in range(n_rows - 1)})
