"""The official update rule: AdamW + clipping + warmup against torch, gradient skipping, and the EMA."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vdvae_sr_jax import distributions as D
from vdvae_sr_jax import train


def _train_config(**overrides):
    return ml_collections.ConfigDict(
        dict(lr=0.1, wd=0.01, adam_beta1=0.9, adam_beta2=0.9, adam_eps=1e-8, warmup_iters=4, grad_clip=3.0,
             skip_threshold=50.0, ema_rate=0.9) | overrides
    )


def _quadratic_loss(params, frozen, batch, rng):
    """A loss whose gradient norm is set by the batch, so a batch can make it explode."""
    del rng
    loss = jnp.sum(batch["scale"] * (params["w"] - batch["target"]) ** 2) + frozen["c"]
    return loss, {}


def _run(cfg, batches, w0):
    tx = train.make_optimizer(cfg)
    state = train.init_state({"w": jnp.asarray(w0)}, tx, jax.random.key(0))
    step = jax.jit(lambda s, b: train.train_step(s, b, {"c": 1.0}, loss_fn=_quadratic_loss, tx=tx, train=cfg))
    out = []
    for batch in batches:
        state, metrics = step(state, batch)
        out.append((state, metrics))
    return out


def test_update_matches_torch_adamw_with_clipping_and_warmup():
    torch = pytest.importorskip("torch")
    cfg = _train_config()
    w0 = np.array([1.0, -2.0, 0.5], np.float32)
    target = np.array([0.3, 0.1, -0.2], np.float32)
    batches = [{"scale": np.float32(s), "target": target} for s in (1.0, 2.0, 0.5, 1.0, 3.0, 1.0)]
    ours = _run(cfg, batches, w0)

    w = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.AdamW([w], lr=cfg.lr, betas=(0.9, 0.9), eps=1e-8, weight_decay=cfg.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 if it > cfg.warmup_iters else it / cfg.warmup_iters)
    ema = w.detach().clone()
    for batch, (state, metrics) in zip(batches, ours):
        opt.zero_grad()
        loss = (float(batch["scale"]) * (w - torch.tensor(batch["target"])) ** 2).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([w], cfg.grad_clip).item()
        opt.step()
        sched.step()
        ema = ema * cfg.ema_rate + w.detach() * (1 - cfg.ema_rate)
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
        np.testing.assert_allclose(state.params["w"], w.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.ema_params["w"], ema.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["huge", "nan"])
def test_skipped_update_leaves_state_bit_identical(bad):
    cfg = _train_config()
    target = np.array([0.3, 0.1, -0.2], np.float32)
    good = {"scale": np.float32(1.0), "target": target}
    worse = {"scale": np.float32(1e4) if bad == "huge" else np.float32(np.nan), "target": target}
    (before, _), (after, metrics), (resumed, _) = _run(cfg, [good, worse, good], [1.0, -2.0, 0.5])
    for field in ("params", "ema_params", "opt_state"):
        old, new = jax.tree_util.tree_leaves(getattr(before, field)), jax.tree_util.tree_leaves(getattr(after, field))
        for a, b in zip(old, new):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
    assert int(metrics["skipped_update"]) == 1 and int(after.skipped) == 1
    assert int(after.step) == 2 and float(metrics["lr"]) == pytest.approx(cfg.lr * 1 / cfg.warmup_iters)
    assert int(resumed.skipped) == 1 and not np.array_equal(resumed.params["w"], after.params["w"])


@pytest.mark.parametrize("poisoned", ["mu", "nu"])
def test_a_non_finite_adam_moment_is_not_applied(poisoned):
    """An inf in Adam's moments (say, from a corrupt checkpoint) turns a finite gradient into NaN params: the step
    must skip, not write them."""
    cfg = _train_config()
    tx = train.make_optimizer(cfg)
    state = train.init_state({"w": jnp.asarray([1.0, -2.0, 0.5])}, tx, jax.random.key(0))
    moment = optax.tree.get(state.opt_state, poisoned)
    state = state.replace(opt_state=optax.tree.set(state.opt_state, **{poisoned: moment.at[1].set(jnp.inf)}))
    batch = {"scale": np.float32(1.0), "target": np.array([0.3, 0.1, -0.2], np.float32)}
    after, metrics = train.train_step(state, batch, {"c": 1.0}, loss_fn=_quadratic_loss, tx=tx, train=cfg)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["skipped_update"]) == 1 and int(after.skipped) == 1
    np.testing.assert_array_equal(after.flat_params, state.flat_params)
    np.testing.assert_array_equal(after.flat_ema, state.flat_ema)
    np.testing.assert_array_equal(optax.tree.get(after.opt_state, poisoned), optax.tree.get(state.opt_state, poisoned))


def test_skip_threshold_minus_one_disables_skipping():
    cfg = _train_config(skip_threshold=-1.0)
    batch = {"scale": np.float32(1e4), "target": np.zeros(3, np.float32)}
    ((state, metrics),) = _run(cfg, [batch], [1.0, -2.0, 0.5])
    assert int(state.skipped) == 0 and float(metrics["grad_norm"]) > 1e4


def test_split_params_freezes_by_prefix_and_merges_back():
    params = {"encoder": {"a": np.ones(2)}, "decoder": {"b": np.zeros(3), "gate": np.ones(1)}, "lr_encoder": {"c": 1}}
    trainable, frozen = train.split_params(params, ["encoder"])
    assert set(trainable) == {"decoder", "lr_encoder"} and set(frozen) == {"encoder"}
    merged = train.merge_params(trainable, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="freezes every parameter"):
        train.split_params(params, ["encoder", "decoder", "lr_"])


def test_a_long_run_of_skips_is_reported_with_norms_and_threshold(caplog):
    from vdvae_sr_jax.trainer import SkipWatch

    watch = SkipWatch(threshold=400.0, limit=30, skipped=5)
    with caplog.at_level("WARNING"):
        watch.update(skipped_total=15, steps=10, grad_norm=812.3)
        watch.update(skipped_total=24, steps=10, grad_norm=900.0)  # one update applied: the run restarts
        watch.update(skipped_total=34, steps=10, grad_norm=950.1)
        watch.update(skipped_total=44, steps=10, grad_norm=990.0)
        assert not caplog.records
        watch.update(skipped_total=54, steps=10, grad_norm=1001.0)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "last 30 updates were all skipped" in message and "[950.1, 990.0, 1001.0]" in message
    assert "skip_threshold=400.0" in message


def test_a_frozen_encoder_gets_no_backward_pass():
    from tiny_training import tiny_config

    from vdvae_sr_jax import data
    from vdvae_sr_jax.model import VDVAESR, init_params, model_from_config

    config = tiny_config(steps=1, batch_per_device=2, checkpoint_every=1)
    config.scan_unroll = 16  # every block written out, so the HLO text shows each convolution
    model = model_from_config(config)
    params = jax.eval_shape(lambda: init_params(model))
    batch = data.model_batch(np.zeros((2, 16, 16, 3), np.uint8), config.data, False, 4)

    def convolutions(hlo):  # on the CPU, a 1x1 convolution's gradients are matrix products
        return sum(hlo.as_text().count(f"stablehlo.{op}") for op in ("convolution", "dot_general"))

    def gradient_convolutions(frozen_prefixes):
        trainable, frozen = train.split_params(params, frozen_prefixes)
        grad_fn = jax.jit(jax.value_and_grad(train.elbo_loss(model), has_aux=True))
        return convolutions(grad_fn.lower(trainable, frozen, batch, jax.random.key(0)))

    encoder = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VDVAESR.encode)).lower(params, batch["input"])
    n_encoder = convolutions(encoder)
    assert n_encoder == 1 + 7 * 4  # in_conv, then 7 blocks of 4 convs
    # Training the encoder adds a weight and an input gradient per convolution, less the image's input gradient,
    # and the input gradient of each posterior c1's product over the activations, once per run of the decoder's
    # blocks (a scan, whose body the HLO text holds once): c1 takes the state and the activations apart.
    runs = sum(name.startswith("dec_blocks") for name in params["decoder"])
    assert runs == 4
    assert gradient_convolutions(()) - gradient_convolutions(("encoder",)) == 2 * n_encoder - 1 + runs


def _tiny_sr_batch():
    from test_upscale import tiny_model_and_params

    from vdvae_sr_jax import data

    config, model, params = tiny_model_and_params()
    hr = np.stack([im[:16, :16] for _, im in data.embedded_photos()[:2]])
    return config, model, params, data.model_batch(hr, config.data, False, 4, lr_target=True), hr


def test_lr_consistency_is_the_l1_of_the_downscaled_mean_and_off_at_weight_zero():
    """Issue 23's first option: at weight 0 the loss is the ELBO's program, op for op; at weight w it adds w times
    the mean |MATLAB-downscale(DMoL mean) - LR|, which a NumPy transcription checks."""
    from vdvae_sr_jax import distributions as D
    from vdvae_sr_jax.resize import imresize

    config, model, params, batch, hr = _tiny_sr_batch()
    trainable, frozen = train.split_params(params, ("encoder",))
    rng = jax.random.key(0)
    args = (trainable, frozen, batch, rng)
    assert str(jax.make_jaxpr(train.elbo_loss(model, 0.0))(*args)) == str(jax.make_jaxpr(train.elbo_loss(model))(*args))
    forward = jax.jit(lambda p: model.apply({"params": p}, *train.model_inputs(batch), rngs={"sample": rng}))(params)
    loss, metrics = jax.jit(train.elbo_loss(model, 0.5))(*args)
    mean = np.asarray(D.dmol_mean(forward["logits"].astype(jnp.float32)), np.float64)
    expected = np.abs(np.stack([imresize(m, 0.25) for m in mean]) - batch["lr_target"]).mean()
    assert float(metrics["lr_consistency"]) == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(float(forward["elbo"]) + 0.5 * expected, rel=1e-6)
    lr_uint8 = np.stack([imresize(im, 0.25) for im in hr]).round().clip(0, 255)
    np.testing.assert_allclose(batch["lr_target"], lr_uint8 / 127.5 - 1, atol=1e-6)  # the LR in the target's range


def test_the_lr_consistency_gradient_reaches_the_decoder_and_the_lr_encoder_only():
    """With the HR encoder frozen, the term's gradient is non-zero on the decoder and the LR encoder, and the frozen
    encoder has none to get: it is not among the trainable params."""
    config, model, params, batch, _ = _tiny_sr_batch()
    trainable, frozen = train.split_params(params, ("encoder",))

    def term(p):
        stats = model.apply({"params": train.merge_params(p, frozen)}, *train.model_inputs(batch),
                            rngs={"sample": jax.random.key(0)})
        return train.lr_consistency(D.dmol_mean(stats["logits"]), batch["lr_target"], 4)

    grads = jax.jit(jax.grad(term))(trainable)
    norms = {part: float(optax.tree.norm(grads[part])) for part in grads}
    assert set(norms) == {"decoder", "lr_encoder"} and "encoder" in frozen
    assert norms["decoder"] > 1e-4 and norms["lr_encoder"] > 1e-6, norms
