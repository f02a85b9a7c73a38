"""The README's first command, shortened: the demo trains, its ELBO falls, and it writes its outputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vdvae_sr_jax.checkpoint import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_and_writes_outputs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "vdvae_sr_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
         "--config.train.steps=40", "--config.train.log_every=10", "--config.sample.num=4"],
        cwd=ROOT, check=True, capture_output=True,
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    result = json.loads((tmp_path / "train_result.json").read_text())
    assert np.isfinite(result["bits_per_dim"]) and result["n_images"] == 4
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (4 * 34 + 2, 4 * 34 + 2, 3) and grid.std() > 5
    params, metadata = load_params(tmp_path / "model-40")
    assert metadata["ema"] and "decoder" in params
