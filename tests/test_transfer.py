"""Transfer learning as in the thesis: an SR model starts exactly at a converted HR VDVAE, HR encoder frozen."""

import jax
import numpy as np
import pytest
from conftest import assert_close, load_reference, reference_dir

from configs.demo import get_config as sr_config
from configs.demo_vdvae import get_config as vdvae_config
from vdvae_sr_jax import train, trainer
from vdvae_sr_jax.convert import convert_to_orbax
from vdvae_sr_jax.model import model_from_config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """vdvae_tiny converted twice: the whole model, and its encoder alone."""
    root = tmp_path_factory.mktemp("converted")
    source = reference_dir("vdvae_tiny") / "model.th"
    convert_to_orbax(vdvae_config(), source, root / "hr")
    convert_to_orbax(vdvae_config(), source, root / "enc", encoder_only=True)
    return root


def test_sr_model_starts_at_the_pretrained_hr_model(converted):
    config = sr_config()
    config.init.hr_checkpoint = str(converted / "hr")
    model = model_from_config(config)
    params = trainer.initial_params(config, model)
    hparams, ref = load_reference("vdvae_tiny")
    eps = [ref[f"eps_{i:03d}"] for i in range(hparams["n_layers"])]
    lr = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    stats = model.apply({"params": params}, ref["input"], ref["target"], lr, eps=eps)
    assert_close(stats["elbo"], ref["elbo"], 1e-5, "elbo at step 0")
    assert_close(stats["kl"], ref["kl"], 1e-4, "kl at step 0")

    trainable, frozen = train.split_params(params, ("encoder",))
    assert set(frozen) == {"encoder"} and set(trainable) == {"decoder", "lr_encoder"}
    state = train.init_state(trainable, train.make_optimizer(config.train), jax.random.key(0))
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    assert 0 < n_trainable < sum(x.size for x in jax.tree.leaves(params))
    moments = [x.size for x in jax.tree.leaves(state.opt_state) if x.size > 1]
    assert moments == [n_trainable, n_trainable]  # Adam's mu and nu, over the trainable params alone


def test_an_encoder_of_the_wrong_shape_is_named(converted):
    config = sr_config()
    config.init.lr_encoder_checkpoint = str(converted / "enc")  # a 32x32 encoder for the 8x8 LR encoder
    with pytest.raises(ValueError, match="enc does not fit lr_encoder") as error:
        trainer.initial_params(config, model_from_config(config))
    assert "enc_blocks_6_7/c2/kernel has shape (2, 3, 3, 8, 8), lr_encoder needs (2, 1, 1, 8, 8)" in str(error.value)
    assert "enc_blocks_11/c1/bias is not a parameter of lr_encoder" in str(error.value)


def test_a_missing_checkpoint_says_how_to_make_it(tmp_path):
    config = sr_config()
    config.init.hr_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"no checkpoint of the HR VDVAE at .*nowhere: convert the official"):
        trainer.initial_params(config, model_from_config(config))
