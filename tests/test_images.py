"""Tests for pipeline.images; every odd image is made here, in tmp_path.

Expected values are worked out by hand from how the test images were built,
not taken from the code under test.
"""

import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, features

from pipeline.images import (
    ImageError,
    atomic_write,
    load_image,
    read_png_text,
    resize_long_side,
    save_png,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    # load_image promises never to warn; make any warning fail the test.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def opened(path, attr):
    with Image.open(path) as img:  # closed at once: unclosed files warn
        return getattr(img, attr)


def pixel(arr, y, x):
    return tuple(float(v) for v in arr[y, x])


def assert_one_line_naming(exc_info, path):
    msg = str(exc_info.value)
    assert str(path) in msg
    assert "\n" not in msg


# --- orientation --------------------------------------------------------------

def _marked(size=(4, 2), block=1):
    """A black image, `size` blocks wide and tall, with a red top-left block."""
    w, h = size
    img = Image.new("RGB", (w * block, h * block), BLACK)
    img.paste(RED, (0, 0, block, block))
    return img


# Stored image is 4 wide, 2 tall, red at top-left (row 0, col 0).
# Orientation 3: rotated 180 -> red ends up bottom-right, shape unchanged.
# Orientation 6: row 0 is the visual right side, col 0 the visual top -> 2 wide,
#                4 tall, red top-right.
# Orientation 8: row 0 is the visual left side, col 0 the visual bottom -> red
#                bottom-left.
@pytest.mark.parametrize("orientation, shape, red_at", [
    (1, (2, 4), (0, 0)),
    (3, (2, 4), (1, 3)),
    (6, (4, 2), (0, 1)),
    (8, (4, 2), (3, 0)),
])
def test_exif_orientation_png(tmp_path, orientation, shape, red_at):
    path = tmp_path / "rot.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _marked().save(path, exif=exif)

    out = load_image(path)

    assert out.shape == (*shape, 3)
    assert pixel(out, *red_at) == RED
    assert out[..., 0].sum() == 255  # the red pixel is the only non-black one


def test_exif_orientation_jpeg(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    # 16 px blocks so JPEG's 8x8 DCT blocks do not smear the mark.
    _marked(block=16).save(path, exif=exif, quality=95)

    out = load_image(path)

    assert out.shape == (64, 32, 3)  # was 64 wide, 32 tall
    np.testing.assert_allclose(out[8, 24], RED, atol=12)  # middle of top-right block
    np.testing.assert_allclose(out[8, 8], BLACK, atol=12)  # top-left is now black


# --- modes --------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_cmyk(tmp_path, ext):
    img = Image.new("CMYK", (16, 8), (255, 0, 0, 0))  # pure cyan on the left
    img.paste((0, 0, 0, 255), (8, 0, 16, 8))  # pure black on the right
    path = tmp_path / f"cmyk.{ext}"
    img.save(path, quality=100) if ext == "jpg" else img.save(path)
    assert opened(path, "mode") == "CMYK"

    out = load_image(path)

    assert out.shape == (8, 16, 3)
    np.testing.assert_allclose(out[4, 2], (0, 255, 255), atol=4)  # cyan = no red
    np.testing.assert_allclose(out[4, 13], BLACK, atol=4)


def test_grey(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (3, 2), 100).save(path)
    out = load_image(path)
    assert out.dtype == np.float32
    assert out.shape == (2, 3, 3)
    assert np.all(out == 100.0)


def test_bilevel(tmp_path):
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    path = tmp_path / "bw.png"
    img.save(path)
    out = load_image(path)
    assert pixel(out, 0, 0) == BLACK
    assert pixel(out, 0, 1) == WHITE


def test_palette(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([*RED, *BLUE])
    img.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    img.save(path)
    out = load_image(path)
    assert pixel(out, 0, 0) == RED
    assert pixel(out, 0, 1) == BLUE


def test_palette_with_transparent_index(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([*RED, *BLUE])
    img.putpixel((1, 0), 1)
    path = tmp_path / "pal_t.png"
    img.save(path, transparency=1)  # index 1 (blue) fully transparent
    out = load_image(path, background=GREEN)
    assert pixel(out, 0, 0) == RED
    assert pixel(out, 0, 1) == GREEN


def test_rgba_composited_over_background(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (200, 100, 0, 64))
    img.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent
    img.putpixel((2, 0), (10, 20, 30, 255))  # opaque
    path = tmp_path / "rgba.png"
    img.save(path)

    out = load_image(path, background=(0, 0, 255))

    assert out.dtype == np.float32
    a = 64 / 255  # a*fg + (1-a)*bg, per channel, bg = (0, 0, 255)
    np.testing.assert_allclose(out[0, 0], (200 * a, 100 * a, 255 * (1 - a)), atol=1e-3)
    np.testing.assert_allclose(out[0, 0], (50.196, 25.098, 191.0), atol=1e-3)
    assert pixel(out, 0, 1) == (0, 0, 255)
    assert pixel(out, 0, 2) == (10, 20, 30)


def test_la_default_white_background(tmp_path):
    path = tmp_path / "la.png"
    Image.new("LA", (1, 1), (50, 128)).save(path)
    out = load_image(path)
    a = 128 / 255
    expected = 50 * a + 255 * (1 - a)  # a*grey + (1-a)*white
    np.testing.assert_allclose(out[0, 0], [expected] * 3, atol=1e-3)


@pytest.mark.parametrize("ext, dtype", [("png", "<u2"), ("tif", ">u2")])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, ext, dtype):
    values = np.array([[65535, 32896, 0, 257, 1000]], dtype=dtype)
    path = tmp_path / f"deep.{ext}"
    Image.fromarray(values).save(path)
    assert opened(path, "mode") in ("I;16", "I;16B", "I")

    out = load_image(path)

    assert out.dtype == np.float32
    assert out.shape == (1, 5, 3)
    expected = [255.0, 128.0, 0.0, 1.0, 1000 / 257]  # value / 257, never clipped
    np.testing.assert_allclose(out[0, :, 1], expected, rtol=1e-6)
    assert np.all(out[..., 0] == out[..., 2])


ANIMATED = ["gif", "png"] + (["webp"] if features.check("webp") else [])


@pytest.mark.parametrize("ext", ANIMATED)
def test_animated_gives_first_frame(tmp_path, ext):
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim.{ext}"
    kwargs = {"lossless": True} if ext == "webp" else {}
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=100, **kwargs
    )
    assert opened(path, "n_frames") == 3

    out = load_image(path)

    assert out.shape == (4, 4, 3)
    np.testing.assert_allclose(out.reshape(-1, 3), [RED] * 16, atol=1)


# --- refused files ------------------------------------------------------------

def _png_header_only(width, height):
    """A PNG whose header claims width x height, with a token of pixel data."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_too_many_pixels_from_header(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(9000, 9000))  # 81 Mpx claimed, ~300 bytes on disk
    with pytest.raises(ImageError, match="9000x9000") as exc_info:
        load_image(path, max_pixels=1_000_000)
    assert_one_line_naming(exc_info, path)


def test_too_many_pixels_small_real_image(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ImageError, match="4x4") as exc_info:
        load_image(path, max_pixels=10)
    assert_one_line_naming(exc_info, path)
    assert load_image(path, max_pixels=16).shape == (4, 4, 3)  # the limit is inclusive


def test_pillow_bomb_error_becomes_image_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20000, 20000))  # 400 Mpx: Pillow itself refuses
    with pytest.raises(ImageError, match="too large") as exc_info:
        load_image(path, max_pixels=10**12)
    assert_one_line_naming(exc_info, path)


def test_pillow_bomb_warning_is_silent_and_max_pixels_rules(tmp_path, monkeypatch):
    path = tmp_path / "warn.png"
    Image.new("RGB", (4, 4), RED).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 16 px: Pillow would warn
    # warnings are errors here (autouse fixture), so any leak would fail this.
    assert pixel(load_image(path), 0, 0) == RED
    with pytest.raises(ImageError, match="4x4"):
        load_image(path, max_pixels=15)


def _noisy_image(size=64):
    rng = np.random.default_rng(0)  # noise, so the file does not compress to nothing
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated(tmp_path, ext):
    whole = tmp_path / f"whole.{ext}"
    _noisy_image().save(whole)
    data = whole.read_bytes()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="not a readable image") as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path)


def test_corrupt_pixel_data(tmp_path):
    whole = tmp_path / "whole.png"
    _noisy_image().save(whole)
    data = bytearray(whole.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10: start + 2000] = bytes(1990)  # zero out part of the zlib stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImageError, match="cannot identify image file") as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\nat all\n")
    with pytest.raises(ImageError) as exc_info:
        load_image(path)
    expected = f"{path}: not a readable image (cannot identify image file)"
    assert str(exc_info.value) == expected


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(ImageError, match="No such file") as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path)


def test_directory(tmp_path):
    with pytest.raises(ImageError) as exc_info:
        load_image(tmp_path)
    assert_one_line_naming(exc_info, tmp_path)


def test_image_error_is_a_plain_value_error(tmp_path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(ValueError) as exc_info:
        load_image(path)
    assert type(exc_info.value) is ImageError
    again = pickle.loads(pickle.dumps(exc_info.value))  # crosses process boundaries
    assert str(again) == str(exc_info.value)


# --- resize -------------------------------------------------------------------

@pytest.mark.parametrize("shape, size, expected", [
    ((20, 30), 15, (10, 15)),  # landscape, halved
    ((40, 10), 8, (8, 2)),  # portrait, a fifth
    ((20, 30), 60, (40, 60)),  # upscaling
    ((1, 100), 10, (1, 10)),  # short side would round to 0: kept at 1
    ((3, 7), 5, (2, 5)),  # 3 * 5/7 = 2.14 -> 2
    ((5, 7), 5, (4, 5)),  # 5 * 5/7 = 3.57 -> 4 (rounded, not truncated)
])
def test_resize_long_side_shape(shape, size, expected):
    img = np.full((*shape, 3), 10.0, dtype=np.float32)
    out = resize_long_side(img, size)
    assert out.shape == (*expected, 3)
    assert out.dtype == np.float32


def test_resize_noop_returns_same_object():
    img = np.zeros((5, 8, 3), dtype=np.float32)
    assert resize_long_side(img, 8) is img


@pytest.mark.parametrize("value", [77.25, 0.5])
def test_resize_keeps_constant_and_float_precision(value):
    img = np.full((30, 50, 3), value, dtype=np.float32)
    for size in (20, 80):
        out = resize_long_side(img, size)
        np.testing.assert_allclose(out, value, atol=1e-4)  # 0.5 did not become 0 or 1


def test_resize_keeps_channels_apart():
    img = np.zeros((20, 40, 3), dtype=np.float32)
    img[..., 0], img[..., 1], img[..., 2] = 200.0, 100.0, 0.5
    out = resize_long_side(img, 10)
    np.testing.assert_allclose(out[2, 3], (200.0, 100.0, 0.5), atol=1e-3)


def test_resize_antialiases():
    # A 1-px checkerboard averages to mid-grey when shrunk with a low-pass filter;
    # plain subsampling would give all 0 or all 255.
    img = np.zeros((64, 64, 3), dtype=np.float32)
    img[::2, ::2] = img[1::2, 1::2] = 255.0
    out = resize_long_side(img, 16)
    np.testing.assert_allclose(out[4:12, 4:12], 127.5, atol=5)


# --- saving -------------------------------------------------------------------

def test_save_png_round_trip(tmp_path):
    img = np.array([[[10.4, 10.6, -5.0], [300.0, 254.6, 0.0]]], dtype=np.float32)
    path = tmp_path / "out.png"
    text = {"prompt": "a cat, in the style of Monet", "seed": "42", "note": "café"}

    save_png(path, img, text=text)

    with Image.open(path) as check:  # independent of load_image
        assert check.format == "PNG" and check.mode == "RGB" and check.size == (2, 1)
        assert check.getpixel((0, 0)) == (10, 11, 0)
        assert check.getpixel((1, 0)) == (255, 255, 0)
    assert read_png_text(path) == text
    assert pixel(load_image(path), 0, 0) == (10, 11, 0)
    assert os.listdir(tmp_path) == ["out.png"]


def test_save_png_without_text(tmp_path):
    path = tmp_path / "plain.png"
    save_png(path, np.zeros((2, 2, 3), dtype=np.float32))
    assert read_png_text(path) == {}


def test_read_png_text_of_non_png(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (2, 2)).save(path)
    with pytest.raises(ImageError) as exc_info:
        read_png_text(path)
    assert_one_line_naming(exc_info, path)


def test_save_png_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    path.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        save_png(path, np.zeros((2, 2, 3), dtype=np.float32))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.png"]


# --- atomic_write -------------------------------------------------------------

def test_atomic_write_bytes_and_str(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "héllo")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == b"h\xc3\xa9llo"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt"]


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("a much longer old content\n" * 100)
    atomic_write(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_accepts_str_path_and_gives_normal_permissions(tmp_path):
    path = str(tmp_path / "f.txt")
    atomic_write(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_bad_data_keeps_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # not bytes: fails after the temp file exists
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_failing_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def broken_replace(src, dst):
        assert os.path.dirname(src) == os.path.dirname(dst)  # temp file beside target
        with open(src, "rb") as f:
            assert f.read() == b"new"  # fully written before the rename
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
