"""Orbax checkpoints: exported models (params plus a JSON record of their config) and training states."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vdvae_sr_jax.train import all_finite


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_params(directory: str | Path, params, metadata: dict[str, Any]) -> Path:
    """Writes `params` and `metadata` (e.g. the model hparams and source file) to a new directory."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new output directory or remove it")
    params = jax.tree_util.tree_map(np.asarray, params)
    _checkpointer().save(
        directory,
        args=ocp.args.Composite(params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)),
    )
    return directory


def load_params(directory: str | Path) -> tuple[Any, dict[str, Any]]:
    """Reads (params, metadata) written by `save_params`, as numpy arrays on the host."""
    directory = Path(directory).absolute()
    if not (directory / "params").is_dir():
        raise FileNotFoundError(
            f"no model checkpoint at {directory}: convert an official .th file with `python -m convert.vdvae`"
        )
    restored = _checkpointer().restore(
        directory,
        args=ocp.args.Composite(params=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()),
    )
    return jax.tree_util.tree_map(np.asarray, restored.params), restored.metadata


def graft(params, loaded, at: str | None, source: str):
    """`params` with the subtree `at` (None: the whole tree) replaced, leaf by leaf, by `loaded` (a subset of it);
    shapes must agree."""
    flat = flax.traverse_util.flatten_dict(params)
    errors = []
    for path, value in flax.traverse_util.flatten_dict(loaded).items():
        target = (at, *path) if at else path
        if target not in flat:
            errors.append(f"{'/'.join(path)} is not a parameter of {at}")
        elif flat[target].shape != value.shape:
            errors.append(f"{'/'.join(path)} has shape {value.shape}, {at} needs {flat[target].shape}")
        else:
            flat[target] = value
    if errors:
        raise ValueError(f"{source} does not fit {at or 'the model'}:\n  " + "\n  ".join(errors))
    return flax.traverse_util.unflatten_dict(flat)


class CheckpointError(ValueError):
    """A training checkpoint that cannot be used; the message names it and says what to do."""


def _checksum(x: jax.Array) -> jax.Array:
    """The sum mod 2**32 of the array's words, each times an odd weight set by its position: any one changed word
    changes it."""
    words = jax.lax.bitcast_convert_type(x.reshape(-1), jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    weights = (2 * jnp.arange(words.size, dtype=jnp.uint32) + 1) * jnp.uint32(0x9E3779B1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    return [_checksum(x) for x in leaves], all_finite(leaves)


def fingerprint(state) -> tuple[dict[str, dict], bool]:
    """({leaf path: shape, dtype and checksum}, whether every float in `state` is finite)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
    checksums, finite = jax.device_get(_fingerprint(list(leaves)))
    record = {jax.tree_util.keystr(path): {"shape": list(x.shape), "dtype": str(x.dtype), "checksum": int(c)}
              for path, x, c in zip(paths, leaves, checksums)}
    return record, bool(finite)


class _DataIteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler of a data iterator's state (one JSON file per process), which also restores a checkpoint
    written by another number of processes: the training pipeline's iterator state is the same in every process."""

    def restore(self, directory, item=None, args=None):
        own = Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item, args)
        (item or args.item).set_state(json.loads(min(Path(directory).glob("process_*-of-*.json")).read_text()))
        return item or args.item


@ocp.args.register_with_handler(_DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class _DataIteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class _DataIteratorRestore(ocp.args.CheckpointArgs):
    item: Any


class TrainCheckpoints:
    """Training checkpoints: the last `keep` steps and the best by validation ELBO, written asynchronously, each
    with the checksum of every array so that one that changed on disk is found when it is read back, and the
    position of the data iterator (item `data`; checkpoints written before it have only the state)."""

    def __init__(self, directory: str | Path, keep: int):
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_elbo"], reverse=True, n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
        self.directory = Path(directory).absolute()
        self.failed = False
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "default": ocp.StandardCheckpointHandler(), "data": _DataIteratorHandler()})

    def save(self, step: int, state, val_elbo: float | None = None, data_iterator=None) -> bool:
        """Saves `state`, and the state of `data_iterator` (a grain iterator) if given, unless `state` holds a NaN
        or inf, which no later run should resume from; whether it saved."""
        record, finite = fingerprint(state)
        if not finite:
            logging.error("step %d: the training state holds NaN or inf values; not saved, so the last good "
                          "checkpoint in %s stays", step, self.directory)
            return False
        self._check_free_space(state)
        metrics = None if val_elbo is None else {"val_elbo": float(val_elbo)}
        try:  # this also waits for the previous save, whose write errors surface here
            items = {"default": ocp.args.StandardSave(state)}
            if data_iterator is not None:
                items["data"] = _DataIteratorSave(data_iterator)
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True,
                              custom_metadata={"arrays": record})
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore report write failures as any type
            raise self._write_failure(error) from error
        return True

    def _check_free_space(self, state) -> None:
        """Stops before a save that the disk may not hold: one written halfway fails in orbax's threads, and
        TensorBoard's and the metrics' writes fail after it."""
        needed = sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) + 2**20  # arrays before compression
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            self.failed = True
            raise CheckpointError(
                f"the disk holding {self.directory} has {free / 2**20:.1f} MiB free and a checkpoint needs up to "
                f"{needed / 2**20:.1f} MiB; {self._resume_hint('free some space')}")

    def _resume_hint(self, fix: str) -> str:
        steps = sorted(self.manager.all_steps())
        if not steps:
            return f"{fix} and rerun; no checkpoint has been written yet"
        return (f"the complete checkpoints are steps {', '.join(map(str, steps))}: {fix} and rerun to resume from "
                f"step {steps[-1]}")

    def _write_failure(self, error: Exception) -> CheckpointError:
        """A one-line error for a failed save: why, and which complete checkpoints a rerun resumes from."""
        self.failed = True
        full = "No space left on device" in str(error)
        with contextlib.suppress(Exception):  # saves still in flight: the one that failed fails again here
            self.manager.wait_until_finished()
        self.manager.reload()
        return CheckpointError(f"saving a checkpoint in {self.directory} failed "
                               f"({'the disk is full' if full else _first_line(error)}); "
                               + self._resume_hint("free some space" if full else "fix that"))

    def restore_latest(self, abstract_state, set_aside: Path | None = None, data_iterator=None):
        """The newest state, placed like `abstract_state` (arrays or ShapeDtypeStructs), that reads back as saved
        and finite; None if there are no checkpoints. Newer ones that fail are reported and, once an older one has
        read back soundly, moved to `set_aside` (if given) so that training can write their steps again; when none
        does, nothing is moved, as the cause may be the machine rather than the files. `data_iterator` (a grain
        iterator) is set to the position saved with that state, if one was."""
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        rejected = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem, state = self._read(step, target)
            if problem is None:
                for bad, why in rejected:
                    where = self._set_aside(bad, set_aside) if set_aside is not None else "left in place"
                    logging.warning("the checkpoint at %s %s; %s", self.directory / str(bad), why, where)
                if rejected:
                    logging.warning("using the checkpoint of step %d instead", step)
                if data_iterator is not None and (self.directory / str(step) / "data").is_dir():
                    self._restore_data_iterator(step, data_iterator)
                return state
            rejected.append((step, problem))
        if rejected:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: " + "; ".join(f"step {s} {why}" for s, why in rejected)
                + "; all left in place: if the files are damaged, move them away to train from the start")
        return None

    def _restore_data_iterator(self, step: int, data_iterator) -> None:
        """Sets `data_iterator` to the position saved at `step`; an unreadable one is reported and left to the
        caller, who can start the data from the step (batch k depends only on the seed and k)."""
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=_DataIteratorRestore(data_iterator)))
        except Exception as error:  # noqa: BLE001 - grain and orbax raise many kinds for a damaged JSON file
            logging.warning("the data iterator state at %s is unreadable (%s); the data starts from the step instead",
                            self.directory / str(step) / "data", _first_line(error))

    def _read(self, step: int, target):
        """(None, the state) if the checkpoint of `step` is sound, else (what is wrong with it, None)."""
        path = self.directory / str(step)
        try:
            saved = (self.manager.metadata(step).custom_metadata or {}).get("arrays")
        except Exception as error:  # noqa: BLE001 - a checkpoint whose metadata cannot be read is unusable
            return f"is unreadable ({_first_line(error)})", None
        if saved is not None:
            misfits = _misfits(saved, target)
            if misfits:
                raise CheckpointError(
                    f"the checkpoint at {path} does not fit this config's training state ({misfits}): is --config "
                    "the one this workdir was trained with? Use that config, or a new --workdir")
        try:
            restore = ocp.args.Composite(default=ocp.args.StandardRestore(target))
            state = self.manager.restore(step, args=restore).default
        except ValueError as error:
            if saved is None:  # written before checksums: a misfit is only told apart by orbax's error
                raise CheckpointError(
                    f"the checkpoint at {path} does not fit this config's training state: is --config the one this "
                    f"workdir was trained with? Use that config, or a new --workdir ({error})") from error
            return f"is unreadable ({_first_line(error)})", None
        except Exception as error:  # noqa: BLE001 - tensorstore and orbax raise plain Exception for damaged files
            return f"is unreadable ({_first_line(error)})", None
        record, finite = fingerprint(state)
        if saved is not None:
            changed = [key for key, leaf in record.items() if saved.get(key, {}).get("checksum") != leaf["checksum"]]
            if changed:
                return f"is corrupt (checksum mismatch in {', '.join(changed)})", None
        if not finite:
            return "holds NaN or inf values", None
        return None, state

    def _set_aside(self, step: int, folder: Path) -> str:
        """Moves the checkpoint of `step` into `folder` (another name if taken); where it went."""
        destination = folder / str(step)
        n = 1
        while destination.exists():
            n += 1
            destination = folder / f"{step}.{n}"
        if jax.process_index() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return f"moved to {destination}"

    def close(self) -> None:
        """Waits for the last save; its failure is raised, unless a failed save has been raised already."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as error:  # noqa: BLE001 - as in `save`
            if not self.failed:
                raise self._write_failure(error) from error


def _misfits(saved: dict[str, dict], target) -> str:
    """What differs between the arrays a checkpoint holds and those `target` needs, briefly; '' if nothing."""
    needed = {jax.tree_util.keystr(path): (list(x.shape), str(x.dtype))
              for path, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    have = {key: (leaf["shape"], leaf["dtype"]) for key, leaf in saved.items()}
    problems = [f"{key} missing" for key in needed if key not in have]
    problems += [f"{key} unexpected" for key in have if key not in needed]
    problems += [f"{key} is {have[key][0]} {have[key][1]}, needs {needed[key][0]} {needed[key][1]}"
                 for key in needed if key in have and have[key] != needed[key]]
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def _first_line(error: Exception) -> str:
    """The error's type and first line, without the TensorStore spec that orbax appends."""
    text = str(error).split(" See full TensorStore details")[0].strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]
