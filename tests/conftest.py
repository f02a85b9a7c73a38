"""Shared fixtures: the reference data beside the repository, and highest-precision float32 maths."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

jax.config.update("jax_default_matmul_precision", "highest")

CACHE_ENV = "VDVAE_SR_TEST_JAX_CACHE"  # set by the controlling pytest process; its workers inherit it


def pytest_configure(config):
    """One persistent compilation cache for the whole run, its xdist workers and their subprocesses: many tests
    compile the same small models, and XLA:CPU compiles dominate the suite. A cached executable computes the same
    numbers."""
    if CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="vdvae_sr_jax_test_cache_")
        config.add_cleanup(lambda: shutil.rmtree(os.environ.pop(CACHE_ENV), ignore_errors=True))
    os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ[CACHE_ENV], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def reference_dir(name: str) -> Path:
    """A fixture folder under ../shared/reference, or a skip saying it is missing."""
    path = REFERENCE / name
    if not path.is_dir():
        pytest.skip(f"reference fixtures not found at {path}")
    return path


def load_reference(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(hparams.json, reference.npz) of one fixture folder."""
    path = reference_dir(name)
    hparams = json.loads((path / "hparams.json").read_text())
    with np.load(path / "reference.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return hparams, arrays


def assert_close(actual, expected, rtol=1e-4, what=""):
    """Max-abs error relative to the reference's max magnitude, the fixtures' stated tolerance."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for test subprocesses: the CPU, and the run's compilation cache (`pytest_configure`)."""
    return dict(os.environ, JAX_PLATFORMS="cpu")


def assert_posterior_matches(out: dict, ref: dict, n_layers: int) -> None:
    """A posterior pass given the fixture's noise against the fixture: z, KL, px_z, logits, distortion, rate, ELBO."""
    for i in range(n_layers):
        assert_close(out["z"][i], ref[f"z_{i:03d}"], 1e-5, f"z_{i}")
    assert_close(out["kl"], ref["kl"], 1e-4, "kl")
    assert_close(out["px_z"], ref["px_z"], 1e-4, "px_z")
    assert_close(out["logits"], ref["dmol_logits"], 1e-4, "dmol_logits")
    for key in ("distortion", "rate", "elbo"):
        assert_close(out[key], ref[key], 1e-4, key)
