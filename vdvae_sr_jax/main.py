"""Command line: train, evaluate or sample a VDVAE or VDVAE-SR from an ml_collections config.

    python -m vdvae_sr_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m vdvae_sr_jax.main --config=configs/sr64.py --workdir=runs/sr64 --config.train.batch_size_per_device=8
    python -m vdvae_sr_jax.main --config=configs/vdvae_imagenet64.py --config.checkpoint=checkpoints/imagenet64 \
        --mode=evaluate --config.data.source=folder --config.data.folder=/data/imagenet64/val

    python -m vdvae_sr_jax.main --config=configs/sr64.py --workdir=runs/sr64 --mode=upscale \
        --input="photos/*.jpg" --output=photos_x4 --config.upscale.temperature=0.3

    python -m vdvae_sr_jax.main --config=configs/sr64.py --workdir=/shared/runs/sr64 \
        --coordinator_address=host0:8476 --num_processes=2 --process_id=0    # and --process_id=1 on the other host

Rerunning `train` with the same workdir resumes from its latest checkpoint. `evaluate`, `sample` and
`upscale` use the newest checkpoint in the workdir, else `config.checkpoint` (a converted model).
A `--config=configs/<name>.py` that the working directory lacks is the installed project's config of that name,
so these commands also run from other directories after `pip install`. `--library_logs` shows JAX's INFO logs
and orbax's logs. An error is one line; VDVAE_SR_TRACEBACK=1 shows its traceback. In a multi-process run (all
processes see the same workdir) process 0 alone writes the logs, sample grids and result files.
"""

from __future__ import annotations

from vdvae_sr_jax import huge_pages

if __name__ == "__main__":
    huge_pages.restart_with_huge_pages()  # first: glibc reads its tunables only when a process starts

import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdvae_sr_jax import checkpoint, cli, config_check, data, distributed, evaluate, figures, sr_eval, trainer, upscale
from vdvae_sr_jax.model import VDVAESR, model_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "An ml_collections config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and samples go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "sample", "upscale"], "What to run.")
_INPUT = flags.DEFINE_string("input", None, "upscale: an image file, a folder or a glob pattern.")
_OUTPUT = flags.DEFINE_string("output", None, "upscale: the folder for the outputs (never overwrites an input).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run whose processes JAX finds in the "
                                  "environment (SLURM, Open MPI, a Cloud TPU pod slice).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "A manual multi-process launch: HOST:PORT of process "
                                   "0, which listens there; every process gives the same one.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "A manual multi-process launch: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "A manual multi-process launch: this process's index, "
                                   "0 .. num_processes - 1.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "Multi-process runs: seconds after which a process that "
                                  "stopped answering (killed, host down) makes JAX terminate the others.",
                                  lower_bound=1)


def use_compilation_cache(path: str) -> None:
    """Keeps compiled programs in `path` across runs (the least recently used go beyond 4 GiB), unless
    JAX_COMPILATION_CACHE_DIR names another place. JAX needs `filelock` for the size limit and, lacking it,
    turns the whole cache off with no more than a log line: without it the cache here just has no limit."""
    if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        if importlib.util.find_spec("filelock") is not None:
            jax.config.update("jax_compilation_cache_max_size", 4 * 2**30)
        else:
            logging.warning("filelock is not installed: the compilation cache in %s grows without a limit", path)


def trained_params(config, model, workdir: Path):
    """EMA params of the newest training checkpoint in `workdir`, else those of `config.checkpoint`."""
    if (workdir / "checkpoints").is_dir():
        params = trainer.latest_ema_params(config, model, workdir)
        if params is not None:
            return params
    if not config.checkpoint:
        raise SystemExit(f"nothing to {_MODE.value}: {workdir} has no training checkpoint and config.checkpoint "
                         "is empty; train first, or convert an official model with `python -m convert.vdvae`")
    return checkpoint.load_params(config.checkpoint)[0]


def evaluation_images(config) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 HR image) of the validation images, the first `evaluate.max_images` of them if that is set
    (the rest are not decoded)."""
    return data.load_images(config.data, config.model.image_size, split="validation",
                            limit=config.evaluate.max_images or None)


def evaluate_model(config, model, params, workdir: Path) -> dict:
    """A VDVAE-SR: the SR benchmark tables. A VDVAE: the bits per dim of the validation images."""
    images = evaluation_images(config)
    if isinstance(model, VDVAESR):
        return sr_eval.evaluate_sr(config, model, params, images, workdir / "evaluation")
    crops = np.stack([data.center_crop(im, model.image_size) for _, im in images])
    batch = config.train.batch_size_per_device
    return evaluate.bits_per_dim(model, params, [crops[i : i + batch] for i in range(0, len(crops), batch)],
                                 config.data)


def sample_model(config, model, params, workdir: Path) -> dict:
    """A VDVAE-SR: LR | bicubic | SR | HR rows. A VDVAE: prior samples per temperature, and latent injection."""
    hr = data.validation_crops(config.data, model.image_size, config.data.eval_images)
    if isinstance(model, VDVAESR):
        return {"samples": str(trainer.write_sr_samples(config, model, params, hr, workdir / "samples.png"))}
    rows = evaluate.temperature_grid(model, params, config.sample.temperatures, config.sample.num, config.train.seed)
    figures.save_grid(workdir / "samples.png", rows)
    counts = evaluate.injection_layer_counts(model.n_layers, config.sample.injection_rows)
    rows = evaluate.latent_injection_grid(model, params, hr, config.data, counts, config.sample.temperatures[-1],
                                          config.train.seed)
    figures.save_grid(workdir / "latent_injection.png", rows)
    return {"samples": str(workdir / "samples.png"), "latent_injection": str(workdir / "latent_injection.png"),
            "injected_layers": counts}


def upscale_images(config, model, params) -> dict:
    """Super-resolves `--input` into `--output`."""
    if not _INPUT.value or not _OUTPUT.value:
        raise SystemExit("--mode=upscale needs --input (a file, folder or glob) and --output (a folder)")
    upscaler = upscale.Upscaler(model, params, config.data, upscale.Settings.from_config(config.upscale))
    return upscale.upscale_files(upscaler, _INPUT.value, _OUTPUT.value)


def finite_or_null(value):
    """`value` with every NaN or infinity inside it replaced by None, so that it is valid JSON (an exactly
    consistent output's LR-PSNR is infinite)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


@cli.one_line_errors
def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value)
    if _MODE.value != "train" and jax.process_count() > 1:
        raise SystemExit(f"--mode={_MODE.value} runs in one process: launch it without --distributed or the "
                         "coordinator flags (multi-process runs are for training)")
    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    config_check.validate(config)
    workdir.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(config.compilation_cache)
    model = model_from_config(config)
    if _MODE.value == "train":
        result = trainer.run(config, workdir)
    else:
        forward_model = model.clone(scan_unroll=1)  # evaluation and sampling: the rolled loop compiles fastest
        params = trained_params(config, model, workdir)
        run_mode = {"evaluate": evaluate_model, "sample": sample_model}.get(_MODE.value)
        if run_mode is not None:
            result = run_mode(config, forward_model, params, workdir)
        else:
            result = upscale_images(config, forward_model, params)
    if distributed.is_main_process():
        text = json.dumps(finite_or_null(result), indent=1, allow_nan=False)
        (workdir / f"{_MODE.value}_result.json").write_text(text)
        print(text)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(distributed.leave_at_once(main), flags_parser=cli.parse_flags)
