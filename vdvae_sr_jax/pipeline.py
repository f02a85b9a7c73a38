"""The training input pipeline on grain: images read when a batch needs them, cropped, normalised and downscaled in
worker processes, and a checkpointable iterator.

Row r of global batch k (B rows) is drawn with an RNG seeded by (seed, k, r): which image, the crop and the flip.
Process p of P computes rows [p * B / P, (p + 1) * B / P) only, so a batch is the same for any number of processes
and of workers, and resuming at step s yields batches s, s + 1, ... as a straight run does. An image that cannot be
read is skipped (logged once by name) and the row draws again from its RNG.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import grain
import jax
import numpy as np
from absl import flags

from vdvae_sr_jax import data, image_io

# Worker processes preparing batches where a config lacks data.workers: one leaves the other core of a 2-core CPU to
# the training step.
DEFAULT_WORKERS = 1
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"
_POSITION = "global_next_index"  # grain's ElasticIterator state: rows of global batches handed out so far


@dataclass(frozen=True)
class Rows:
    """Element i of the pipeline's dataset: a row of a global batch, numbered so that grain's ElasticIterator,
    which gives process p the elements p, p + P, p + 2P, ... of each B, hands it rows [p * B / P, (p + 1) * B / P)
    of batch i // B in order."""

    source: data.ImageSource
    size: int
    preprocess: str
    global_batch: int
    process_count: int
    seed: int
    normalisation: Normalisation
    low_bit: bool
    lr_factor: int | None
    lr_target: bool
    _unreadable: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.preprocess not in ("crops", "thesis"):
            raise ValueError(f"unknown data.preprocess {self.preprocess!r}: use 'thesis' or 'crops'")

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        _exit_with_parent()
        k, j = divmod(int(i), self.global_batch)
        process, slot = j % self.process_count, j // self.process_count
        return self.row(k, process * (self.global_batch // self.process_count) + slot)

    def row(self, k: int, r: int) -> dict[str, np.ndarray]:
        """Row `r` of global batch `k`: the model's inputs, and the names of unreadable images it skipped."""
        rng = np.random.default_rng([self.seed, k, r])
        image, skipped = self._draw(rng)
        if self.preprocess == "thesis":
            hr = data.center_crop(image, self.size)
        else:
            top = rng.integers(image.shape[0] - self.size + 1)
            left = rng.integers(image.shape[1] - self.size + 1)
            hr = image[top : top + self.size, left : left + self.size]
            hr = hr[:, ::-1] if rng.random() < 0.5 else hr
        batch = data.model_batch(np.ascontiguousarray(hr)[None], self.normalisation, self.low_bit, self.lr_factor,
                                 self.lr_target)
        return {**{key: value[0] for key, value in batch.items()}, "skipped": np.str_("\n".join(skipped))}

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """A readable image of at least `size` pixels drawn with `rng`, redrawing past unreadable ones; and why
        each one skipped was skipped."""
        skipped = []
        while True:
            index = int(rng.integers(len(self.source)))
            if index not in self._unreadable:
                try:
                    return data.checked_image(self.source, index, self.size), skipped
                except image_io.UnreadableImage as error:
                    self._unreadable[index] = str(error)
            skipped.append(self._unreadable[index])
            if len(self._unreadable) == len(self.source):
                raise ValueError(f"none of the {len(self.source)} training images can be read: "
                                 + "; ".join(list(self._unreadable.values())[:3]))


@functools.cache
def _exit_with_parent() -> None:
    """In a grain worker process, a thread that ends it when the training process dies: a killed trainer's workers
    would otherwise wait for it forever."""
    parent = multiprocessing.parent_process()
    if parent is not None and multiprocessing.current_process().name.startswith("grain-"):
        threading.Thread(target=lambda: (multiprocessing.connection.wait([parent.sentinel]), os._exit(1)),
                         daemon=True).start()


@dataclass(frozen=True)
class Normalisation:
    """The keys of `config.data` that `data.model_batch` reads, as a small object to send to the workers."""

    pixel_max: float
    shift: float
    scale: float
    shift_loss: float
    scale_loss: float
    downscale: str

    @classmethod
    def of(cls, data_config) -> Normalisation:
        return cls(**{key: data_config[key] for key in cls.__dataclass_fields__})


def local_batches(rows: Rows, steps: int, process_index: int, workers: int) -> grain.DatasetIterator:
    """Process `process_index`'s rows of global batches 0 .. steps - 1, as dicts of numpy arrays prepared by
    `workers` processes (none: threads of this one); a grain iterator whose state, the rows of global batches handed
    out so far, is the same in every process."""
    if workers and not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (google/grain#1355)
        flags.FLAGS.mark_as_parsed()
    if workers and _QUIET_TRACKER not in sys.warnoptions:
        # grain hands batches over in shared memory that multiprocessing's resource tracker, a process started
        # with these options, reports as leaked at exit (the OS frees it): keep that report off the console.
        sys.warnoptions.append(_QUIET_TRACKER)
    dataset = grain.MapDataset.range(steps * rows.global_batch).map(rows)
    return iter(grain.experimental.ElasticIterator(
        dataset, rows.global_batch, grain.sharding.ShardOptions(process_index, rows.process_count),
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=2),
        multiprocessing_options=grain.MultiprocessingOptions(num_workers=workers)))


class Batches:
    """Training batches as global jax Arrays over `sharding`, from this process's `local_batches`; reports each
    skipped image once and counts the seconds spent waiting. `iterator` is the grain iterator that checkpoints
    save."""

    def __init__(self, iterator: grain.DatasetIterator, global_batch: int, sharding):
        self.iterator, self.global_batch, self.sharding = iterator, global_batch, sharding
        self.wait_seconds = 0.0
        self.reported: set[str] = set()

    def resume(self, step: int) -> None:
        """Starts the batches at global batch `step`, where a checkpoint's iterator state has put them unless the
        checkpoint had none (written before the pipeline) or was trained with another global batch size."""
        if self.iterator.get_state()[_POSITION] != step * self.global_batch:
            logging.info("the data iterator starts at batch %d", step)
            self.iterator.set_state({_POSITION: step * self.global_batch})

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        start = time.perf_counter()
        local = next(self.iterator)
        for line in "\n".join(local.pop("skipped")).split("\n"):
            if line and line not in self.reported:
                self.reported.add(line)
                logging.warning("training images: skipped %s", line)
        batch = {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in local.items()}
        self.wait_seconds += time.perf_counter() - start
        return batch

    def close(self) -> None:
        self.iterator.close()


def training_batches(config, size: int, low_bit: bool, lr_factor: int | None, sharding,
                     lr_target: bool = False) -> Batches:
    """The batches `config` trains on (HR images of `size` pixels; with `lr_factor`, their LR inputs too), from
    batch 0, over the devices of `sharding`."""
    global_batch = config.train.batch_size_per_device * jax.device_count()
    rows = Rows(data.hr_source(config.data), size, config.data.preprocess, global_batch, jax.process_count(),
                config.train.seed, Normalisation.of(config.data), low_bit, lr_factor, lr_target)
    iterator = local_batches(rows, config.train.steps, jax.process_index(), config.data.get("workers", DEFAULT_WORKERS))
    return Batches(iterator, global_batch, sharding)
