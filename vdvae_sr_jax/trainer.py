"""The training loop for VDVAE and VDVAE-SR: a device mesh, one sharded jitted step, checkpoints and reports.

The batch is split over a `data` mesh axis spanning every device of every host; params, EMA and
optimiser state are replicated. The same code runs on one CPU, 8 GPUs or a TPU pod slice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from vdvae_sr_jax import adversarial, checkpoint, data, distributed, evaluate, figures, perceptual, pipeline, train
from vdvae_sr_jax.hparams import parse_layer_string
from vdvae_sr_jax.model import VDVAESR, init_params, model_from_config


def initial_params(config, model):
    """Official init, then the converted HR model and LR encoder that `config.init` names, if any, or the whole
    VDVAE-SR of `init.sr_checkpoint`."""
    sr_path = config.init.get("sr_checkpoint", "")
    if sr_path:
        return _trained_sr_params(config, model, Path(sr_path).expanduser())
    params = init_params(model, jax.random.key(config.train.seed))
    hr_path, lr_path = config.init.get("hr_checkpoint", ""), config.init.get("lr_encoder_checkpoint", "")
    if hr_path:
        hr_params, _ = _load(hr_path, "the HR VDVAE", config.init.hr_hint)
        for part in ("encoder", "decoder"):
            params = checkpoint.graft(params, hr_params[part], part, hr_path)
    if lr_path:
        lr_params, _ = _load(lr_path, "the LR encoder", config.init.lr_hint)
        params = checkpoint.graft(params, lr_params["encoder"], "lr_encoder", lr_path)
    return params


def _load(path: str, what: str, hint: str):
    try:
        return checkpoint.load_params(path)
    except FileNotFoundError:
        raise SystemExit(f"no checkpoint of {what} at {path}: {hint}") from None


def _trained_sr_params(config, model, path: Path):
    """All params of a trained VDVAE-SR: the newest EMA params of a training workdir of a run without a
    discriminator (its frozen params from this config's converted HR model), or an exported model."""
    if (path / "checkpoints").is_dir():
        sr_config = config.copy_and_resolve_references()
        sr_config.init.sr_checkpoint, sr_config.train.adversarial_weight = "", 0.0
        try:
            params = latest_ema_params(sr_config, model, path)
        except checkpoint.CheckpointError as error:
            raise SystemExit(f"init.sr_checkpoint={path} is not a run of this config's VDVAE-SR (the same model and "
                             f"train.frozen, without a discriminator): {error}") from None
        if params is None:
            raise SystemExit(f"init.sr_checkpoint={path}: the workdir has no usable checkpoint")
        return params
    params, _ = _load(str(path), "the VDVAE-SR of init.sr_checkpoint",
                      "train that run first (for configs/demo_gan.py, the README's first command), or give a "
                      "training workdir or an exported VDVAE-SR model")
    initial = init_params(model, jax.random.key(config.train.seed))
    missing = set(flax.traverse_util.flatten_dict(initial)) - set(flax.traverse_util.flatten_dict(params))
    if missing:
        raise SystemExit(f"init.sr_checkpoint={path} is not a whole VDVAE-SR of this config: it lacks "
                         f"{len(missing)} params, e.g. {'/'.join(sorted(missing)[0])}")
    return checkpoint.graft(initial, params, None, str(path))


def training_objective(config, model) -> tuple:
    """(loss_fn, critics, adversary): the ELBO plus the terms whose `config.train.*_weight` is set (VDVAE-SR
    only), the LPIPS weights the perceptual term reads, and the discriminator of adversarial fine-tuning."""
    cfg = config.train
    weight = {term: cfg.get(f"{term}_weight", 0.0) if isinstance(model, VDVAESR) else 0.0
              for term in ("lr_consistency", "perceptual", "adversarial")}
    critics = None
    if weight["perceptual"]:
        critics = {"lpips": perceptual.load_lpips(cfg.perceptual_net.removeprefix("lpips_"))}
    adversary = _adversary(config, model)
    loss_fn = train.elbo_loss(model, weight["lr_consistency"], weight["perceptual"], weight["adversarial"], adversary)
    return loss_fn, critics, adversary


def _adversary(config, model) -> adversarial.Adversary | None:
    """The discriminator of a VDVAE-SR config with `train.adversarial_weight` set, else None."""
    on = isinstance(model, VDVAESR) and config.train.get("adversarial_weight", 0.0)
    return adversarial.adversary_from_config(config.train) if on else None


def new_state(config, model, trainable, tx, adversary) -> train.TrainState:
    """A fresh training state for `trainable` params, with a fresh discriminator when there is an adversary."""
    state = train.init_state(trainable, tx, jax.random.key(config.train.seed + 1))
    if adversary is None:
        return state
    disc = adversary.init((model.image_size, model.image_size, 3), jax.random.key(config.train.seed + 2))
    return state.replace(disc=disc)


def abstract_state(config, model):
    """Shapes of the training state of `config` and its frozen params, without computing anything."""
    trainable, frozen = train.split_params(jax.eval_shape(lambda: init_params(model)), config.train.frozen)
    tx = train.make_optimizer(config.train)
    return jax.eval_shape(lambda p: new_state(config, model, p, tx, _adversary(config, model)), trainable), frozen


def latest_ema_params(config, model, workdir: Path):
    """EMA params (frozen ones included) of the newest checkpoint under `workdir`, or None if there is none."""
    ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints", config.train.keep_checkpoints)
    state = ckpts.restore_latest(abstract_state(config, model)[0])
    ckpts.close()
    if state is None:
        return None
    if not config.train.frozen:
        return state.ema_params
    own_init = config.copy_and_resolve_references()
    if own_init.init.get("sr_checkpoint"):  # frozen params never train: a fine-tuned run's are its parent's, as here
        own_init.init.sr_checkpoint = ""
    _, frozen = train.split_params(initial_params(own_init, model), config.train.frozen)
    return train.merge_params(state.ema_params, frozen)


def per_resolution_rate(kl_per_layer: np.ndarray, dec_blocks: str, n_dims: int) -> dict[str, float]:
    """The rate (nats/dim) contributed by each resolution, from the mean KL per layer."""
    rates: dict[str, float] = {}
    for (res, _), kl in zip(parse_layer_string(dec_blocks), kl_per_layer):
        rates[f"rate_{res}"] = rates.get(f"rate_{res}", 0.0) + float(kl) / n_dims
    return rates


class _Reporter:
    """Writes metrics to JSONL and TensorBoard (tensorboardX, no TensorFlow needed); `_Silent` on processes other
    than 0."""

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self.jsonl = (workdir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, record: dict) -> None:
        """One JSONL line, where a non-finite value is null (JSON has no NaN or infinity), and the TensorBoard
        scalars."""
        line = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.jsonl.write(json.dumps({"step": step, **line}, allow_nan=False) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


class _Silent:
    """The reporter of a process other than 0: writes nothing."""

    def write(self, step: int, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def run(config, workdir: Path) -> dict:
    """Trains (resuming from `workdir` if it holds checkpoints) and returns the final validation result."""
    model = model_from_config(config)
    is_sr = isinstance(model, VDVAESR)
    lr_factor = model.image_size // model.lr_image_size if is_sr else None
    cfg, size = config.train, model.image_size
    n_dev = jax.device_count()
    batch_size = cfg.batch_size_per_device * n_dev

    # Devices in process order: process p holds rows [p * B / P, (p + 1) * B / P) of each global batch of B.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    trainable, frozen = train.split_params(initial_params(config, model), cfg.frozen)
    tx = train.make_optimizer(cfg)
    loss_fn, critics, adversary = training_objective(config, model)
    state = jax.device_put(new_state(config, model, trainable, tx, adversary), replicated)
    frozen = jax.device_put(frozen, replicated)
    lr_target = is_sr and cfg.get("lr_consistency_weight", 0.0) > 0
    batches = pipeline.training_batches(config, size, model.low_bit, lr_factor, batch_sharding, lr_target)
    ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints", cfg.keep_checkpoints)
    restored = ckpts.restore_latest(state, set_aside=workdir / "rejected_checkpoints", data_iterator=batches.iterator)
    if restored is not None:
        state = restored
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    batches.resume(int(state.step))

    critics = jax.device_put(critics, replicated)
    step_fn = jax.jit(
        partial(train.train_step, loss_fn=loss_fn, tx=tx, train=cfg, adversary=adversary),
        in_shardings=(replicated, batch_sharding, replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    val_hr = data.validation_crops(config.data, size, config.data.eval_images)
    n_dims = size * size * 3

    def global_batch(hr_uint8, lr_target=False):
        local = data.model_batch(hr_uint8, config.data, model.low_bit, lr_factor, lr_target)
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

    forward_model = model.clone(scan_unroll=1)  # evaluation and sampling: the rolled loop compiles fastest

    def validate(ema_params) -> float:
        params = train.merge_params(ema_params, frozen)
        return evaluate.mean_elbo(forward_model, params, global_batch, val_hr, n_dev, cfg.seed)

    stop = distributed.SigtermStop()
    reporter = _Reporter(workdir) if distributed.is_main_process() else _Silent()
    start_step, val_elbo = int(state.step), None
    watch = SkipWatch(cfg.skip_threshold, cfg.skip_warning_steps, int(state.skipped))
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=jax.process_index() > 0)
    try:
        log = _TrainLog(reporter, watch, bar, start_step, batch_size, model.dec_blocks, n_dims, batches)
        for step in range(start_step + 1, cfg.steps + 1):
            state, metrics = step_fn(state, next(batches), frozen, critics)
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.add(step, metrics)
            saved = True
            if step % cfg.steps_per_epoch == 0 or step == cfg.steps:
                log.flush()
                val_elbo = validate(state.ema_params)
                reporter.write(step, {"val_elbo": val_elbo})
                ckpts.save(step, state, val_elbo, batches.iterator)
            elif step % cfg.checkpoint_every == 0:
                log.flush()
                ckpts.save(step, state, data_iterator=batches.iterator)
            else:
                saved = False
            if is_sr and cfg.sample_every and step % cfg.sample_every == 0:
                write_sr_samples(config, forward_model, train.merge_params(state.ema_params, frozen), val_hr,
                                 workdir / f"samples_{step:07d}.png")
            if stop(step):
                log.flush()
                if not saved:
                    saved = ckpts.save(step, state, data_iterator=batches.iterator)
                logging.warning("stopped by signal %d at step %d; %s", stop.signal, step,
                                "a checkpoint was saved" if saved else "the state held NaN or inf and was not saved")
                break
        bar.close()
    except BaseException:
        # The error that stopped training is the one to report, on a line of its own below the progress bar.
        _close_quietly(bar, batches, ckpts, reporter)
        raise
    else:
        batches.close()
        ckpts.close()
        reporter.close()
    finally:
        stop.close()
    return {"step": int(state.step), "val_elbo": val_elbo, "first_logged_elbo": log.first_elbo,
            "last_logged_elbo": log.last_elbo, "skipped_updates": int(state.skipped),
            "stopped": stop.signal is not None, "data_wait_share": log.data_wait_share()}


def _close_quietly(*resources) -> None:
    """Closes each of `resources`, logging rather than raising what fails (on a full disk, every write does)."""
    for resource in resources:
        try:
            resource.close()
        except Exception as error:  # noqa: BLE001 - secondary to the error being raised
            logging.debug("closing %s failed: %s", type(resource).__name__, error)


class _TrainLog:
    """Training records written one log interval late: the loop hands over a step's metrics still on the device
    and waits for them only when it logs the next step or saves a checkpoint, by when they are long computed."""

    def __init__(self, reporter: _Reporter, watch: SkipWatch, bar, step: int, batch_size: int, dec_blocks: str,
                 n_dims: int, batches: pipeline.Batches):
        self.reporter, self.watch, self.bar = reporter, watch, bar
        self.batch_size, self.dec_blocks, self.n_dims, self.batches = batch_size, dec_blocks, n_dims, batches
        self.pending = None
        self.step, self.time, self.waited = step, time.perf_counter(), batches.wait_seconds
        self.start_time = self.time
        self.first_elbo = self.last_elbo = None

    def add(self, step: int, metrics: dict) -> None:
        """Writes the pending record, then starts copying the metrics of `step` to the host."""
        self.flush()
        for value in jax.tree_util.tree_leaves(metrics):
            value.copy_to_host_async()
        self.pending = step, metrics

    def flush(self) -> None:
        """Waits for the pending metrics, if any, and writes their record; step time is the time between the
        records' arrivals over the steps between them."""
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        fetched = jax.device_get(metrics)
        steps, now, waited = step - self.step, time.perf_counter(), self.batches.wait_seconds
        seconds, data_wait_share = (now - self.time) / steps, (waited - self.waited) / (now - self.time)
        self.step, self.time, self.waited = step, now, waited
        counts = ("skipped_total", "disc_skipped_total")
        record = {k: float(v) for k, v in fetched.items() if k not in ("kl_per_layer", *counts)}
        record.update(per_resolution_rate(fetched["kl_per_layer"], self.dec_blocks, self.n_dims))
        record.update({k: int(fetched[k]) for k in counts if k in fetched})
        record.update(step_seconds=seconds, images_per_second=self.batch_size / seconds,
                      data_wait_share=data_wait_share)
        self.reporter.write(step, record)
        elbo = record.get("elbo", record["loss"])  # the loss is the ELBO unless an added term is on
        self.first_elbo = elbo if self.first_elbo is None else self.first_elbo
        self.last_elbo = elbo
        self.bar.set_postfix(elbo=f"{elbo:.3f}", skipped=record["skipped_total"])
        self.watch.update(record["skipped_total"], steps, record["grad_norm"])

    def data_wait_share(self) -> float:
        """The share of the time since training started spent waiting for batches."""
        return self.batches.wait_seconds / max(time.perf_counter() - self.start_time, 1e-9)


class SkipWatch:
    """Warns after `limit` consecutive skipped updates: upstream runs have stalled for good this way."""

    def __init__(self, threshold: float, limit: int, skipped: int):
        self.threshold, self.limit, self.skipped = threshold, limit, skipped
        self.in_a_row, self.norms = 0, []

    def update(self, skipped_total: int, steps: int, grad_norm: float) -> None:
        """Feeds the skip counter after `steps` more steps, and the latest measured gradient norm."""
        all_skipped = skipped_total - self.skipped == steps
        self.skipped = skipped_total
        if not all_skipped:
            self.in_a_row, self.norms = 0, []
            return
        self.in_a_row += steps
        self.norms.append(round(grad_norm, 1))
        if self.in_a_row >= self.limit:
            logging.warning(
                "the last %d updates were all skipped (gradient norms %s, skip_threshold=%s): if this persists, "
                "raise --config.train.skip_threshold", self.in_a_row, self.norms[-5:], self.threshold)
            self.in_a_row, self.norms = 0, []


def write_sr_samples(config, model, params, hr_uint8: np.ndarray, path: Path) -> Path:
    """A PNG with one row per image: LR (nearest x4) | bicubic | SR at each temperature | HR; the SR pixels are
    decoded as `config.upscale.decode` says."""
    from vdvae_sr_jax.resize import bicubic_upscale

    factor = model.image_size // model.lr_image_size
    lr = data.downscale(hr_uint8, factor, config.data.downscale)
    lr_input = data.normalize(lr, config.data)[0]
    columns = [np.repeat(np.repeat(lr, factor, 1), factor, 2), bicubic_upscale(lr, factor)]
    for t in config.sample.temperatures:
        columns.append(np.asarray(evaluate.sr_sample(model, params, lr_input, jnp.float32(t),
                                                     jax.random.key(config.train.seed), config.upscale.decode)))
    columns.append(hr_uint8)
    labels = ["LR", "bicubic", *(f"t={t:g} {config.upscale.decode}" for t in config.sample.temperatures), "HR"]
    if not distributed.is_main_process():  # every process takes part in sampling, process 0 writes the grid
        return path
    return figures.save_grid(path, [np.stack(row) for row in zip(*columns)], labels=labels)
