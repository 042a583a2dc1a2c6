"""A clip as a run's plan sees it: checked before anything starts, so that a bad clip exits 2
naming its file instead of failing an hour into a batch, and described for the run, its
estimate and `status` (which frames, their size, the output's frame rate, the iterations).

No framework here: the command line plans with it before any run starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline import config
from pipeline.video import frames

SEQUENCE_FPS = 24.0  # a frame sequence's rate when the config gives none: files carry none


@dataclass(frozen=True)
class Clip:
    """A checked clip: `info` from the probe, the source frames stylised (0-based indices into
    info's frames, in order), and result.mp4's frame rate."""

    info: frames.ClipInfo
    indices: range
    fps: float

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the source frames."""
        return self.info.shape


_PROBES: dict[tuple, frames.ClipInfo] = {}  # a sweep's runs share their clip: probed once


def check(cfg: config.Config) -> Clip:
    """The clip of one planned run (globs and sweeps expanded), or ConfigError naming the file:
    a video ffmpeg cannot read (or no ffmpeg), no frames, frames of different sizes, a broken
    frame file, a selection of no frame, frames too small for the deepest layer at `size`."""
    video = cfg.video
    selection = video.frames
    try:
        files = config.clip_files(cfg)
        if files is not None:  # a sequence: the selected files are the clip (only they are read)
            if not files and config.sequence_files(cfg.content):
                raise frames.ClipError(
                    f"{cfg.content}: frames start={selection.start} stop={selection.stop} "
                    f"step={selection.step} select none of its "
                    f"{len(config.sequence_files(cfg.content))} frames")
            info = _probe(cfg.content, files)
            indices = range(info.count)
        else:
            info = _probe(cfg.content, None)
            indices = info.select(selection.start, selection.stop, selection.step)
    except frames.ClipError as e:
        raise config.ConfigError(f"content: {e}") from None
    _check_size(cfg, info)
    # By default the clip plays in the source's time: every step-th frame at 1/step the rate.
    source_fps = info.fps if files is None and info.fps else SEQUENCE_FPS
    return Clip(info, indices, video.fps or source_fps / selection.step)


def _probe(source: str, files: list[str] | None) -> frames.ClipInfo:
    """frames.probe, once per process for each version of the files (an edit changes the size
    or the modification time, and so the key)."""
    paths = files if files is not None else [source]
    key = (source, *((os.path.realpath(p), *_stamp(p)) for p in paths))
    if key not in _PROBES:
        _PROBES[key] = frames.probe(source, files)
    return _PROBES[key]


def _stamp(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return (-1, -1)  # missing: the probe says so, naming it
    return stat.st_size, stat.st_mtime_ns


def _check_size(cfg: config.Config, info: frames.ClipInfo) -> None:
    """Frames scaled to `size` keep the short side the deepest layer needs (as
    config.check_stage_sizes checks an image's, from its header)."""
    block = config.deepest_block(cfg.model)
    need = 2 ** (block - 1)
    h, w = config.long_side_shape(*info.shape, cfg.size)
    if min(h, w) < need:
        raise config.ConfigError(
            f"size: at {cfg.size} px the frames of {cfg.content} ({info.shape[1]}x"
            f"{info.shape[0]}) are {w}x{h} px, and layers of block {block} need a short side "
            f"of at least {need} px")


def total_iterations(cfg: config.Config, count: int) -> int:
    """Every frame's iterations: the first frame's budget, then optimizer.iterations each."""
    if count < 1:
        return 0
    return (config.first_iterations(cfg.video, cfg.optimizer)
            + (count - 1) * cfg.optimizer.iterations)
