"""Adversarial fine-tuning (a VAE-GAN): a PatchGAN discriminator, the hinge losses, and the discriminator's update.

The discriminator judges overlapping patches of HR images against the generator's decoded outputs. It trains with
its own Adam state, no EMA, and its own skip of non-finite updates; `train.train_step` runs its update after the
generator's, on the same step's decoded outputs (the generator's update sees the discriminator before it).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vdvae_sr_jax.train import all_finite


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: 4x4 convolutions with leaky ReLUs, strided down to the last width, then one logit per
    patch; no normalisation layers, so a patch's logit does not depend on the rest of the batch."""

    widths: tuple[int, ...] = (64, 128, 256)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            stride = 2 if i < len(self.widths) - 1 else 1
            x = nn.leaky_relu(nn.Conv(width, (4, 4), stride, padding=1, name=f"c{i + 1}")(x), 0.2)
        return nn.Conv(1, (4, 4), padding=1, name="out")(x)[..., 0]


@flax.struct.dataclass
class DiscState:
    """The discriminator's params, Adam state and count of skipped updates."""

    params: Any
    opt_state: Any
    skipped: jax.Array


def hinge_disc_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """The discriminator's hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return jax.nn.relu(1.0 - real_logits).mean() + jax.nn.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """The generator's hinge loss: -mean D(fake)."""
    return -fake_logits.mean()


def disc_accuracy(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """The share of patches the discriminator calls right (real > 0, fake < 0), over reals and fakes equally."""
    return 0.5 * ((real_logits > 0).mean() + (fake_logits < 0).mean())


@flax.struct.dataclass
class Adversary:
    """The discriminator network and its optimiser (static parts of the jitted step), and what they compute."""

    net: PatchDiscriminator = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def init(self, image_shape: tuple[int, ...], rng: jax.Array) -> DiscState:
        """A fresh discriminator for images of `image_shape` ([H, W, 3])."""
        params = self.net.init(rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]
        return DiscState(params=params, opt_state=self.tx.init(params), skipped=jnp.zeros((), jnp.int32))

    def generator_loss(self, params, fake: jax.Array) -> jax.Array:
        """The generator's adversarial loss for its outputs `fake` against the discriminator `params`."""
        return hinge_generator_loss(self.net.apply({"params": params}, fake))

    def update(self, state: DiscState, real: jax.Array, fake: jax.Array) -> tuple[DiscState, dict]:
        """One discriminator update on HR images `real` and decoded outputs `fake` (no gradient reaches the
        generator); an update with a non-finite loss, gradient, params or Adam state is skipped and counted."""
        fake = jax.lax.stop_gradient(fake)

        def loss_fn(params):
            logits = self.net.apply({"params": params}, jnp.concatenate([real, fake]))
            real_logits, fake_logits = jnp.split(logits, 2)
            return hinge_disc_loss(real_logits, fake_logits), disc_accuracy(real_logits, fake_logits)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        apply = jnp.isfinite(loss) & all_finite((grads, params, opt_state))

        def keep(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new, old)

        new_state = DiscState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                              skipped=state.skipped + 1 - apply.astype(jnp.int32))
        return new_state, {"disc_loss": loss, "disc_accuracy": accuracy, "disc_skipped_total": new_state.skipped}


def adversary_from_config(train) -> Adversary:
    """The discriminator of `train.disc_widths`, trained by Adam at `train.disc_lr` with betas
    (`train.disc_beta1`, `train.disc_beta2`), the usual GAN choice of a low first moment."""
    tx = optax.adam(train.disc_lr, b1=train.disc_beta1, b2=train.disc_beta2)
    return Adversary(PatchDiscriminator(tuple(train.disc_widths)), tx)
