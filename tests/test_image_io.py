"""Reading every image mode the upscale tool meets, writing PNGs back, and never overwriting an input."""

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image, ImageFile

from vdvae_sr_jax.data import read_image
from vdvae_sr_jax.image_io import (
    UnreadableImage,
    expand_inputs,
    image_size,
    input_root,
    load_image,
    output_path,
    output_paths,
    save_png,
    upscale_alpha,
)
from vdvae_sr_jax.resize import bicubic_upscale

PHOTOS = Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return read_image(PHOTOS / "chelsea.png")


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return np.asarray(Image.open(PHOTOS / "camera.png"))


def test_greyscale_reads_as_equal_channels_and_writes_back_grey(tmp_path, camera):
    assert camera.ndim == 2
    source = load_image(PHOTOS / "camera.png")
    assert source.grey and source.alpha is None and source.rgb.shape == camera.shape + (3,)
    assert all(np.array_equal(source.rgb[:, :, c], camera) for c in range(3))
    written = save_png(tmp_path / "grey.png", source.rgb, grey=True)
    with Image.open(written) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), camera)


def test_rgba_alpha_survives_a_round_trip(tmp_path, chelsea, camera):
    alpha = camera[: chelsea.shape[0], : chelsea.shape[1]]
    Image.fromarray(np.dstack([chelsea, alpha])).save(tmp_path / "in.png")
    source = load_image(tmp_path / "in.png")
    assert not source.grey and np.array_equal(source.rgb, chelsea) and np.array_equal(source.alpha, alpha)
    save_png(tmp_path / "out.png", source.rgb, source.alpha)
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im), np.dstack([chelsea, alpha]))


def test_grey_with_alpha_writes_back_as_la(tmp_path, camera):
    grey, alpha = camera[:200, :300], camera[200:400, 100:400]
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    source = load_image(tmp_path / "la.png")
    assert source.grey and np.array_equal(source.rgb[:, :, 1], grey) and np.array_equal(source.alpha, alpha)
    save_png(tmp_path / "out.png", source.rgb, source.alpha, grey=True)
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "LA" and np.array_equal(np.asarray(im), np.dstack([grey, alpha]))


def test_palette_transparency_becomes_alpha(tmp_path, chelsea):
    palette_image = Image.fromarray(chelsea).quantize(colors=16)
    indices = np.asarray(palette_image)
    clear = int(indices[0, 0])
    palette_image.save(tmp_path / "p.png", transparency=clear)
    source = load_image(tmp_path / "p.png")
    colours = np.array(palette_image.getpalette()[: 3 * 16], np.uint8).reshape(16, 3)
    assert np.array_equal(source.rgb, colours[indices])
    assert np.array_equal(source.alpha, np.where(indices == clear, 0, 255).astype(np.uint8))
    assert 0 < (source.alpha == 0).mean() < 1 and not source.grey


@pytest.mark.parametrize("dtype, fmt", [("<u2", "PNG"), (">u2", "TIFF"), ("<i4", "TIFF")])
def test_sixteen_bit_images_scale_by_1_over_257(tmp_path, camera, dtype, fmt):
    noise = np.random.default_rng(0).integers(0, 256, camera.shape)
    deep = (camera.astype(np.int64) * 256 + noise).astype(dtype)
    if dtype == "<i4":  # 32-bit 'I' images are clipped to the 16-bit range first
        deep[0, :2] = 70000, -5
    path = tmp_path / f"deep.{fmt.lower()}"
    Image.fromarray(deep).save(path, format=fmt)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I;16B", "I")
    source = load_image(path)
    expected = np.floor(np.clip(deep, 0, 65535) / 257 + 0.5).astype(np.uint8)
    assert source.grey and all(np.array_equal(source.rgb[:, :, c], expected) for c in range(3))
    assert source.rgb[0, 0, 0] == (255 if dtype == "<i4" else round(deep[0, 0] / 257))


def test_jpeg_exif_orientation_is_applied(tmp_path, chelsea):
    crop = chelsea[:200, :330]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 90 degrees anticlockwise: rotate clockwise to view
    Image.fromarray(crop).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    rgb = load_image(tmp_path / "rotated.jpg").rgb.astype(np.float64)
    assert rgb.shape == (330, 200, 3)
    clockwise = np.abs(rgb - np.rot90(crop, -1)).mean()
    anticlockwise = np.abs(rgb - np.rot90(crop, 1)).mean()
    assert clockwise < 3.0 and anticlockwise > 20.0, (clockwise, anticlockwise)


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "text.png"])
def test_corrupt_files_raise_a_named_error(tmp_path, chelsea, name):
    good = tmp_path / f"good{Path(name).suffix}"
    Image.fromarray(chelsea).save(good)
    data = b"no image here" if name == "text.png" else good.read_bytes()[: good.stat().st_size // 2]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UnreadableImage, match=rf"cannot read image .*{name}"):
        load_image(tmp_path / name)
    with pytest.raises(ValueError):
        load_image(tmp_path / "missing.png")


def test_upscale_alpha_is_bicubic_x4(camera):
    alpha = camera[100:160, 100:170]
    big = upscale_alpha(alpha)
    assert big.shape == (240, 280) and big.dtype == np.uint8
    difference = np.abs(big.astype(int) - bicubic_upscale(alpha).astype(int))
    assert difference[8:-8, 8:-8].max() <= 2 and difference.mean() < 0.5
    assert np.all(upscale_alpha(np.full((5, 3), 200, np.uint8)) == 200)


def make_tree(root: Path) -> None:
    """root/a.png, root/b.jpg, root/notes.txt, root/sub/c.png, root/sub/deeper/d.PNG."""
    (root / "sub" / "deeper").mkdir(parents=True)
    pixels = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    for name in ("a.png", "b.jpg", "sub/c.png", "sub/deeper/d.PNG"):
        pixels.save(root / name, format="PNG")
    (root / "notes.txt").write_text("not an image")


def test_expand_inputs_from_a_file_a_folder_and_a_glob(tmp_path):
    make_tree(tmp_path)
    assert expand_inputs(tmp_path / "a.png") == ([tmp_path / "a.png"], [])
    names = ["a.png", "b.jpg", "sub/c.png", "sub/deeper/d.PNG"]
    assert expand_inputs(tmp_path) == ([tmp_path / n for n in names], [])
    assert expand_inputs(str(tmp_path / "**" / "*.png")) == ([tmp_path / "a.png", tmp_path / "sub" / "c.png"], [])
    assert expand_inputs(str(tmp_path / "*")) == ([tmp_path / "a.png", tmp_path / "b.jpg"], [])
    assert expand_inputs(str(tmp_path / "**")) == ([tmp_path / n for n in names], [])  # as glob.glob's recursive **
    assert input_root(tmp_path) == tmp_path and input_root(tmp_path / "a.png") is None
    assert input_root(str(tmp_path / "sub" / "**" / "*.png")) == tmp_path / "sub"
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        expand_inputs(tmp_path / "nothing.png")
    with pytest.raises(FileNotFoundError, match=r"\*\.webp"):
        expand_inputs(str(tmp_path / "*.webp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_inputs(tmp_path / "empty")


def test_output_paths_mirror_subfolders_and_end_in_png(tmp_path):
    make_tree(tmp_path)
    inputs, _ = expand_inputs(tmp_path)
    outputs = output_paths(inputs, tmp_path / "out", "_x4", inputs_root=tmp_path)
    assert outputs == [tmp_path / "out" / n for n in ("a_x4.png", "b_x4.png", "sub/c_x4.png", "sub/deeper/d_x4.png")]
    assert output_path(tmp_path / "sub" / "c.png", tmp_path / "out") == tmp_path / "out" / "c_x4.png"


def test_outputs_never_overwrite_an_input(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ValueError, match=r"output .*a\.png would overwrite its input .*a\.png"):
        output_path(tmp_path / "a.png", tmp_path, suffix="")
    assert output_path(tmp_path / "b.jpg", tmp_path, suffix="") == tmp_path / "b.png"
    # An output that is a link to its input, or a hard link to another input, would overwrite it too.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_x4.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"output .*out/a_x4\.png would overwrite its input .*a\.png"):
        output_path(tmp_path / "a.png", tmp_path / "out")
    (tmp_path / "out" / "sub").mkdir()
    (tmp_path / "out" / "sub" / "c_x4.png").hardlink_to(tmp_path / "b.jpg")
    with pytest.raises(ValueError, match=r"output .*out/sub/c_x4\.png would overwrite input .*b\.jpg"):
        output_paths([tmp_path / "b.jpg", tmp_path / "sub" / "c.png"], tmp_path / "out", inputs_root=tmp_path)
    # In the same folder a.png and a_x4.png are both inputs: a's output would overwrite the second.
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a_x4.png")
    with pytest.raises(ValueError, match=r"would overwrite input .*a_x4\.png"):
        output_paths([tmp_path / "a.png", tmp_path / "a_x4.png"], tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"inputs .*b\.jpg and .*b\.png would both be written to .*b_x4\.png"):
        output_paths([tmp_path / "b.jpg", tmp_path / "b.png"], tmp_path / "out")


def png_bytes(width: int, height: int, data: bytes, colour: int = 2, depth: int = 8) -> bytes:
    """A PNG whose header claims width x height and whose compressed pixel data is `data` (filtered rows, whatever
    their length), written chunk by chunk so that it can lie."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(9000, 9000), (300, 200)])
def test_pixel_data_shorter_than_the_header_claims_is_refused_by_name(tmp_path, width, height):
    path = tmp_path / f"short_{width}.png"
    path.write_bytes(png_bytes(width, height, bytes(100)))
    assert path.stat().st_size == 69 and image_size(path) == (width, height)  # the header alone is fine
    with pytest.raises(UnreadableImage) as error:
        load_image(path)
    message = str(error.value)
    assert message == (f"cannot read image {path}: image file is truncated (0 bytes not processed); "
                       "replace the file, or remove it from the input")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # refused by Pillow's own default, which nothing here changes


def sub_filtered(rows: np.ndarray, bpp: int) -> bytes:
    """PNG rows [H, bytes] with filter 1 (each byte minus the one a pixel to its left) on even rows and filter 2
    (minus the byte above) on odd rows, so that decoding must undo both."""
    out = []
    for i, row in enumerate(rows.astype(np.int64)):
        before = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]]) if i % 2 == 0 else rows[i - 1].astype(np.int64)
        out.append(bytes([1 + i % 2]) + ((row - before) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


@pytest.mark.parametrize("channels, colour", [(3, 2), (4, 6)])
def test_sixteen_bit_colour_pngs_scale_by_1_over_257_as_grey_does(tmp_path, channels, colour):
    deep = np.random.default_rng(channels).integers(0, 65536, (5, 7, channels)).astype(">u2")
    deep[0, 0, :3] = 255, 383, 65535  # round(x / 257) = 1, 1, 255 where x >> 8 = 0, 1, 255
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(7, 5, sub_filtered(deep.view(np.uint8).reshape(5, -1), 2 * channels), colour, 16))
    source = load_image(path)
    expected = np.floor(deep.astype(np.int64) / 257 + 0.5).astype(np.uint8)
    assert source.rgb[0, 0].tolist() == [1, 1, 255] and not source.grey
    assert np.array_equal(source.rgb, expected[:, :, :3]) and (source.alpha is None) == (channels == 3)
    if channels == 4:
        assert np.array_equal(source.alpha, expected[:, :, 3])
    Image.fromarray(deep[:, :, 1].astype(np.uint16)).save(tmp_path / "grey.png")  # the grey path, same values
    assert np.array_equal(load_image(tmp_path / "grey.png").rgb[:, :, 0], source.rgb[:, :, 1])


def test_animated_images_give_their_first_frame_and_a_warning(tmp_path, chelsea, caplog):
    frames = [Image.fromarray(chelsea[:40, :50] // k) for k in (1, 2, 3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "still.gif")
    with caplog.at_level(logging.WARNING):
        first, still = load_image(tmp_path / "anim.gif"), load_image(tmp_path / "still.gif")
    assert np.array_equal(first.rgb, still.rgb) and first.rgb.shape == (40, 50, 3)
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'anim.gif'} has 3 frames: only the first is used"]


def test_gifs_are_found_and_links_that_lead_nowhere_are_named(tmp_path):
    make_tree(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "e.gif")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "sub" / "up").symlink_to(tmp_path)  # a folder loop: not followed, so nothing recurses
    (tmp_path / "notes.lnk").symlink_to(tmp_path / "gone.txt")  # not an image: ignored like notes.txt
    found, skipped = expand_inputs(tmp_path)
    assert found == [tmp_path / n for n in ("a.png", "b.jpg", "e.gif", "sub/c.png", "sub/deeper/d.PNG")]
    assert skipped == [f"{tmp_path / 'dangling.png'} is a link to {tmp_path / 'gone.png'}, which does not exist: "
                       "fix or remove the link",
                       f"{tmp_path / 'loop.png'} is a symbolic link loop: fix or remove the link",
                       f"{tmp_path / 'sub' / 'up'} is a link to a folder, which is not searched: give that folder "
                       "as its own input"]
    found, skipped = expand_inputs(str(tmp_path / "**" / "*.png"))
    assert found == [tmp_path / "a.png", tmp_path / "sub" / "c.png"] and len(skipped) == 2
    with pytest.raises(FileNotFoundError, match=r"no images .* match input .*loo\*\.png; .*loop\.png is a symbolic"):
        expand_inputs(str(tmp_path / "loo*.png"))
