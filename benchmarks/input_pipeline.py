"""The training input pipeline: images/s of both preprocessings from 2K PNGs against the number of grain worker
processes, peak host memory of reading a folder of 2K images the old way (every image decoded into a list) and
with the pipeline, and the demo's share of step time spent waiting for data, as JSON and a Markdown table.

The 2K PNGs (2040x1356, DIV2K's size) are the embedded photos enlarged and cropped, copied to `--images` files.
`--demo_before` names a source tree of the code before the pipeline (e.g. `git archive bce4afc | tar -x -C DIR`);
both demos run in subprocesses with their batch iterator timed the same way.

    python -m benchmarks.input_pipeline --images=800 --demo_before=/tmp/before --output=input_pipeline.json
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags
from PIL import Image
from tqdm import tqdm

_IMAGES = flags.DEFINE_integer("images", 800, "2K PNGs in the folder read for the memory comparison.")
_FOLDER = flags.DEFINE_string("folder", "", "Where to write the PNGs (kept); default: a temporary folder.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2", "4"], "Worker process counts to measure.")
_SIZE = flags.DEFINE_integer("size", 256, "HR crop size (sr256's); the LR input is a quarter of it.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per batch.")
_BATCHES = flags.DEFINE_integer("batches", 6, "Timed batches per worker (at least one worker's worth), after as many.")
_MEMORY_STEPS = flags.DEFINE_integer("memory_steps", 20, "Batches the pipeline reads in the memory measurement.")
_DEMO_STEPS = flags.DEFINE_integer("demo_steps", 60, "Demo training steps, the first 10 (compiling) not counted; 0 "
                                   "skips the demo.")
_DEMO_BEFORE = flags.DEFINE_string("demo_before", "", "Source tree of the code before the pipeline; empty: skip.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the results to this JSON file.")
_CHILD = flags.DEFINE_enum("child", "", ["", "old", "new"], "Internal: one memory measurement in this process.")

WIDTH, HEIGHT = 2040, 1356


def make_folder(folder: Path, n: int) -> Path:
    """`n` 2K PNGs: the 8 embedded photos enlarged to cover 2040x1356 (bicubic) and centre-cropped, then copied."""
    from vdvae_sr_jax import data

    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for i, (_, photo) in enumerate(data.embedded_photos()):
        s = max(WIDTH / photo.shape[1], HEIGHT / photo.shape[0])
        big = Image.fromarray(photo).resize((round(photo.shape[1] * s), round(photo.shape[0] * s)), Image.BICUBIC)
        left, top = (big.width - WIDTH) // 2, (big.height - HEIGHT) // 2
        bases.append(folder / f"base_{i}.png")
        big.crop((left, top, left + WIDTH, top + HEIGHT)).save(bases[-1])
    for i in tqdm(range(n), desc="2K PNGs"):
        shutil.copyfile(bases[i % len(bases)], folder / f"img_{i:04d}.png")
    for base in bases:
        base.unlink()
    return folder


def _rows(folder: Path, preprocess: str):
    from vdvae_sr_jax import data, pipeline

    norm = pipeline.Normalisation(pixel_max=255.0, shift=-115.9, scale=0.0144, shift_loss=-127.5,
                                  scale_loss=1 / 127.5, downscale="matlab")
    return pipeline.Rows(data.folder_source(folder), _SIZE.value, preprocess, _BATCH.value, 1, 0, norm, False, 4,
                         False)


def throughput(folder: Path, preprocess: str, workers: int) -> float:
    """Images/s of the pipeline in its steady state: over the second half of 2 * `--batches` * max(workers, 1)
    batches, by when the batches its workers and threads had made ahead are used up."""
    from vdvae_sr_jax import pipeline

    n = 2 * _BATCHES.value * max(workers, 1)
    iterator = pipeline.local_batches(_rows(folder, preprocess), n, 0, workers)
    for _ in range(n // 2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(n - n // 2):
        next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    return (n - n // 2) * _BATCH.value / seconds


def memory_child(folder: Path, way: str) -> dict:
    """Peak resident memory (MiB) of this process, and of its largest worker, after reading `folder` `way`."""
    from vdvae_sr_jax import data, pipeline

    start = time.perf_counter()
    if way == "old":
        images = data.folder_images(folder, _SIZE.value)
        count = len(images)
    else:
        iterator = pipeline.local_batches(_rows(folder, "crops"), _MEMORY_STEPS.value, 0, pipeline.DEFAULT_WORKERS)
        count = sum(len(next(iterator)["input"]) for _ in range(_MEMORY_STEPS.value))
        iterator.close()
    return {"seconds": time.perf_counter() - start, "images": count,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def memory(folder: Path, way: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", f"--child={way}",
                           f"--folder={folder}", f"--size={_SIZE.value}", f"--batch={_BATCH.value}",
                           f"--memory_steps={_MEMORY_STEPS.value}"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# Runs the demo with its batch iterator timed: `next` on the prefetch generator before the pipeline, on
# pipeline.Batches after. Prints the share of the time from step SKIP's batch on spent waiting for batches.
DEMO = """
import json, sys, tempfile, time
from pathlib import Path
from configs.demo import get_config
from vdvae_sr_jax import trainer
steps, skip = int(sys.argv[1]), 10
times = []
def timed(next_fn):
    def wrapped(*args):
        start = time.perf_counter()
        item = next_fn(*args)
        times.append((start, time.perf_counter()))
        return item
    return wrapped
if hasattr(trainer, "prefetch"):
    original = trainer.prefetch
    def prefetch(items):
        it = original(items)
        get = timed(lambda: next(it))
        while True:
            yield get()
    trainer.prefetch = prefetch
else:
    trainer.pipeline.Batches.__next__ = timed(trainer.pipeline.Batches.__next__)
config = get_config()
config.train.update(steps=steps, sample_every=0, steps_per_epoch=10**6, checkpoint_every=10**6, log_every=10)
if len(sys.argv) > 2:
    config.data.workers = int(sys.argv[2])
trainer.run(config, Path(tempfile.mkdtemp()))
waits = sum(end - start for start, end in times[skip:])
print(json.dumps({"data_wait_share": waits / (times[-1][1] - times[skip - 1][1]),
                  "step_ms": 1000 * (times[-1][1] - times[skip - 1][1]) / (len(times) - skip)}))
"""


def demo(source: Path, workers: int | None) -> dict:
    args = [sys.executable, "-c", DEMO, str(_DEMO_STEPS.value)] + ([] if workers is None else [str(workers)])
    done = subprocess.run(args, capture_output=True, text=True, cwd=source, check=False,
                          env={**os.environ, "PYTHONPATH": str(source), "JAX_PLATFORMS": "cpu"})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv) -> None:
    del argv
    if _CHILD.value:
        print(json.dumps(memory_child(Path(_FOLDER.value), _CHILD.value)))
        return
    folder = Path(_FOLDER.value) if _FOLDER.value else Path(tempfile.mkdtemp(prefix="pngs_2k_"))
    if not any(folder.glob("img_*.png")):
        make_folder(folder, _IMAGES.value)
    results = {"folder": str(folder), "images": len(list(folder.glob("img_*.png"))), "throughput": {}}
    for preprocess in ("crops", "thesis"):
        for workers in map(int, _WORKERS.value):
            rate = throughput(folder, preprocess, workers)
            results["throughput"][f"{preprocess}/{workers}"] = rate
            print(f"{preprocess}, {workers} workers: {rate:.1f} images/s", flush=True)
    results["memory"] = {way: memory(folder, way) for way in ("old", "new")}
    print(json.dumps(results["memory"]), flush=True)
    results["demo"] = {}
    if _DEMO_STEPS.value:
        if _DEMO_BEFORE.value:
            results["demo"]["before"] = demo(Path(_DEMO_BEFORE.value), None)
        root = Path(__file__).resolve().parents[1]
        results["demo"] |= {"after, 0 workers": demo(root, 0), "after, 1 worker": demo(root, 1)}
        print(json.dumps(results["demo"]), flush=True)
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(results, indent=1))
    print(table(results))
    if not _FOLDER.value:
        shutil.rmtree(folder)


def table(results: dict) -> str:
    workers = sorted({int(k.split("/")[1]) for k in results["throughput"]})
    lines = ["| images/s | " + " | ".join(f"{w} workers" for w in workers) + " |",
             "|---|" + "---|" * len(workers)]
    for preprocess in ("crops", "thesis"):
        lines.append(f"| {preprocess} | " + " | ".join(f"{results['throughput'][f'{preprocess}/{w}']:.1f}"
                                                     for w in workers) + " |")
    mem = results["memory"]
    lines += ["", "| reading the folder | images | seconds | peak MiB (main) | peak MiB (largest worker) |",
              "|---|---|---|---|---|"]
    lines += [f"| {way} | {m['images']} | {m['seconds']:.1f} | {m['peak_mib']:.0f} | {m['worker_peak_mib']:.0f} |"
              for way, m in mem.items()]
    lines += ["", "| demo | data-wait share | step (ms) |", "|---|---|---|"]
    lines += [f"| {name} | {d['data_wait_share']:.3f} | {d['step_ms']:.0f} |" for name, d in results["demo"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
