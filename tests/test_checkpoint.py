"""Training checkpoints: a state comes back as saved, and one that does not fit the run's state is named, not lost."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdvae_sr_jax import train
from vdvae_sr_jax.checkpoint import TrainCheckpoints


def _state(width: int):
    params = {"conv": {"kernel": jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width)}, "gain": jnp.ones(width)}
    return train.init_state(params, optax.adam(1e-3), jax.random.key(0))


def test_a_state_restores_as_saved_and_a_misfit_names_the_checkpoint(tmp_path):
    saved = _state(4).replace(step=jnp.int32(7))
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=2)
    ckpts.save(7, saved)
    ckpts.close()

    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=2)
    restored = ckpts.restore_latest(_state(4))
    assert int(restored.step) == 7
    np.testing.assert_array_equal(restored.params["conv"]["kernel"], saved.params["conv"]["kernel"])
    with pytest.raises(ValueError, match=r"the checkpoint at .*ckpts/7 does not fit this config's training state"):
        ckpts.restore_latest(_state(5))
    assert ckpts.manager.latest_step() == 7  # nothing deleted
    ckpts.close()


def test_the_latest_and_the_best_by_validation_elbo_are_kept(tmp_path):
    """keep=2: the two newest steps, and the one with the lowest validation ELBO (a loss) even when older."""
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=2)
    for step, val_elbo in [(1, 5.0), (2, 3.0), (3, None), (4, 4.0), (5, None), (6, 4.5)]:
        ckpts.save(step, _state(2).replace(step=jnp.int32(step)), val_elbo)
    ckpts.close()
    assert TrainCheckpoints(tmp_path / "ckpts", keep=2).manager.all_steps() == [2, 5, 6]
