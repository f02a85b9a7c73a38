"""A DIV2K-like TensorFlow Datasets builder over local PNG files, for the TFDS tests: DIV2K's features ('hr', and
'lr', its x4 MATLAB-bicubic downscale) and splits (train, validation), prepared without a download.

    write_pngs(folder)                      # the embedded photos, small, as PNGs in folder/train, folder/validation
    build(folder, data_dir)                 # 'div2k_pngs/bicubic_x4' in data_dir, as array_record files
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vdvae_sr_jax import data
from vdvae_sr_jax.resize import bicubic_downscale

NAME = "div2k_pngs"
SPLITS = ("train", "validation")


class Div2kPngs(tfds.core.GeneratorBasedBuilder):
    """DIV2K's layout over the PNGs in the manual folder's train/ and validation/. Configs: 'bicubic_x4' (DIV2K's),
    'images_only' (a single 'image' feature, no 'hr'), 'float_hr' (grey float32 'hr' images) and 'one_corrupt'
    (bicubic_x4 with a last validation example whose 'hr' bytes are no image)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in ("bicubic_x4", "images_only", "float_hr",
                                                                 "one_corrupt")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "PNG files in <manual_dir>/train and <manual_dir>/validation"

    def _info(self):
        if self.builder_config.name == "images_only":
            features = {"image": tfds.features.Image()}
        elif self.builder_config.name == "float_hr":
            features = {"hr": tfds.features.Image(dtype=np.float32, shape=(None, None, 1))}
        else:
            features = {"lr": tfds.features.Image(), "hr": tfds.features.Image()}
        # In the files' order, as the folder source reads them, so both sources give the same batches.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(dl_manager.manual_dir / split, split) for split in SPLITS}

    def _generate_examples(self, folder, split):
        for path in sorted(folder.glob("*.png")):
            hr = np.asarray(Image.open(path).convert("RGB"))
            if self.builder_config.name == "images_only":
                yield path.name, {"image": hr}
            elif self.builder_config.name == "float_hr":
                yield path.name, {"hr": hr[..., :1].astype(np.float32) / 255}
            else:
                # As TFDS's DIV2K: the HR file's bytes as they are, beside the LR image.
                yield path.name, {"hr": path, "lr": bicubic_downscale(hr, 4)}
        if self.builder_config.name == "one_corrupt" and split == "validation":
            yield "corrupt.png", {"hr": b"not a PNG file", "lr": np.zeros((1, 1, 3), np.uint8)}


def write_pngs(folder: Path, width: int = 96, n_validation: int = 2) -> dict[str, list[np.ndarray]]:
    """The embedded photos scaled to `width` (sides cropped to multiples of 4), the last `n_validation` of them in
    folder/validation, the others in folder/train; returns each split's images in file order."""
    photos = data.embedded_photos()
    images: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for i, (name, photo) in enumerate(photos):
        split = "validation" if i >= len(photos) - n_validation else "train"
        height = round(photo.shape[0] * width / photo.shape[1])
        image = np.asarray(Image.fromarray(photo).resize((width, height), Image.BICUBIC))
        image = image[: height // 4 * 4, : width // 4 * 4]
        (folder / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / split / f"{i:02d}_{Path(name).stem}.png")
        images[split].append(image)
    return images


def build(pngs: Path, data_dir: Path, config: str = "bicubic_x4", file_format: str = "array_record") -> str:
    """Prepares the dataset of `config` from the PNGs in `pngs` in `data_dir`; returns its TFDS name."""
    builder = Div2kPngs(config=config, data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=pngs))
    return f"{NAME}/{config}"
