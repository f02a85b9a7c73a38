"""Image files in and out: which inputs a spec names, reading any image mode (for training, evaluation and the
upscale tool alike), writing PNGs safely."""

from __future__ import annotations

import errno
import logging
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
GLOB_CHARS = frozenset("*?[")
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})
# What PIL raises on missing, truncated, corrupt or absurdly large files.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class UnreadableImage(ValueError):
    """A file that cannot be read as an image; the message names the file, so a caller can report it and go on."""


@dataclass(frozen=True)
class SourceImage:
    """An input image as the model sees it (RGB uint8 [H, W, 3]), its alpha (uint8 [H, W]) and whether it was grey."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    grey: bool


def is_pattern(spec: str | Path) -> bool:
    """Whether `spec` is a glob pattern rather than a path."""
    return any(c in str(spec) for c in GLOB_CHARS)


def is_image_file(path: Path) -> bool:
    """A regular file with one of the image suffixes the project reads."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def skipped_link(path: Path) -> str | None:
    """Why a folder search or glob skips `path`, for a link it does not follow: one with an image suffix that leads
    nowhere or round a loop, or one to a folder (searches never follow those, so a loop cannot recurse forever);
    None for anything else."""
    if not path.is_symlink():
        return None
    try:
        target = path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop: fix or remove the link"
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return f"{path} is a link to {path.readlink()}, which does not exist: fix or remove the link"
        return None
    if stat.S_ISDIR(target.st_mode):
        return f"{path} is a link to a folder, which is not searched: give that folder as its own input"
    return None


def find_images(candidates: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """The image files among `candidates`, sorted, and a line for each link among them that is skipped."""
    found, skipped = [], []
    for path in candidates:
        if is_image_file(path):
            found.append(path)
        elif (reason := skipped_link(path)) is not None:
            skipped.append(reason)
    return sorted(found), sorted(skipped)


def expand_inputs(spec: str | Path) -> tuple[list[Path], list[str]]:
    """The image files `spec` names, sorted: the file itself, every image under a folder, or a glob's matches; and
    a line for each link the search skipped (`skipped_link`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path], []
    if path.is_dir():
        found, skipped = find_images(path.rglob("*"))
    elif is_pattern(spec):
        root = input_root(spec)
        pattern = Path(*path.parts[len(root.parts):])
        pattern = pattern / "*" if pattern.name == "**" else pattern  # a bare ** matches only folders in pathlib
        found, skipped = find_images(root.glob(str(pattern)))
    else:
        raise FileNotFoundError(f"input {spec} does not exist")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) match input {spec}"
                                + "".join(f"; {reason}" for reason in skipped))
    return found, skipped


def input_root(spec: str | Path) -> Path | None:
    """The folder whose subfolders outputs mirror: a folder spec itself, a glob's fixed leading folders, else None."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not is_pattern(spec):
        return None
    fixed = []
    for part in path.parts:
        if is_pattern(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path()


def sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    """16-bit values (clipped to [0, 65535]) to uint8 as round(x / 257), which maps 0 -> 0 and 65535 -> 255."""
    clipped = np.clip(values.astype(np.int64), 0, 65535)
    return ((clipped + 128) // 257).astype(np.uint8)


def low_bytes(path: str | Path, im: Image.Image) -> Image.Image | None:
    """For an opened 16-bit RGB or RGBA PNG, of which Pillow keeps the high bytes, the same image decoded again to
    its low bytes with Pillow's little-endian unpacker, EXIF orientation applied; None for any other image."""
    rawmode = im.tile[0][3] if im.format == "PNG" and len(im.tile) == 1 else None
    if rawmode not in ("RGB;16B", "RGBA;16B") or "transparency" in im.info:
        return None
    with open_image(path) as low:
        tile, args = low.tile[0], rawmode.replace(";16B", ";16L")  # a named tuple from Pillow 11, a tuple before
        low.tile = [tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)]
        low.load()
        return ImageOps.exif_transpose(low)


def split_image(im: Image.Image, low: Image.Image | None = None) -> SourceImage:
    """RGB, alpha and greyness of an opened image in any mode: 16-bit values (grey, or colour whose `low_bytes` are
    given) are scaled by 1/257, palette transparency becomes alpha, and floating-point images are refused (they
    have no fixed range)."""
    if im.mode == "F":
        raise ValueError("floating-point images (mode F) are not supported")
    grey = im.mode in GREY_MODES
    if im.mode.startswith("I"):
        grey8 = sixteen_to_eight_bit(np.asarray(im))
        return SourceImage(rgb=np.repeat(grey8[:, :, None], 3, axis=2), alpha=None, grey=True)
    if low is not None:
        eight = sixteen_to_eight_bit(np.asarray(im).astype(np.uint16) << 8 | np.asarray(low))
        return SourceImage(rgb=eight[:, :, :3], alpha=eight[:, :, 3] if eight.shape[2] == 4 else None, grey=False)
    if im.has_transparency_data:
        rgba = np.asarray(im.convert("RGBA"))
        return SourceImage(rgb=rgba[:, :, :3].copy(), alpha=rgba[:, :, 3].copy(), grey=grey)
    return SourceImage(rgb=np.asarray(im.convert("RGB")), alpha=None, grey=grey)


def open_image(path: str | Path) -> Image.Image:
    """The image at `path` with its header read and its pixels not yet decoded. Pillow's decompression-bomb
    warning is silenced: a caller that wants a size limit checks `size` itself (Pillow still refuses images over
    twice its limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def unreadable(path: str | Path, error: Exception) -> UnreadableImage:
    """The one-line error for a file that cannot be read, naming it and what to do."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return UnreadableImage(f"cannot read image {path}: {reason}; replace the file, or remove it from the input")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels; UnreadableImage names a bad file."""
    try:
        with open_image(path) as im:
            return im.size
    except READ_ERRORS as error:
        raise unreadable(path, error) from error


def load_image(path: str | Path) -> SourceImage:
    """The first frame of the image at `path`, EXIF orientation applied (a warning names an image with several
    frames); UnreadableImage, naming the file, if it cannot be read, or if its pixel data is shorter than its
    header claims."""
    try:
        with open_image(path) as im:
            frames = getattr(im, "n_frames", 1)
            low = low_bytes(path, im)
            im.load()
            source = split_image(ImageOps.exif_transpose(im), low)
    except READ_ERRORS as error:
        raise unreadable(path, error) from error
    if frames > 1:
        logging.warning("%s has %d frames: only the first is used", path, frames)
    return source


def upscale_alpha(alpha: np.ndarray, scale: int = 4) -> np.ndarray:
    """Alpha uint8 [H, W] enlarged `scale` times with PIL's bicubic (the Keys a=-0.5 kernel, like MATLAB's),
    chosen over resize.imresize because its memory stays small on large images."""
    h, w = alpha.shape
    return np.asarray(Image.fromarray(alpha).resize((w * scale, h * scale), Image.BICUBIC))


def save_png(path: str | Path, rgb: np.ndarray, alpha: np.ndarray | None = None, grey: bool = False) -> Path:
    """Writes uint8 RGB [H, W, 3] as a PNG, with `alpha` [H, W] re-attached; `grey` writes luma only (L or LA)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if alpha is not None and (alpha.dtype != np.uint8 or alpha.shape != rgb.shape[:2]):
        raise ValueError(f"expected uint8 alpha of shape {rgb.shape[:2]}, got {alpha.dtype} {alpha.shape}")
    im = Image.fromarray(rgb).convert("L") if grey else Image.fromarray(rgb)
    if alpha is not None:
        im.putalpha(Image.fromarray(alpha))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, also through links and case-insensitive file systems."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def output_path(input_path: str | Path, output_dir: str | Path, suffix: str = "_x4",
                inputs_root: str | Path | None = None) -> Path:
    """Where the PNG output of one input goes: output_dir / (its folder under inputs_root) / stem+suffix.png.

    Raises ValueError, naming both paths, if that would be the input file itself.
    """
    input_path = Path(input_path)
    folder = input_path.parent.relative_to(inputs_root) if inputs_root is not None else Path()
    out = Path(output_dir) / folder / f"{input_path.stem}{suffix}.png"
    if same_file(out, input_path):
        raise ValueError(f"output {out} would overwrite its input {input_path}: use another output folder or suffix")
    return out


def file_id(path: Path) -> tuple[int, int]:
    """(device, inode) of an existing file: equal exactly when two paths name the same file."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def output_paths(inputs: Sequence[Path], output_dir: str | Path, suffix: str = "_x4",
                 inputs_root: str | Path | None = None) -> list[Path]:
    """`output_path` of every (existing) input, refusing any output that is one of the inputs or that two share."""
    outputs = [output_path(p, output_dir, suffix, inputs_root) for p in inputs]
    input_ids = {file_id(Path(p)): p for p in inputs}
    first_input = {}
    for p, out in zip(inputs, outputs):
        if out.exists() and file_id(out) in input_ids:
            raise ValueError(f"output {out} would overwrite input {input_ids[file_id(out)]}: "
                             "use another output folder or suffix")
        key = out.resolve()
        if key in first_input:
            raise ValueError(f"inputs {first_input[key]} and {p} would both be written to {out}")
        first_input[key] = p
    return outputs
