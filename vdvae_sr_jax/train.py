"""The official VDVAE update rule as one pure, jittable step.

AdamW (beta2 0.9) after global-norm clipping at `grad_clip`, a linear warmup driven by the
step counter, an EMA of the weights after every applied update, and gradient skipping: when
the pre-clip norm is at or above `skip_threshold` (-1 disables), or the loss, the norm, or any
value of the new params, optimiser state or EMA is NaN/inf, the params, optimiser state and EMA
stay bit-identical and `skipped` counts up, while the step (and so the warmup) still advances,
as upstream.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from vdvae_sr_jax import distributions as D
from vdvae_sr_jax.perceptual import lpips_from_signed
from vdvae_sr_jax.resize import bicubic_downscale_jax


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree, so it checkpoints and shards as a whole.

    The trainable params, their EMA and Adam's moments are flat vectors, and `params`/`ema_params` unravel them:
    XLA then compiles the update as a few elementwise kernels instead of several per param leaf: half the LLVM IR
    of the sr64 step's XLA:CPU compile had been those, for its 466 leaves.
    """

    step: jax.Array
    flat_params: jax.Array
    flat_ema: jax.Array
    opt_state: Any
    skipped: jax.Array
    rng: jax.Array  # raw key data (uint32), so the state checkpoints as plain arrays
    unravel: Callable = flax.struct.field(pytree_node=False)
    disc: Any = None  # the discriminator's `adversarial.DiscState` when adversarial fine-tuning is on

    @property
    def params(self):
        """The trainable params as a tree."""
        return self.unravel(self.flat_params)

    @property
    def ema_params(self):
        """Their EMA as a tree."""
        return self.unravel(self.flat_ema)


def warmup_schedule(train) -> optax.Schedule:
    """lr * min(1, step / warmup_iters), upstream's LambdaLR."""
    return optax.linear_schedule(0.0, train.lr, max(train.warmup_iters, 1))


def make_optimizer(train) -> optax.GradientTransformation:
    """Clip, then AdamW whose learning rate is injected each step from the global step counter."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=train.lr, b1=train.adam_beta1, b2=train.adam_beta2, eps=train.adam_eps, weight_decay=train.wd
    )
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)


def init_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state whose EMA starts at the initial params."""
    flat, unravel = ravel_pytree(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        flat_params=flat,
        flat_ema=jnp.copy(flat),
        opt_state=tx.init(flat),
        skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(rng),
        unravel=unravel,
    )


def _set_learning_rate(opt_state, lr):
    clip_state, adam_state = opt_state
    old = adam_state.hyperparams["learning_rate"]
    hyperparams = dict(adam_state.hyperparams, learning_rate=jnp.asarray(lr, old.dtype))
    return clip_state, adam_state._replace(hyperparams=hyperparams)


def all_finite(tree) -> jax.Array:
    """Whether every floating-point value in `tree` is finite: a NaN or inf makes the sum of its leaf non-finite (so
    would an overflowing sum, of values far beyond any training's); one sum per leaf is cheaper than an isfinite
    reduction on XLA:CPU."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.isfinite(sum(jnp.sum(x, dtype=jnp.float32) for x in leaves))


def train_step(
    state: TrainState,
    batch,
    frozen,
    critics=None,
    *,
    loss_fn: Callable[..., tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    train,
    adversary=None,
) -> tuple[TrainState, dict]:
    """One update of the trainable params; `loss_fn(params, frozen, batch, rng[, critics]) -> (loss, metrics)`.

    `frozen` params (e.g. the HR encoder) are inputs only: no gradient, optimiser state or EMA is kept for them.
    `critics` (LPIPS weights), and the discriminator's params when the state has one, are read by added loss terms
    as inputs too. With an `adversary`, the discriminator then takes its own update on the loss's decoded outputs.
    """
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    args = (state.params, frozen, batch, step_rng)
    if critics is not None or state.disc is not None:
        args += (dict(critics or {}, disc=None if state.disc is None else state.disc.params),)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(*args)
    grads = ravel_pytree(grads)[0]
    grad_norm = optax.tree.norm(grads)
    lr = warmup_schedule(train)(state.step)
    opt_state = _set_learning_rate(state.opt_state, lr)
    updates, new_opt_state = tx.update(grads, opt_state, state.flat_params)
    new_params = optax.apply_updates(state.flat_params, updates)
    new_ema = state.flat_ema * train.ema_rate + new_params * (1.0 - train.ema_rate)
    # The new state too: a non-finite value already in Adam's moments makes NaN params from a finite gradient.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new_params, new_ema, new_opt_state))
    below = grad_norm < train.skip_threshold if train.skip_threshold >= 0 else True
    apply = finite & below

    def keep(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        flat_params=keep(new_params, state.flat_params),
        flat_ema=keep(new_ema, state.flat_ema),
        opt_state=keep(new_opt_state, state.opt_state),
        skipped=state.skipped + (1 - apply.astype(jnp.int32)),
        rng=jax.random.key_data(rng),
    )
    if adversary is not None:
        disc, disc_metrics = adversary.update(state.disc, batch["target"], metrics.pop("decoded"))
        new_state, metrics = new_state.replace(disc=disc), dict(metrics, **disc_metrics)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr, skipped_update=1 - apply.astype(jnp.int32),
                   skipped_total=new_state.skipped)
    return new_state, metrics


def merge_params(trainable, frozen):
    """One params tree from the trainable and frozen parts (disjoint leaves of the same tree)."""
    flat = flax.traverse_util.flatten_dict(frozen)
    flat.update(flax.traverse_util.flatten_dict(trainable))
    return flax.traverse_util.unflatten_dict(flat)


def split_params(params, frozen_prefixes) -> tuple[Any, Any]:
    """(trainable, frozen): leaves whose '/'-joined path starts with any of `frozen_prefixes` are frozen."""
    flat = flax.traverse_util.flatten_dict(params)
    is_frozen = {path: any("/".join(path).startswith(p) for p in frozen_prefixes) for path in flat}
    trainable = {path: x for path, x in flat.items() if not is_frozen[path]}
    if not trainable:
        raise ValueError(f"train.frozen={tuple(frozen_prefixes)} freezes every parameter")
    frozen = {path: x for path, x in flat.items() if is_frozen[path]}
    return flax.traverse_util.unflatten_dict(trainable), flax.traverse_util.unflatten_dict(frozen)


def model_inputs(batch) -> tuple:
    """The model's positional inputs: (input, target) plus the LR input for VDVAE-SR batches."""
    return (batch["input"], batch["target"]) + ((batch["lr_input"],) if "lr_input" in batch else ())


def lr_consistency(decoded, lr_target, factor: int) -> jax.Array:
    """srez's LR-consistency term: the mean L1 distance between the MATLAB-bicubic downscale of the decoded output
    and the LR image, both in the likelihood's [-1, 1] range."""
    return jnp.abs(bicubic_downscale_jax(decoded, factor) - lr_target).mean()


def elbo_loss(model, lr_consistency_weight: float = 0.0, perceptual_weight: float = 0.0,
              adversarial_weight: float = 0.0, adversary=None) -> Callable:
    """The (conditional) ELBO as a training loss, with distortion, rate and per-layer KL [L] as metrics; for a
    VDVAE-SR, plus each weight times its term on the posterior pass's decoded output (the DMoL mean, which is
    differentiable; the posterior pass reconstructs this HR image, so paired terms compare like with like):
    `lr_consistency` (batches then carry `lr_target`), LPIPS to the HR image (with the weights in
    `critics["lpips"]`) and the `adversary`'s generator loss (with the discriminator's params in `critics["disc"]`).
    Each term and the ELBO are then metrics too; with the adversary, so is the decoded output, as `decoded`."""

    def loss_fn(params, frozen, batch, rng, critics=None):
        stats = model.apply({"params": merge_params(params, frozen)}, *model_inputs(batch), rngs={"sample": rng})
        metrics = {"distortion": stats["distortion"].mean(), "rate": stats["rate"].mean(),
                   "kl_per_layer": stats["kl"].mean(axis=0)}
        loss = stats["elbo"]
        if lr_consistency_weight or perceptual_weight or adversarial_weight:
            decoded = D.dmol_mean(stats["logits"].astype(jnp.float32))
            metrics["elbo"] = stats["elbo"]
        if lr_consistency_weight:
            factor = batch["target"].shape[1] // batch["lr_target"].shape[1]
            metrics["lr_consistency"] = lr_consistency(decoded, batch["lr_target"], factor)
            loss = loss + lr_consistency_weight * metrics["lr_consistency"]
        if perceptual_weight:
            metrics["perceptual"] = lpips_from_signed(critics["lpips"], decoded, batch["target"]).mean()
            loss = loss + perceptual_weight * metrics["perceptual"]
        if adversarial_weight:
            metrics["adversarial"] = adversary.generator_loss(critics["disc"], decoded)
            metrics["decoded"] = decoded
            loss = loss + adversarial_weight * metrics["adversarial"]
        return loss, metrics

    return loss_fn
