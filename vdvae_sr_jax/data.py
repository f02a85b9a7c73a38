"""Images in, normalised batches out: the embedded photos, folders of images, crops and normalisation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

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
    import skimage

    root = Path(skimage.__file__).parent / "data"
    return [(name, read_image(root / name)) for name in EMBEDDED_PHOTOS]


def folder_images(folder: str | Path, min_size: int = 1) -> list[tuple[str, np.ndarray]]:
    """(path, RGB uint8 image) for every image under `folder`; unreadable or too-small files, and links that lead
    nowhere or to folders (not searched), are skipped and logged by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths, skipped = image_io.find_images(folder.rglob("*"))
    images = []
    for path in paths:
        try:
            image = read_image(path)
        except image_io.UnreadableImage as error:
            skipped.append(str(error))
            continue
        if min(image.shape[:2]) < min_size:
            skipped.append(f"{path} (smaller than {min_size} pixels)")
            continue
        images.append((str(path), image))
    if skipped:
        total = len(skipped) + len(images)
        logging.warning("skipped %d of %d images:\n  %s", len(skipped), total, "\n  ".join(skipped))
    if not images:
        raise ValueError(f"no readable images of at least {min_size} pixels under {folder}")
    return images


def load_images(data, min_size: int, split: str = "train") -> list[tuple[str, np.ndarray]]:
    """The images a config's `data.source` names: 'embedded', 'folder' (`data.folder`, or `data.val_folder` for
    the validation split) or 'tfds' (`data.tfds_name` in `data.tfds_data_dir`)."""
    if data.source == "embedded":
        return embedded_photos()
    if data.source == "folder":
        folder = data.folder if split == "train" or not data.get("val_folder") else data.val_folder
        return folder_images(folder, min_size)
    if data.source == "tfds":
        return tfds_source.named_images(data, split, min_size)
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
    """uint8 centre crops [n, size, size, 3] of the first `n` validation images: what validation ELBOs and sample
    grids are computed on."""
    return np.stack([center_crop(im, size) for _, im in load_images(data, size, "validation")[:n]])


def random_crop(images: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random size x size crop of a random one of `images`, flipped horizontally half the time."""
    image = images[rng.integers(len(images))]
    top = rng.integers(image.shape[0] - size + 1)
    left = rng.integers(image.shape[1] - size + 1)
    crop = image[top : top + size, left : left + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def random_crops(images: list[np.ndarray], size: int, batch: int, seed: int, start: int = 0,
                 rows: range | None = None) -> Iterator[np.ndarray]:
    """Endless batches of random size x size crops with horizontal flips from batch `start` on; row r of batch k
    depends only on (seed, k, r). `rows` (all by default) are the rows of each batch to make."""
    return _batches(lambda rng: random_crop(images, size, rng), batch, seed, start, rows)


def _batches(draw, batch: int, seed: int, start: int, rows: range | None) -> Iterator[np.ndarray]:
    """Endless uint8 batches of `rows` (of `batch`): row r of batch k is `draw` of a generator seeded (seed, k, r)."""
    rows = range(batch) if rows is None else rows
    k = start
    while True:
        yield np.stack([draw(np.random.default_rng([seed, k, r])) for r in rows])
        k += 1


def downscale(hr_uint8: np.ndarray, factor: int, method: str) -> np.ndarray:
    """LR images from HR: 'matlab' bicubic (the SR literature's) or 'pil' bicubic (what the thesis code used)."""
    if method == "matlab":
        from vdvae_sr_jax.resize import bicubic_downscale

        return bicubic_downscale(hr_uint8, factor)
    if method == "pil":
        h, w = hr_uint8.shape[1] // factor, hr_uint8.shape[2] // factor
        return np.stack([np.asarray(Image.fromarray(x).resize((w, h), Image.BICUBIC)) for x in hr_uint8])
    raise ValueError(f"unknown data.downscale {method!r}: use 'matlab' or 'pil'")


def hr_batches(images: list[np.ndarray], size: int, batch: int, seed: int, mode: str, start: int = 0,
               rows: range | None = None) -> Iterator[np.ndarray]:
    """Endless uint8 HR batches from step `start` on: 'thesis' picks whole-image centre crops, 'crops' random
    crops with flips. Row r of batch k depends only on (seed, k, r), so a resumed run sees the same data, and a
    global batch is the same whatever the number of processes: each makes only its `rows` of it (all by default)."""
    if mode == "thesis":
        crops = [center_crop(im, size) for im in images]
        return _batches(lambda rng: crops[rng.integers(len(crops))], batch, seed, start, rows)
    if mode == "crops":
        return random_crops(images, size, batch, seed, start, rows)
    raise ValueError(f"unknown data.preprocess {mode!r}: use 'thesis' or 'crops'")


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

