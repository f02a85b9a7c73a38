"""Model checkpoints with orbax: a params tree plus a JSON record of what model they belong to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
