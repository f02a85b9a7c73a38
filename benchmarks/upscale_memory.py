"""Peak host memory and wall time of upscaling one generated LR image from a file, with the demo VDVAE-SR
(freshly initialised: the memory and the time do not depend on the weights), as one JSON line.

    python -m benchmarks.upscale_memory --width=1500 --height=1000

The peak is the process's maximum resident set size; `baseline_mib` is that peak after importing JAX, building the
model and compiling its tile sampler on a small image, so `peak_mib - baseline_mib` is what the large image adds.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from configs.demo import get_config
from vdvae_sr_jax import upscale
from vdvae_sr_jax.model import init_params, model_from_config

_WIDTH = flags.DEFINE_integer("width", 1500, "Width of the LR image, pixels.")
_HEIGHT = flags.DEFINE_integer("height", 1000, "Height of the LR image, pixels.")
_BATCH = flags.DEFINE_integer("batch_per_device", 8, "Tiles per device per batch (config.upscale.batch_per_device).")
_OVERLAP = flags.DEFINE_integer("overlap", 2, "Tile overlap in LR pixels (config.upscale.overlap).")
_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per image (config.upscale.num_samples).")


def peak_mib() -> float:
    """The process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generated_image(height: int, width: int) -> np.ndarray:
    """A smooth colour gradient with noise: an RGB uint8 image that PNG cannot compress to almost nothing."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 12, (height, width, 3)).astype(np.float32)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin((x + y) / 50)], axis=-1) + noise
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def main(argv) -> None:
    del argv
    config = get_config()
    model = model_from_config(config)
    settings = upscale.Settings(overlap=_OVERLAP.value, batch_per_device=_BATCH.value, num_samples=_SAMPLES.value)
    upscaler = upscale.Upscaler(model, init_params(model), config.data, settings)
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small", Path(tmp) / "large"
        small.mkdir()
        large.mkdir()
        Image.fromarray(generated_image(20, 30)).save(small / "warmup.png")
        upscale.upscale_files(upscaler, str(small), Path(tmp) / "out_small")
        Image.fromarray(generated_image(_HEIGHT.value, _WIDTH.value)).save(large / "image.png")
        baseline = peak_mib()
        start = time.perf_counter()
        result = upscale.upscale_files(upscaler, str(large), Path(tmp) / "out")
        seconds = time.perf_counter() - start
    report = {"width": _WIDTH.value, "height": _HEIGHT.value, "batch_per_device": _BATCH.value,
              "overlap": _OVERLAP.value, "num_samples": _SAMPLES.value,
              "tiles": upscaler.n_tiles(_HEIGHT.value, _WIDTH.value), "images": result["images"],
              "seconds": round(seconds, 1), "baseline_mib": round(baseline), "peak_mib": round(peak_mib())}
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
