"""Training checkpoints: a state comes back as saved; a damaged or non-finite one is reported by step and the one
before it is used; one that does not fit the run's state is named, not lost."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from vdvae_sr_jax import train
from vdvae_sr_jax.checkpoint import CheckpointError, TrainCheckpoints


def _state(width: int, step: int = 0):
    kernel = jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width) / 7
    params = {"conv": {"kernel": kernel}, "gain": jnp.ones(width)}
    state = train.init_state(params, optax.adam(1e-3), jax.random.key(0))
    return state.replace(step=jnp.int32(step), flat_ema=state.flat_ema + step)


def _saved(tmp_path, steps, width=4096):
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=3)
    for step in steps:
        assert ckpts.save(step, _state(width, step))
    ckpts.close()
    return tmp_path / "ckpts"


def _largest_data_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def test_a_state_restores_as_saved_and_a_misfit_names_the_checkpoint(tmp_path):
    directory = _saved(tmp_path, [7], width=4)
    ckpts = TrainCheckpoints(directory, keep=2)
    restored = ckpts.restore_latest(_state(4))
    assert int(restored.step) == 7
    np.testing.assert_array_equal(restored.flat_ema, _state(4, 7).flat_ema)
    with pytest.raises(CheckpointError, match=r"the checkpoint at .*ckpts/7 does not fit this config's training "
                       r"state \(\.flat_params is \[16\] float32, needs \[20\] float32.*is --config the one"):
        ckpts.restore_latest(_state(5), set_aside=tmp_path / "rejected")
    assert ckpts.manager.all_steps() == [7] and not (tmp_path / "rejected").exists()  # nothing moved or deleted
    ckpts.close()


def test_bytes_changed_on_disk_are_found_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    """64 bytes overwritten in a data file of the newest checkpoint decode to finite values: only the checksums
    saved with it tell; the run resumes from the step before, and the damaged one is moved aside, not deleted."""
    directory = _saved(tmp_path, [1, 2])
    data_file = _largest_data_file(directory / "2")
    with data_file.open("r+b") as f:
        f.seek(data_file.stat().st_size // 2)
        f.write(b"\xff" * 64)
    ckpts = TrainCheckpoints(directory, keep=3)
    with caplog.at_level(logging.WARNING):
        restored = ckpts.restore_latest(_state(4096), set_aside=tmp_path / "rejected")
    assert int(restored.step) == 1
    np.testing.assert_array_equal(restored.flat_ema, _state(4096, 1).flat_ema)
    assert ckpts.manager.all_steps() == [1] and (tmp_path / "rejected" / "2" / "default").is_dir()
    assert re.search(r"the checkpoint at .*ckpts/2 is (corrupt \(checksum mismatch in \.|unreadable).*moved to "
                     r".*rejected/2", caplog.text)
    ckpts.close()


def test_an_unreadable_or_non_finite_checkpoint_falls_back_and_when_none_is_left_says_so(tmp_path):
    directory = _saved(tmp_path, [1, 2, 3])
    for path in (directory / "3").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:10])
    ckpts = TrainCheckpoints(directory, keep=3)
    poisoned = _state(4096, 2)
    poisoned = poisoned.replace(opt_state=optax.tree.set(poisoned.opt_state, mu=poisoned.flat_params.at[5].set(np.inf)))
    ckpts.manager.delete(2)
    ckpts.manager.save(2, args=ocp.args.Composite(default=ocp.args.StandardSave(poisoned)), force=True)  # no checksums
    ckpts.manager.wait_until_finished()
    restored = ckpts.restore_latest(_state(4096))
    assert int(restored.step) == 1 and sorted(ckpts.manager.all_steps()) == [1, 2, 3]  # without set_aside: kept
    ckpts.manager.delete(1)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*ckpts: step 3 is unreadable \(.*\); "
                       r"step 2 holds NaN or inf values; all left in place: if the files are damaged, move them away"):
        ckpts.restore_latest(_state(4096), set_aside=tmp_path / "rejected")
    assert sorted(ckpts.manager.all_steps()) == [2, 3] and not (tmp_path / "rejected").exists()  # the machine's fault?
    ckpts.close()


def test_a_non_finite_state_is_not_saved_so_rotation_keeps_the_last_good_one(tmp_path, caplog):
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=1)
    assert ckpts.save(1, _state(8, 1))
    bad = _state(8, 2)
    with caplog.at_level(logging.ERROR):
        assert not ckpts.save(2, bad.replace(flat_params=bad.flat_params.at[0].set(np.nan)))
    ckpts.close()
    assert "step 2: the training state holds NaN or inf values; not saved" in caplog.text
    assert TrainCheckpoints(tmp_path / "ckpts", keep=1).manager.all_steps() == [1]


def test_the_latest_and_the_best_by_validation_elbo_are_kept(tmp_path):
    """keep=2: the two newest steps, and the one with the lowest validation ELBO (a loss) even when older."""
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=2)
    for step, val_elbo in [(1, 5.0), (2, 3.0), (3, None), (4, 4.0), (5, None), (6, 4.5)]:
        ckpts.save(step, _state(2, step), val_elbo)
    ckpts.close()
    assert TrainCheckpoints(tmp_path / "ckpts", keep=2).manager.all_steps() == [2, 5, 6]


def test_a_failed_write_is_one_error_naming_the_checkpoints_a_rerun_resumes_from(tmp_path, monkeypatch):
    """Orbax's background write errors surface at the next save or at close, as any exception type."""
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=3)
    assert ckpts.save(1, _state(8, 1))

    def full_disk(*args, **kwargs):
        raise ValueError('RESOURCE_EXHAUSTED: Failed writing: "ckpts/2.orbax-checkpoint-tmp/d/0": No space left on '
                         "device [os_error_code='28']")

    monkeypatch.setattr(ckpts.manager, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"saving a checkpoint in \S*ckpts failed \(the disk is full\); the "
                       r"complete checkpoints are steps 1: free some space and rerun to resume from step 1$"):
        ckpts.save(2, _state(8, 2))
    monkeypatch.setattr(ckpts.manager, "wait_until_finished", full_disk)
    ckpts.close()  # the failure was raised already: closing does not raise it again
    assert TrainCheckpoints(tmp_path / "ckpts", keep=3).manager.all_steps() == [1]
