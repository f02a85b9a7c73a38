"""Rematerialised top-down blocks: the same params, loss and gradients as stored activations."""

import jax
import numpy as np
from tiny_training import tiny_config

from vdvae_sr_jax import data, train
from vdvae_sr_jax.model import init_params, model_from_config


def _model(remat: bool):
    config = tiny_config(steps=1, batch_per_device=4, checkpoint_every=1)
    config.remat = remat
    return config, model_from_config(config)


def _loss_and_grads(remat: bool, params):
    config, model = _model(remat)
    trainable, frozen = train.split_params(params, config.train.frozen)
    hr = np.stack([data.center_crop(im, model.image_size) for _, im in data.embedded_photos()[:4]])
    batch = data.model_batch(hr, config.data, model.low_bit, model.image_size // model.lr_image_size)
    grad_fn = jax.jit(jax.value_and_grad(train.elbo_loss(model), has_aux=True))
    args = (trainable, frozen, batch, jax.random.key(4))
    (loss, _), grads = grad_fn(*args)
    return float(loss), grads, grad_fn.lower(*args).cost_analysis()["flops"]


def test_remat_keeps_param_names_loss_and_gradients():
    params = init_params(_model(remat=False)[1], jax.random.key(3))
    remat_model = _model(remat=True)[1]
    remat_params = jax.eval_shape(lambda: init_params(remat_model))
    assert jax.tree_util.tree_structure(remat_params) == jax.tree_util.tree_structure(params)
    loss, grads, flops = _loss_and_grads(False, params)
    remat_loss, remat_grads, remat_flops = _loss_and_grads(True, params)
    assert remat_flops > 1.1 * flops  # the backward pass recomputes the top-down blocks' forward pass (1.18x)
    assert 1.0 < loss < 10.0 and abs(remat_loss - loss) <= 1e-6 * loss
    flat, remat_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(remat_grads)
    assert len(flat) > 50
    for (path, g), r in zip(flat, remat_flat):
        scale = max(np.abs(g).max(), 1e-12)
        np.testing.assert_allclose(r, g, rtol=0, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))
