"""Orbax checkpoints: exported models (params plus a JSON record of their config) and training states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


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


def graft(params, loaded, at: str, source: str):
    """`params` with the subtree `at` replaced, leaf by leaf, by `loaded` (a subset of it); shapes must agree."""
    flat = flax.traverse_util.flatten_dict(params)
    errors = []
    for path, value in flax.traverse_util.flatten_dict(loaded).items():
        target = (at, *path)
        if target not in flat:
            errors.append(f"{'/'.join(path)} is not a parameter of {at}")
        elif flat[target].shape != value.shape:
            errors.append(f"{'/'.join(path)} has shape {value.shape}, {at} needs {flat[target].shape}")
        else:
            flat[target] = value
    if errors:
        raise ValueError(f"{source} does not fit {at}:\n  " + "\n  ".join(errors))
    return flax.traverse_util.unflatten_dict(flat)


class TrainCheckpoints:
    """Training checkpoints: the last `keep` steps and the best by validation ELBO, written asynchronously."""

    def __init__(self, directory: str | Path, keep: int):
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_elbo"], reverse=True, n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def save(self, step: int, state, val_elbo: float | None = None) -> None:
        metrics = None if val_elbo is None else {"val_elbo": float(val_elbo)}
        self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

    def restore_latest(self, abstract_state):
        """The newest saved state, placed like `abstract_state` (arrays or ShapeDtypeStructs); None if none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except ValueError as error:
            raise ValueError(
                f"the checkpoint at {self.manager.directory / str(step)} does not fit this config's training state "
                f"(another model, or written by an older version of this project); use a new --workdir: {error}"
            ) from error

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
