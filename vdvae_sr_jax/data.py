"""Images in, normalised batches out: the embedded photos, folders of images, crops and normalisation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from vdvae_sr_jax import image_io, tfds_source

# Real photographs that ship inside scikit-image, so demos and tests need no download.
EMBEDDED_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
    "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg",
)


def normalize(x_uint8: np.ndarray, data, low_bit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, likelihood target) as upstream: (x + shift) * scale, and the loss scaling.

    With `low_bit` data (FFHQ-256) the target keeps 5 bits: floor(x / 8) * 8 before scaling.
    """
    x = x_uint8.astype(np.float32)
    target = np.floor(x / 8.0) * 8.0 if low_bit else x
    to_range = data.pixel_max / 255.0
    inp = (x * to_range + data.shift) * data.scale
    target = (target * to_range + data.shift_loss) * data.scale_loss
    return inp.astype(np.float32), target.astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] from any image file PIL reads, as the upscaler reads it (`image_io.load_image`:
    EXIF orientation applied, 16-bit values scaled by 1/257, alpha dropped); `image_io.UnreadableImage` names a bad
    file."""
    return image_io.load_image(path).rgb


def embedded_photos() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 image) for the photos that ship inside scikit-image."""
    source = EmbeddedSource()
    return [(source.name(i), read_image(source.paths[i])) for i in range(len(source))]


class ImageSource(Protocol):
    """Random-access HR images: what the training pipeline reads. `__getitem__` decodes one image when it is asked
    for; it raises `image_io.UnreadableImage`, naming the file, for one that cannot be read."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...

    def name(self, index: int) -> str:
        """Image `index`'s name in messages."""


@dataclass(frozen=True)
class FileSource:
    """Image files, each read (`read_image`) only when it is asked for."""

    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])

    def name(self, index: int) -> str:
        return self.paths[index]


@lru_cache(maxsize=None)
def _embedded(path: str) -> np.ndarray:
    image = read_image(path)
    image.setflags(write=False)
    return image


class EmbeddedSource(FileSource):
    """The photos that ship inside scikit-image; so few and small that each process decodes each one once."""

    def __init__(self):
        import skimage

        root = Path(skimage.__file__).parent / "data"
        super().__init__(tuple(str(root / name) for name in EMBEDDED_PHOTOS))

    def __getitem__(self, index: int) -> np.ndarray:
        return _embedded(self.paths[index])

    def name(self, index: int) -> str:
        return Path(self.paths[index]).name


def folder_source(folder: str | Path) -> FileSource:
    """The image files under `folder`, listed, not read; links that lead nowhere or to folders (not searched) are
    skipped and logged by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths, skipped = image_io.find_images(folder.rglob("*"))
    if skipped:
        logging.warning("skipped %d links under %s:\n  %s", len(skipped), folder, "\n  ".join(skipped))
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(image_io.IMAGE_SUFFIXES))}) under {folder}")
    return FileSource(tuple(str(path) for path in paths))


def split_folder(data, split: str) -> str:
    """The folder of a split: `data.folder`, or `data.val_folder` for the validation split where it is set."""
    return data.folder if split == "train" or not data.get("val_folder") else data.val_folder


def hr_source(data, split: str = "train") -> ImageSource:
    """The images a config's `data.source` names, read lazily: 'embedded', 'folder' (`data.folder`, or
    `data.val_folder` for the validation split) or 'tfds' (`vdvae_sr_jax.tfds_source`)."""
    if data.source == "embedded":
        return EmbeddedSource()
    if data.source == "folder":
        return folder_source(split_folder(data, split))
    if data.source == "tfds":
        return tfds_source.hr_source(data, split)
    raise ValueError(f"unknown data.source {data.source!r}: use 'embedded', 'folder' or 'tfds'")


def folder_images(folder: str | Path, min_size: int = 1, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """(path, RGB uint8 image) for every image under `folder` (the first `limit`); unreadable or too-small files,
    and links that lead nowhere or to folders (not searched), are skipped and logged by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths, skipped = image_io.find_images(folder.rglob("*"))
    return decoded_images(FileSource(tuple(str(path) for path in paths)), min_size, f"under {folder}", skipped,
                          limit)


def decoded_images(source: ImageSource, min_size: int, where: str, skipped: list[str] = (),
                   limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 image) for every image of `source` (`where` says where it is), decoded now, up to the first
    `limit` readable ones (the rest are not read); unreadable and too-small ones are skipped and logged by name in
    one warning, after those already `skipped`."""
    skipped, images = list(skipped), []
    for i in tqdm(range(len(source)), desc=f"reading images {where}", unit="image", leave=False):
        if limit is not None and len(images) == limit:
            break
        try:
            images.append((source.name(i), checked_image(source, i, min_size)))
        except image_io.UnreadableImage as error:
            skipped.append(str(error))
    if skipped:
        total = len(skipped) + len(images)
        logging.warning("skipped %d of %d images:\n  %s", len(skipped), total, "\n  ".join(skipped))
    if not images:
        raise ValueError(f"no readable images of at least {min_size} pixels {where}")
    return images


def load_images(data, min_size: int, split: str = "train", limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The images a config's `data.source` names (the first `limit`; a folder's or TFDS's others are not decoded):
    'embedded', 'folder' (`data.folder`, or `data.val_folder` for the validation split) or 'tfds' (`data.tfds_name`
    in `data.tfds_data_dir`)."""
    if data.source == "embedded":
        return embedded_photos()[:limit]
    if data.source == "folder":
        return folder_images(split_folder(data, split), min_size, limit)
    if data.source == "tfds":
        return tfds_source.named_images(data, split, min_size, limit)
    raise ValueError(f"unknown data.source {data.source!r}: use 'embedded', 'folder' or 'tfds'")


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to `size` (bicubic) and takes the central size x size square."""
    h, w = image.shape[:2]
    s = size / min(h, w)
    new_size = (max(size, round(w * s)), max(size, round(h * s)))
    resized = np.asarray(Image.fromarray(image).resize(new_size, Image.BICUBIC))
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size]


def validation_crops(data, size: int, n: int) -> np.ndarray:
    """uint8 centre crops [n, size, size, 3] of the first `n` readable validation images of at least `size` pixels
    (others are skipped and logged by name): what validation ELBOs and sample grids are computed on. Only those
    images are decoded."""
    source, crops, skipped = hr_source(data, "validation"), [], []
    for index in range(len(source)):
        if len(crops) == n:
            break
        try:
            crops.append(center_crop(checked_image(source, index, size), size))
        except image_io.UnreadableImage as error:
            skipped.append(str(error))
    if skipped:
        logging.warning("validation: skipped %d images:\n  %s", len(skipped), "\n  ".join(skipped))
    if not crops:
        raise ValueError(f"no readable validation images of at least {size} pixels in data.source={data.source!r}")
    return np.stack(crops)


def checked_image(source: ImageSource, index: int, min_size: int) -> np.ndarray:
    """Image `index` of `source`; `image_io.UnreadableImage` naming it if it cannot be read or is smaller than
    `min_size` pixels."""
    image = source[index]
    if min(image.shape[:2]) < min_size:
        raise image_io.UnreadableImage(f"{source.name(index)} (smaller than {min_size} pixels)")
    return image


def downscale(hr_uint8: np.ndarray, factor: int, method: str) -> np.ndarray:
    """LR images from HR: 'matlab' bicubic (the SR literature's) or 'pil' bicubic (what the thesis code used)."""
    if method == "matlab":
        from vdvae_sr_jax.resize import bicubic_downscale

        return bicubic_downscale(hr_uint8, factor)
    if method == "pil":
        h, w = hr_uint8.shape[1] // factor, hr_uint8.shape[2] // factor
        return np.stack([np.asarray(Image.fromarray(x).resize((w, h), Image.BICUBIC)) for x in hr_uint8])
    raise ValueError(f"unknown data.downscale {method!r}: use 'matlab' or 'pil'")


def model_batch(hr_uint8: np.ndarray, data, low_bit: bool, lr_factor: int | None,
                lr_target: bool = False) -> dict[str, np.ndarray]:
    """Normalised model inputs for uint8 HR images; with `lr_factor`, the LR input downscaled from them too, and,
    with `lr_target`, that LR image in the likelihood's range (for the LR-consistency loss)."""
    inp, target = normalize(hr_uint8, data, low_bit)
    batch = {"input": inp, "target": target}
    if lr_factor:
        lr_input, lr_in_target_range = normalize(downscale(hr_uint8, lr_factor, data.downscale), data)
        batch["lr_input"] = lr_input
        if lr_target:
            batch["lr_target"] = lr_in_target_range
    return batch

