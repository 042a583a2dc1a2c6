"""A clip: a video file (decoded by ffmpeg through imageio-ffmpeg) or a frame sequence (a glob
of image files in natural order), checked cheaply and read into RGB float32 frames in 0..255.

imageio-ffmpeg is the library under imageio's ffmpeg plugin; the plugin itself is not used:
it refuses some extensions (.gif) and cannot be told to keep a variable-rate clip's frames as
they are (see _DECODE).

probe() is the check a plan makes before anything starts: for a video, ffmpeg decodes the
stream without handing any pixels over (so the frame count is exact, and a file cut short is
caught now, not after hours) and the first frame is read; for a frame sequence, every file's
header is read and its data verified, no pixels decoded. read_frames() then yields the frames
a selection asks for. Every bad input raises ClipError: one line naming the file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline import config, images

# Read through ffmpeg. Pillow reads GIFs too, but as one image (their first frame).
VIDEO_EXTENSIONS = config.VIDEO_EXTENSIONS
_GLOB_CHARS = re.compile(r"[*?\[]")
_EXIF_ORIENTATION = 0x0112  # values 5..8 turn the picture a quarter: width and height swap


class ClipError(images.ImageError):
    """A clip that cannot be used; the message is one line naming the file (or the glob)."""


def _error(path, problem) -> ClipError:
    return ClipError(" ".join(f"{os.fspath(path)}: {problem}".split()))


@dataclass(frozen=True)
class ClipInfo:
    """What probe() learnt of a clip without decoding it into pixels."""

    source: str  # the video's path or the frame sequence's glob, as given
    files: tuple[str, ...] | None  # a frame sequence's files in order; None for a video
    count: int  # frames in the source, before any selection
    shape: tuple[int, int]  # (height, width) of every frame
    fps: float | None  # the video's frame rate; None for a frame sequence (files carry none)

    def select(self, start: int | None = 0, stop: int | None = None, step: int = 1) -> range:
        """The indices (0-based) of the frames start, start + step, ... before stop, as a
        Python slice takes them (stop None: to the end). Empty selections are refused."""
        if step is None or step < 1:
            raise _error(self.source, f"frame step must be at least 1, not {step}")
        chosen = range(self.count)[slice(start, stop, step)]
        if not chosen:
            raise _error(self.source, f"frames start={start} stop={stop} step={step} select "
                                      f"none of its {self.count} frames")
        return chosen


def kind(source) -> str:
    """'frames' for a glob or a folder, 'video' for a file with a video extension, else
    'image'. Says how `source` would be read, not whether it can be."""
    text = os.fspath(source)
    if _GLOB_CHARS.search(text) or os.path.isdir(text):
        return "frames"
    if os.path.splitext(text)[1].lower() in VIDEO_EXTENSIONS:
        return "video"
    return "image"


def probe(source, files: list[str] | None = None) -> ClipInfo:
    """Check a clip without decoding its pixels (a video's first frame aside) and describe it.
    `files`: a frame sequence's files to check and take, in order (default: all it matches).
    Raises ClipError (an images.ImageError, so a ValueError) naming the file."""
    source = os.fspath(source)
    if kind(source) == "frames":
        return _probe_frames(source, files)
    return _probe_video(source)


def read_frames(info: ClipInfo, indices: range | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) for each index in `indices` (default all), in order; each frame (H, W, 3)
    float32 RGB in 0..255. A video is decoded from its start (exact, unlike seeking) and the
    frames between the chosen ones are dropped."""
    indices = range(info.count) if indices is None else indices
    if info.files is not None:
        for i in indices:
            yield i, _frame_file(info, info.files[i])
        return
    wanted = set(indices)
    last = max(wanted, default=-1)
    frames = _decode(info.source)
    try:
        next(frames)  # the frame rate
        i = -1
        for i, frame in enumerate(frames):
            if i in wanted:
                if frame.shape[:2] != info.shape:
                    raise _error(info.source, f"frame {i} is {frame.shape[1]}x{frame.shape[0]},"
                                              f" its first was {info.shape[1]}x{info.shape[0]}")
                yield i, frame.astype(np.float32)
            if i >= last:
                return
        raise _error(info.source, f"ends after {i + 1} frames, {info.count} were counted "
                                  "(changed since it was checked?)")
    finally:
        frames.close()


# --------------------------------------------------------------------------- frame sequences


def _probe_frames(source: str, files: list[str] | None = None) -> ClipInfo:
    if files is None:
        files = config.sequence_files(source)  # the order the run id hashes them in
    if not files:
        raise _error(source, "no frame files match")
    first = None
    for path in files:
        shape = _header_shape(path)
        if first is None:
            first = shape
        elif shape != first:
            raise _error(path, f"is {shape[1]}x{shape[0]}, the first frame ({files[0]}) "
                               f"{first[1]}x{first[0]}: every frame must have one size")
    return ClipInfo(source, tuple(files), len(files), first, None)


def _header_shape(path: str) -> tuple[int, int]:
    """(height, width) as load_image will give it (EXIF orientation applied), from the header;
    the file's data is checked (PNG checksums and completeness; a JPEG decoded at 1/8 scale)
    without decoding it whole."""
    try:
        with warnings.catch_warnings():  # size limits are load_image's to enforce
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if _orientation(img) in (5, 6, 7, 8):
                    w, h = h, w
                if img.format == "JPEG":  # verify() reads no JPEG data; DCT scaling is cheap
                    img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                    img.load()
                    return h, w
            with Image.open(path) as img:  # verify() must come first after opening
                img.verify()
    except (*images._DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise _error(path, f"not a readable image ({images._reason(exc)})") from None
    return h, w


def _orientation(img) -> int:
    if img.format == "PNG":  # its getexif() decodes the pixels, to look for eXIf after them
        exif = Image.Exif()
        if "exif" in img.info:
            exif.load(img.info["exif"])
    else:
        exif = img.getexif()
    return exif.get(_EXIF_ORIENTATION, 1)


def _frame_file(info: ClipInfo, path: str) -> np.ndarray:
    frame = images.load_image(path)  # its errors name the file already
    if frame.shape[:2] != info.shape:
        raise _error(path, f"is {frame.shape[1]}x{frame.shape[0]}, the clip's frames "
                           f"{info.shape[1]}x{info.shape[0]} (changed since it was checked?)")
    return frame


# --------------------------------------------------------------------------- videos

# Every decoded frame once, in order: the first video stream, no frames duplicated or dropped
# to make a constant rate (ffmpeg would repeat a GIF's long frames, each a full optimisation).
# A variable-rate source plays back at its average rate. (-fps_mode: ffmpeg 5.1 and later.)
_DECODE = ["-map", "0:v:0", "-fps_mode", "passthrough"]


def _ffmpeg(path: str) -> str:
    """The ffmpeg to run: IMAGEIO_FFMPEG_EXE if set, else the binary in imageio-ffmpeg's
    wheel, else one on PATH (imageio_ffmpeg's order)."""
    hint = "install imageio-ffmpeg (its wheel ships ffmpeg) or put ffmpeg on PATH"
    try:
        import imageio_ffmpeg
    except ImportError:
        raise _error(path, f"reading a video needs ffmpeg: {hint}") from None
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:
        raise _error(path, f"reading a video needs ffmpeg and none was found: {hint}") from None
    # imageio_ffmpeg takes IMAGEIO_FFMPEG_EXE as given, without trying it.
    found = exe if os.path.dirname(exe) else shutil.which(exe)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        where = "IMAGEIO_FFMPEG_EXE=" if os.environ.get("IMAGEIO_FFMPEG_EXE") else ""
        raise _error(path, f"reading a video needs ffmpeg and {where}{exe} cannot be run: "
                           f"{hint}")
    return found


def _ffmpeg_reason(log: str) -> str:
    """What ffmpeg's log says went wrong, in a few words: its lines lose their '[in#0 @ 0x..]'
    prefixes and the last error line is quoted."""
    lines = [re.sub(r"^(\[[^\]]*\]\s*)+", "", line).strip()
             for line in str(log).replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    if any(s in line for line in lines for s in (
            "does not contain any stream", "received no packets", "matches no streams",
            "for option 'map'")):
        return "no video frames in it"
    for line in reversed(lines):
        match = re.search(r"Error opening input(?: files?)?: (.*)", line)
        if match:
            return f"not a readable video (ffmpeg: {match.group(1)})"
    return f"not a readable video (ffmpeg: {lines[-1] if lines else 'no output'})"


def _probe_video(path: str) -> ClipInfo:
    if not os.path.exists(path):
        raise _error(path, "file not found")
    if not os.path.isfile(path):
        raise _error(path, "not a file")
    exe = _ffmpeg(path)
    # Decoded into ffmpeg's null output, no pixels crossing a pipe: the count is exact (the
    # header's duration x fps is not, and misses a file cut short), in a fraction of the time
    # a stylised frame takes.
    done = subprocess.run([exe, "-hide_banner", "-nostdin", "-i", path, *_DECODE, "-f", "null",
                           "-"], capture_output=True, text=True, errors="replace")
    counts = re.findall(r"frame=\s*(\d+)", done.stderr)
    if done.returncode != 0 or not counts:
        raise _error(path, _ffmpeg_reason(done.stderr))
    if int(counts[-1]) == 0:
        raise _error(path, "no video frames in it")
    frames = _decode(path)
    try:
        fps = next(frames)
        first = next(frames, None)  # its shape as decoded (a phone's rotation applied)
    finally:
        frames.close()
    if first is None:
        raise _error(path, "no video frames in it")
    return ClipInfo(path, None, int(counts[-1]), first.shape[:2], fps)


def _decode(path: str) -> Iterator:
    """The video's frame rate (None if unknown), then its frames as uint8 (H, W, 3) arrays."""
    import imageio_ffmpeg

    _ffmpeg(path)  # read_frames finds the same one
    frames = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24", input_params=["-nostdin"],
                                        output_params=_DECODE)
    try:
        meta = next(frames)
    except (OSError, RuntimeError) as exc:  # with ffmpeg's log
        frames.close()
        raise _error(path, _ffmpeg_reason(exc)) from None
    w, h = meta["size"]
    try:
        yield float(meta.get("fps") or 0) or None
        for data in frames:
            yield np.frombuffer(data, np.uint8).reshape(h, w, 3)
    except RuntimeError as exc:  # a frame that could not be read whole
        raise _error(path, _ffmpeg_reason(exc)) from None
    finally:
        frames.close()
