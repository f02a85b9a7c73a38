"""The README's first command, shortened (the SR demo trains, its ELBO falls, it writes its reports), and the
unconditional VDVAE's train / evaluate / sample modes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from configs import demo_vdvae
from vdvae_sr_jax import data

ROOT = Path(__file__).resolve().parents[1]


def test_sr_demo_trains_and_writes_outputs(tmp_path, subprocess_env):
    # From another directory, as after `pip install`: configs/demo.py is the installed configs package's. Without
    # JAX_PLATFORMS, as a user runs it: JAX probes for a TPU and logs that it found none.
    env = dict(subprocess_env, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("JAX_PLATFORMS")
    run = subprocess.run(
        [sys.executable, "-m", "vdvae_sr_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
         "--config.train.steps=20", "--config.train.log_every=5", "--config.train.steps_per_epoch=10",
         "--config.train.sample_every=20", "--config.data.eval_images=4"],
        cwd=tmp_path, check=True, capture_output=True, text=True, env=env,
    )
    # The console: the progress bar with the ELBO, no INFO lines from JAX or orbax's saves, the result once (stdout).
    assert "elbo=" in run.stderr and not re.search(r"I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", run.stderr)  # absl's INFO
    assert json.loads(run.stdout) == json.loads((tmp_path / "train_result.json").read_text())
    assert "first_logged_elbo" not in run.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.3
    assert {"rate_1", "rate_32", "grad_norm", "lr", "skipped_total", "images_per_second"} <= set(train_records[0])
    assert [r["step"] for r in records if "val_elbo" in r] == [10, 20]
    result = json.loads((tmp_path / "train_result.json").read_text())
    assert np.isfinite(result["val_elbo"]) and result["step"] == 20 and not result["stopped"]
    grid = np.asarray(Image.open(tmp_path / "samples_0000020.png"))  # 4 rows: LR | bicubic | 3 SR | HR, labelled
    side = 32 * 3  # 32-pixel images enlarged so that the labels fit
    header = grid.shape[0] - (4 * (side + 2) + 2)
    assert grid.shape[1:] == (6 * (side + 2) + 2, 3) and 10 < header < 60 and grid.std() > 5
    assert any((tmp_path / "tensorboard").iterdir())


def test_vdvae_evaluates_and_samples_its_checkpoint(tmp_path, subprocess_env):
    # The demo VDVAE's config with fewer blocks at 16x16: the modes are under test here, and compiling dominates.
    small = ["--config.model.image_size=16", "--config.model.enc_blocks=16x1,16d2,8x1,8d2,4x1,4d4,1x1",
             "--config.model.dec_blocks=1x1,4m1,8m4,8x1,16m8,16x1"]
    cache = tmp_path / "xla_cache"  # the config's compilation cache, in place of the test session's
    env = {k: v for k, v in subprocess_env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    common = [sys.executable, "-m", "vdvae_sr_jax.main", "--config=configs/demo_vdvae.py", f"--workdir={tmp_path}",
              "--config.train.steps=10", "--config.train.log_every=5", "--config.sample.num=4",
              f"--config.compilation_cache={cache}", *small]
    logs = {mode: subprocess.run(common + [f"--mode={mode}"], cwd=ROOT, check=True, capture_output=True, text=True,
                                 env=dict(env, JAX_LOG_COMPILES="1")).stderr
            for mode in ("train", "evaluate", "sample")}
    result = json.loads((tmp_path / "evaluate_result.json").read_text())
    assert 2 < result["bits_per_dim"] < 12 and result["n_images"] == 8  # all the embedded photos
    assert len(list(cache.iterdir())) >= 4  # at least init, the train step, the ELBO and a sampler
    assert "Persistent compilation cache hit" not in logs["train"]
    assert "Persistent compilation cache hit" in logs["evaluate"]  # training too unravelled the flat EMA params
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (4 * 18 + 2, 4 * 18 + 2, 3) and grid.std() > 5
    sampled = json.loads((tmp_path / "sample_result.json").read_text())
    assert sampled["injected_layers"] == [0, 1, 2, 4, 6]  # of 6 layers, then a row of the originals
    injection = np.asarray(Image.open(tmp_path / "latent_injection.png")).astype(float)
    assert injection.shape == (6 * 18 + 2, 4 * 18 + 2, 3)
    rows = [injection[2 + 18 * i : 18 * (i + 1), 2 : 18 * 4] for i in range(6)]
    originals = np.concatenate([np.pad(x, ((0, 0), (0, 2), (0, 0)), constant_values=255)
                                for x in data.validation_crops(demo_vdvae.get_config().data, 16, 4)], axis=1)
    np.testing.assert_array_equal(rows[5], originals[:, :-2])
    assert all(np.abs(rows[i] - rows[j]).mean() > 1 for i in range(5) for j in range(i))  # each k draws its own
