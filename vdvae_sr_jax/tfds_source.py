"""HR images of a TensorFlow Datasets dataset (config.data.source='tfds', e.g. DIV2K as 'div2k/bicubic_x4'): a lazy
random-access source over the dataset's array_record files, and its decoded images for evaluation."""

from __future__ import annotations

import contextlib
import logging
import operator
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from vdvae_sr_jax import image_io

INSTALL = "pip install tensorflow-cpu tensorflow-datasets (the project's `tfds` extra: pip install -e '.[tfds]')"
SPLIT_KEYS = {"train": "data.tfds_train_split", "validation": "data.tfds_val_split"}


def _process_count() -> int:
    """The number of processes of this run (1 unless JAX's distributed runtime joined several)."""
    import jax

    return jax.process_count()


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            f"data.source='tfds' needs TensorFlow Datasets: {INSTALL}; or use data.source='folder' with data.folder "
            "pointing at the DIV2K_train_HR images"
        ) from None
    return tfds


def rgb_uint8(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array from a TFDS image feature's value: grey (and grey + alpha) repeated to three
    channels, alpha dropped, 16-bit values scaled by 1/257 as the folder source reads them."""
    if image.dtype == np.uint16:
        image = image_io.sixteen_to_eight_bit(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] < 3:
        image = np.repeat(image[..., :1], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


@dataclass(frozen=True)
class HrSource:
    """The `hr` images of one TFDS split, read and decoded one example at a time (`source[i]`, RGB uint8 [H, W, 3]);
    it pickles to worker processes, which then read the array_record files themselves."""

    examples: Any  # tfds's random-access data source of the split, with every other image feature left undecoded
    prefix: str  # '<dataset>/<config>/<split>', the prefix of each image's name

    def __len__(self) -> int:
        return len(self.examples)

    def name(self, index: int) -> str:
        """Image `index`'s name in messages: '<dataset>/<config>/<split>/<index>'."""
        return f"{self.prefix}/{index}"

    def __getitem__(self, index) -> np.ndarray:
        """Image `index`; an `image_io.UnreadableImage` naming it when its bytes do not decode."""
        i = operator.index(index)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"{self.prefix} has {len(self)} images, no image {index}")
        try:
            return rgb_uint8(self.examples[i]["hr"])
        except (OSError, ValueError) as error:
            raise image_io.UnreadableImage(f"{self.name(i)} ({error})") from None


class _TfdsWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname


@contextlib.contextmanager
def _without_tfds_warnings():
    """Drops TFDS's warnings about the folders it skips while it looks for a dataset, so that a dataset missing
    from data_dir is the one line of the error below."""
    quiet, logger = _TfdsWarnings(), logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _prepare_hint(name: str, data_dir: str) -> str:
    return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}', "
            "file_format='array_record').download_and_prepare()\"")


def prepared_builder(name: str, data_dir: str = "", download: bool = False):
    """The TFDS builder of `name` ('<dataset>[/<config>][:<version>]') prepared in `data_dir` ('' for TFDS's
    default) as array_record files with an `hr` image feature; with `download`, a dataset of TFDS's catalog that
    `data_dir` lacks is downloaded and prepared there first. Each way this fails is one error naming the key."""
    tfds = _import_tfds()
    data_dir = os.path.expanduser(data_dir)
    where = data_dir or tfds.core.constants.DATA_DIR
    with _without_tfds_warnings():
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except tfds.core.registered.DatasetNotFoundError:
            raise FileNotFoundError(
                f"data.tfds_name={name!r}: no such dataset in {where} (data.tfds_data_dir) nor in TFDS's catalog"
            ) from None
        except (ValueError, AssertionError) as error:  # a malformed name, or a config or version the dataset lacks
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise ValueError(f"data.tfds_name={name!r}: {' '.join(lines[:4])}") from None
        prepared = builder.is_prepared()
    if not prepared and download and _process_count() > 1:
        raise FileNotFoundError(
            f"data.tfds_name={name!r} is not prepared in {where} (data.tfds_data_dir), and the processes of a "
            f"multi-process run would all prepare it at once: prepare it first with {_prepare_hint(name, where)}"
        )
    if not prepared and download:
        builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
        builder.download_and_prepare()
    elif not prepared:
        raise FileNotFoundError(
            f"data.tfds_name={name!r} is not prepared in {where} (data.tfds_data_dir): set data.tfds_download=True "
            f"to download and prepare it there, or run {_prepare_hint(name, where)}"
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"data.tfds_name={name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, which has "
            "no random access: point data.tfds_data_dir at another folder, where data.tfds_download=True prepares "
            "it as array_record files"
        )
    features = builder.info.features
    names = sorted(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else []
    if "hr" not in names or not isinstance(features["hr"], tfds.features.Image):
        raise ValueError(f"data.tfds_name={name!r} has no 'hr' image feature (its features: "
                         f"{', '.join(names) or 'none'}); data.source='tfds' reads a DIV2K-like dataset's 'hr'")
    if features["hr"].np_dtype not in (np.uint8, np.uint16):
        raise ValueError(f"data.tfds_name={name!r}: its 'hr' images are {np.dtype(features['hr'].np_dtype).name}; "
                         "data.source='tfds' reads 8- or 16-bit images")
    return builder


def hr_source(data, split: str = "train") -> HrSource:
    """The `hr` images of `data.tfds_name`'s split for 'train' (`data.tfds_train_split`) or 'validation'
    (`data.tfds_val_split`), from `data.tfds_data_dir` (prepared there first with `data.tfds_download`); lazy,
    so a dataset of any size opens at once."""
    if split not in SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'validation'")
    tfds = _import_tfds()
    key = SPLIT_KEYS[split]
    tfds_split = data.tfds_train_split if split == "train" else data.tfds_val_split
    builder = prepared_builder(data.tfds_name, data.get("tfds_data_dir", ""), data.get("tfds_download", False))
    try:
        builder.info.splits[tfds_split]
    except ValueError as error:
        raise ValueError(f"{key}={tfds_split!r}: {data.tfds_name} in {builder.data_dir} has no such split ({error})"
                         ) from None
    skip = {k: tfds.decode.SkipDecoding() for k, feature in builder.info.features.items()
            if k != "hr" and isinstance(feature, tfds.features.Image)}
    examples = builder.as_data_source(split=tfds_split, decoders=skip)
    return HrSource(examples, f"{data.tfds_name}/{tfds_split}")


def named_images(data, split: str = "train", min_size: int = 1,
                 limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 image) for every image of `hr_source(data, split)` (the first `limit`), decoded now;
    undecodable and too-small images are skipped and logged by name, as the folder source does."""
    from vdvae_sr_jax.data import decoded_images

    source = hr_source(data, split)
    return decoded_images(source, min_size, f"in {source.prefix}", limit=limit)
