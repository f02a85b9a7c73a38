"""Issue 23's training options: the perceptual (LPIPS) term and adversarial fine-tuning with a PatchGAN, beside the
LR-consistency term (tests/test_train_step.py): off at weight 0, where their gradients go, the discriminator's own
update and skip, and the trainer's multi-device step and exact resume with a discriminator."""

import signal
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_step import _tiny_sr_batch
from test_trainer import _final, _finish, _start, _wait_for_step

from vdvae_sr_jax import adversarial, checkpoint, perceptual, train, trainer
from vdvae_sr_jax import distributions as D

GAN = ("adversarial_weight=0.1", "lr_consistency_weight=0.5")


def _config(**train_values):
    config, *_ = _tiny_sr_batch()
    config = config.copy_and_resolve_references()
    config.train.update(train_values)
    return config


def _step_jaxpr(config, model, params, batch, loss_fn, critics, adversary):
    trainable, frozen = train.split_params(params, config.train.frozen)
    tx = train.make_optimizer(config.train)
    state = trainer.new_state(config, model, trainable, tx, adversary)
    step = partial(train.train_step, loss_fn=loss_fn, tx=tx, train=config.train, adversary=adversary)
    return str(jax.make_jaxpr(step)(state, batch, frozen, critics)), state


def test_at_weight_zero_each_option_leaves_the_train_step_and_its_state_as_before():
    """Zero weights build no LPIPS weights, no discriminator and the plain ELBO step, op for op, whose state
    checkpoints under the same array paths: a plain run's checkpoints and results are unchanged."""
    config, model, params, batch, _ = _tiny_sr_batch()
    config = config.copy_and_resolve_references()
    config.train.update(frozen=("encoder",), lr_consistency_weight=0.0, perceptual_weight=0.0,
                        adversarial_weight=0.0)
    loss_fn, critics, adversary = trainer.training_objective(config, model)
    assert critics is None and adversary is None
    ours, state = _step_jaxpr(config, model, params, batch, loss_fn, None, None)
    plain, plain_state = _step_jaxpr(config, model, params, batch, train.elbo_loss(model), None, None)
    assert ours == plain
    assert set(checkpoint.fingerprint(state)[0]) == set(checkpoint.fingerprint(plain_state)[0])
    assert not any("disc" in path for path in checkpoint.fingerprint(state)[0])
    with_disc = trainer.abstract_state(_config(adversarial_weight=0.1), model)[0]
    assert jax.tree_util.tree_structure(with_disc.disc.params) == jax.tree_util.tree_structure(
        adversarial.adversary_from_config(config.train).init((16, 16, 3), jax.random.key(0)).params)


def test_the_perceptual_term_is_lpips_between_the_decoded_mean_and_the_hr_image():
    config, model, params, batch, hr = _tiny_sr_batch()
    trainable, frozen = train.split_params(params, ("encoder",))
    rng = jax.random.key(0)
    vgg = perceptual.load_lpips("vgg")
    loss, metrics = jax.jit(train.elbo_loss(model, perceptual_weight=0.25))(trainable, frozen, batch, rng,
                                                                             {"lpips": vgg})
    forward = jax.jit(lambda p: model.apply({"params": p}, *train.model_inputs(batch), rngs={"sample": rng}))(params)
    mean = D.dmol_mean(forward["logits"].astype(jnp.float32))
    expected = np.asarray(perceptual.lpips_from_signed(vgg, mean, batch["target"])).mean()
    assert 0.05 < expected < 1.5  # a decoded image of an untrained model is far from its photo
    assert float(metrics["perceptual"]) == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(float(forward["elbo"]) + 0.25 * expected, rel=1e-6)
    # LPIPS of the HR target against itself is 0: the term measures the decoded output's distance to it.
    assert float(perceptual.lpips_from_signed(vgg, batch["target"], batch["target"]).max()) < 1e-12


@pytest.mark.parametrize("term", ["perceptual", "adversarial"])
def test_the_terms_gradient_reaches_the_decoder_and_the_lr_encoder_only(term):
    config, model, params, batch, _ = _tiny_sr_batch()
    trainable, frozen = train.split_params(params, ("encoder",))
    adversary = adversarial.adversary_from_config(_config().train)
    critics = {"lpips": perceptual.load_lpips("vgg"), "disc": adversary.init((16, 16, 3), jax.random.key(3)).params}
    loss_fn = train.elbo_loss(model, **{f"{term}_weight": 1.0}, adversary=adversary)

    def added_term(p):
        return loss_fn(p, frozen, batch, jax.random.key(0), critics)[1][term]

    grads = jax.jit(jax.grad(added_term))(trainable)
    norms = {part: float(optax.tree.norm(grads[part])) for part in grads}
    assert set(norms) == {"decoder", "lr_encoder"} and "encoder" in frozen
    assert norms["decoder"] > 1e-4 and norms["lr_encoder"] > 1e-7, norms


def _gan_step(config, model, params, batch):
    trainable, frozen = train.split_params(params, config.train.frozen)
    loss_fn, critics, adversary = trainer.training_objective(config, model)
    tx = train.make_optimizer(config.train)
    state = trainer.new_state(config, model, trainable, tx, adversary)
    step = jax.jit(lambda s: train.train_step(s, batch, frozen, critics, loss_fn=loss_fn, tx=tx, train=config.train,
                                              adversary=adversary))
    return state, step, (loss_fn, frozen, adversary)


def test_the_discriminator_takes_one_adam_step_on_the_hinge_loss_and_nothing_else_changes():
    """With the generator's update skipped (its gradient norm is over skip_threshold), one step changes only the
    discriminator, by Adam's first step, -lr * g / (|g| + eps), on the hinge loss of HR images against the decoded
    outputs that the generator's loss saw."""
    config = _config(frozen=("encoder",), adversarial_weight=0.1, skip_threshold=1e-9, disc_lr=1e-3)
    _, model, params, batch, _ = _tiny_sr_batch()
    state, step, (loss_fn, frozen, adversary) = _gan_step(config, model, params, batch)
    after, metrics = step(state)

    assert int(metrics["skipped_update"]) == 1 and int(after.disc.skipped) == 0
    for new, old in ((after.flat_params, state.flat_params), (after.flat_ema, state.flat_ema),
                     (after.opt_state, state.opt_state)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, new, old)

    step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))[1]
    _, aux = loss_fn(state.params, frozen, batch, step_rng, {"disc": state.disc.params})

    def hinge(p):
        real, fake = jnp.split(adversary.net.apply({"params": p}, jnp.concatenate([batch["target"], aux["decoded"]])),
                               2)
        return jnp.maximum(0, 1 - real).mean() + jnp.maximum(0, 1 + fake).mean()

    loss, grads = jax.value_and_grad(hinge)(state.disc.params)
    assert float(metrics["disc_loss"]) == pytest.approx(float(loss), rel=1e-5)
    # Adam's first moment is (1 - beta1) g; its first step is -lr * g / (|g| + eps), about lr against the sign of
    # g wherever |g| is well above eps (where it is not, rounding in g decides the step).
    mu = after.disc.opt_state[0].mu
    jax.tree_util.tree_map(lambda m, g: np.testing.assert_allclose(m, 0.5 * g, rtol=1e-4, atol=1e-5 * np.abs(g).max()),
                           mu, grads)
    new, old, g = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
                   for t in (after.disc.params, state.disc.params, grads))
    clear = np.abs(g) > 1e-5
    assert clear.mean() > 0.5
    np.testing.assert_allclose((new - old)[clear], -1e-3 * np.sign(g[clear]), rtol=1e-3)
    moved = sum(float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree_util.tree_leaves(after.disc.params),
                                                            jax.tree_util.tree_leaves(state.disc.params)))
    assert moved > 0
    assert 0.0 <= float(metrics["disc_accuracy"]) <= 1.0 and float(metrics["adversarial"]) != 0


def test_a_non_finite_discriminator_update_is_skipped_on_its_own():
    """A NaN in the discriminator's Adam state skips its update (and counts it); the generator still updates."""
    config = _config(frozen=("encoder",), adversarial_weight=0.1)
    _, model, params, batch, _ = _tiny_sr_batch()
    state, step, _ = _gan_step(config, model, params, batch)
    adam = state.disc.opt_state[0]
    poisoned = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), adam.mu)
    disc = state.disc.replace(opt_state=(adam._replace(mu=poisoned), *state.disc.opt_state[1:]))
    state = state.replace(disc=disc, step=jnp.asarray(100, jnp.int32))  # past the warmup, whose first rate is 0
    after, metrics = step(state)
    assert int(metrics["disc_skipped_total"]) == 1 and int(metrics["skipped_update"]) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, after.disc.params, state.disc.params)
    assert float(jnp.abs(after.flat_params - state.flat_params).max()) > 0


@pytest.fixture(scope="module")
def straight_gan(tmp_path_factory, subprocess_env) -> dict[str, np.ndarray]:
    """Six steps with a discriminator on one device, checkpointed after each."""
    workdir = tmp_path_factory.mktemp("straight_gan")
    _finish(_start(subprocess_env, workdir, 6, 8, checkpoint_every=1, options=GAN))
    return _final(workdir)


def test_four_devices_give_the_same_generator_and_discriminator_as_one(tmp_path, subprocess_env, straight_gan):
    _finish(_start(subprocess_env, tmp_path, 6, 2, devices=4, options=GAN))
    a, b = straight_gan, _final(tmp_path)
    assert int(a["devices"]) == 1 and int(b["devices"]) == 4 and int(b["step"]) == 6
    disc = [k for k in a if k.startswith("disc/") and "params" in k]
    assert len(disc) == 8 and len([k for k in a if k.startswith("params/")]) > 20
    for key in (k for k in a if k.startswith(("params/", "ema/"))):
        np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=2e-6, err_msg=key)
    # Adam's early steps are about lr * g / |g|, so where a discriminator gradient is near zero, float32 rounding
    # of the 4-device sum moves that weight by a part of lr (1e-4): allowed up to a fifth of it.
    for key in disc:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=2e-5, err_msg=key)
    for key in (k for k in a if k.startswith("disc/") and k not in disc):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-7, err_msg=key)
    moments = [k for k in a if k.startswith("disc/") and "'mu'" in k]
    assert len(moments) == 8 and max(np.abs(a[k]).max() for k in moments) > 0  # the discriminator trained


def test_a_killed_run_with_a_discriminator_resumes_to_identical_params(tmp_path, subprocess_env, straight_gan):
    killed = _start(subprocess_env, tmp_path, 6, 8, checkpoint_every=1, options=GAN)
    _wait_for_step(tmp_path, 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    _finish(_start(subprocess_env, tmp_path, 6, 8, checkpoint_every=1, options=GAN))
    resumed = _final(tmp_path)
    assert int(resumed["step"]) == 6 and set(resumed) == set(straight_gan)
    for key in straight_gan:
        np.testing.assert_array_equal(resumed[key], straight_gan[key], err_msg=key)


def test_fine_tuning_starts_from_the_ema_params_of_a_trained_run(tmp_path, subprocess_env):
    """`init.sr_checkpoint` = a training workdir: the run's newest EMA params, whatever the added losses; a workdir
    that does not exist is one error naming the key."""
    from tiny_training import tiny_config

    from vdvae_sr_jax.model import model_from_config

    _finish(_start(subprocess_env, tmp_path / "plain", 2, 8, checkpoint_every=1))
    trained = _final(tmp_path / "plain")
    config = tiny_config(2, 8, 1)
    config.init.sr_checkpoint = str(tmp_path / "plain")
    config.train.adversarial_weight = 0.1
    model = model_from_config(config)
    trainable, frozen = train.split_params(trainer.initial_params(config, model), config.train.frozen)
    leaves = {f"ema/{k}": v for k, v in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    assert len(leaves) > 20 and set(leaves) == {k for k in trained if k.startswith("ema/")}
    for key, value in leaves.items():
        np.testing.assert_array_equal(value, trained[key], err_msg=key)
    assert any(np.abs(trained[k] - trained["params/" + k[4:]]).max() > 0 for k in leaves)  # EMA, not raw params

    config.init.sr_checkpoint = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match="no checkpoint of the VDVAE-SR of init.sr_checkpoint at .*missing: train "
                                         "that run first"):
        trainer.initial_params(config, model)
