"""Reading any image into RGB float pixels, resizing, and saving PNGs atomically.

Pixels travel through the pipeline as float32 arrays of shape (H, W, 3),
RGB, values in 0..255. Only the edges (loading, saving) deal with Pillow's
many modes and file formats.
"""

import contextlib
import os
import struct
import tempfile
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from pipeline.config import long_side_shape

MAX_PIXELS = 100_000_000

# Modes that hold more than 8 bits per sample; Pillow's convert("RGB") would clip
# them at 255 instead of scaling, turning most of a 16-bit photo white.
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

# What Pillow raises for files it cannot decode: a missing or unreadable path
# (OSError), an unknown format (UnidentifiedImageError, an OSError), truncation
# (OSError), and malformed headers or data (SyntaxError, ValueError, EOFError,
# struct.error, zlib.error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

# mkstemp creates files readable only by their owner; give saved files the
# permissions an ordinary open() would. The umask can only be read by setting
# it, so do that once, at import.
_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file."""


def _error(path, problem):
    # Plain one-argument exception (so it pickles across processes); newlines
    # from Pillow's messages or odd file names are folded into spaces.
    return ImageError(" ".join(f"{os.fspath(path)}: {problem}".split()))


def _reason(exc):
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file"  # Pillow's own text repeats the path
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # "No such file or directory", without the path again
    return str(exc) or type(exc).__name__


def load_image(path, background=(255, 255, 255), max_pixels=MAX_PIXELS) -> np.ndarray:
    """Read an image file as a float32 (H, W, 3) RGB array with values in 0..255.

    EXIF orientation is applied, transparency is composited over `background`,
    16-bit samples are scaled down, and animated files give their first frame.
    """
    try:
        # Our own max_pixels check below is the policy, so Pillow's warning for
        # images above its default limit (~89 Mpx) is silenced rather than shown;
        # its hard error (above twice that) still ends up as an ImageError.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads only the header, and frame 0
                w, h = img.size
                if w * h > max_pixels:
                    raise _error(
                        path, f"image too large ({w}x{h} = {w * h} pixels,"
                        f" limit {max_pixels})")
                img.load()  # decode fully here, so a truncated file fails now
                # Returns a new image, so it outlives the closed file.
                img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own, larger limit
        raise _error(path, f"image too large ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise _error(path, f"not a readable image ({_reason(exc)})") from None

    if img.mode in _WIDE_MODES:
        # 16-bit grey: 65535 / 257 == 255, so the full range maps onto 0..255.
        grey = np.asarray(img).astype(np.float32) / 257
        return np.repeat(grey[:, :, None], 3, axis=2)

    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:] / 255
        bg = np.asarray(background, dtype=np.float32)
        return rgba[:, :, :3] * alpha + bg * (1 - alpha)

    # CMYK, grey, bilevel, palette, YCbCr, ... all have a conversion to RGB.
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def read_size(path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its pixels; ImageError
    naming the file when it is not an image Pillow can open (a truncated one passes: its
    header is whole)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.size
    except Image.DecompressionBombError as exc:
        raise _error(path, f"image too large ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise _error(path, f"not a readable image ({_reason(exc)})") from None


def resize_long_side(img: np.ndarray, size: int) -> np.ndarray:
    """Scale `img` (H, W, C) so that its longer side is `size` pixels (Lanczos)."""
    if size < 1:
        raise ValueError(f"size must be at least 1, not {size}")
    return resize_to(img, long_side_shape(*img.shape[:2], size))


def resize_to(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Scale `img` (H, W, C) to exactly `shape` (height, width), antialiased (Lanczos)."""
    if img.shape[:2] == tuple(shape):
        return img
    new_h, new_w = shape
    # Pillow resizes float data only as single-channel "F" images, so do each
    # channel on its own; this keeps full float precision (no 8-bit rounding).
    # Lanczos overshoots slightly past 0..255 at sharp edges: clip, so that pixels stay
    # inside the optimiser's bounds.
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32))
                   .resize((new_w, new_h), Image.Resampling.LANCZOS))
        for c in range(img.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255)


def load_mask(path) -> np.ndarray:
    """A mask image as a float32 (H, W) array in 0..1: the mean of its RGB channels, white 1
    and black 0; transparent pixels count as black. A mask black everywhere is refused."""
    mask = load_image(path, background=(0, 0, 0)).mean(axis=2) / 255
    if not mask.any():
        raise _error(path, "mask is black everywhere: it would select nothing")
    return mask.astype(np.float32)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Scale a (H, W) mask in 0..1 to exactly `shape`, stretching if the aspect differs."""
    return resize_to(np.asarray(mask, np.float32)[:, :, None] * 255, shape)[:, :, 0] / 255


@contextlib.contextmanager
def atomic_open(path):
    """Yield a binary file that replaces `path` only once everything was written (for a
    writer that streams; atomic_write for data already in memory).

    The data goes to a temporary file in the same folder (os.replace is atomic
    only within one file system), is flushed to disk, then renamed over `path`.
    On any failure the temporary file is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path, data: bytes | str) -> None:
    """Write bytes (or str, as UTF-8) to `path` so that it is never half-written."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_open(path) as f:
        f.write(data)


def save_png(path, img: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Save an RGB array as an 8-bit PNG, atomically, with `text` as tEXt chunks."""
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)  # falls back to iTXt for non-Latin-1 text
    with atomic_open(path) as f:
        Image.fromarray(pixels).save(f, format="PNG", pnginfo=info)


def read_png_text(path) -> dict[str, str]:
    """Return the text chunks (tEXt, zTXt, iTXt) of a PNG file as a dict."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # .text, unlike .info, also reads chunks placed after the pixel data.
            with Image.open(path, formats=["PNG"]) as img:
                return {str(k): str(v) for k, v in img.text.items()}
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise _error(path, f"not a readable PNG ({_reason(exc)})") from None
