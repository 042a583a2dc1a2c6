"""Each run's estimate from its setup's calibration: peak memory at its largest stage, seconds
per iteration and in all, the largest size that fits, and what its checkpoints take on disk."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import config, images, scales
from pipeline.estimate.calibration import (
    CALIBRATION_HISTORY,
    GB,
    calibration,
    gpu_list,
    setup_of,
)

STATE_SHOWN = 100e6  # a checkpoint's state.npz at least this large is named in the line


@dataclass
class Estimate:
    run_id: str
    width: int
    height: int
    peak_bytes: float  # at the largest stage
    seconds_per_iteration: float  # at the largest stage
    seconds: float  # every stage's iterations
    limit_bytes: float  # what one run may use here
    device: str
    largest_size: int  # the largest `size` that fits (same aspect, multiple of 16)
    state_bytes: float = 0.0  # the checkpoint's state.npz on disk, while the run is under way
    frames: int = 0  # a clip's frames (0: an image)
    frame_seconds: float = 0.0  # a clip's frame after the first

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.limit_bytes

    def line(self) -> str:
        disk = (f", checkpoints {self.state_bytes / GB:.2f} GB on disk (state.npz)"
                if self.state_bytes >= STATE_SHOWN else "")
        clip = (f"{_duration(self.frame_seconds)} per frame x {self.frames} frames, "
                if self.frames else "")
        return (f"estimate: {self.width}x{self.height}: peak memory {self.peak_bytes / GB:.2f} GB "
                f"of {self.limit_bytes / GB:.1f} GB, {self.seconds_per_iteration:.3g} s/iteration, "
                f"{clip}about {_duration(self.seconds)} in all ({self.device}){disk}")

    def refusal(self) -> str:
        return (f"run {self.run_id}: estimated peak memory {self.peak_bytes / GB:.1f} GB at "
                f"{self.width}x{self.height} exceeds the {self.limit_bytes / GB:.1f} GB this "
                f"machine has for it ({self.device}); the largest size that fits is "
                f"{self.largest_size} (--set size={self.largest_size}, and scales to match)")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def scaled_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(height, width) of a width x height image (as headers give it) scaled to `size` on its
    long side, as images.resize_long_side scales it."""
    return config.long_side_shape(height, width, size)


def generated_shape(content_path: str, size: int) -> tuple[int, int]:
    """(height, width) of the generated image at `size`, from the content file's header (EXIF
    rotation does not change the pixel count). images.ImageError if it cannot be read."""
    return scaled_shape(*images.read_size(content_path), size)


def state_bytes(method: str, history: int, pixels: int) -> float:
    """The size of a checkpoint's state.npz (uncompressed float32 arrays): the image; for the
    device methods the gradient and best image too, and lbfgs's s and y (history each) and
    their two history x history products, Adam's two moments."""
    vectors = {"scipy": 1, "lbfgs": 3 + 2 * history, "adam": 5}.get(method, 1)
    square = 2 * history * history if method == "lbfgs" else 0
    return 4.0 * (vectors * 3 * pixels + square)


def available_memory(cal: dict) -> float:
    """Bytes a run may use: the GPU's memory (as the backend reported its limit, else as
    nvidia-smi does), or the RAM available now (MemAvailable) on the CPU."""
    if not cal["device"].startswith("cpu"):
        if cal.get("device_memory"):
            return float(cal["device_memory"])
        gpus = gpu_list()
        if gpus and gpus[0]["memory"]:
            return float(gpus[0]["memory"])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


SCIPY_BYTES = 2 * 3 * 8  # per pixel and correction: s and y, float64, three channels


def estimate(cfg: config.Config, run_id: str, cal: dict, limit: float,
             read_size=images.read_size, clip=None) -> Estimate:
    """The run's estimate from a calibration and `limit`, the bytes it may use. The content's
    and style images' sizes come from their headers (`read_size(path) -> (width, height)`);
    images.ImageError when one cannot be read. A clip (video.plan.Clip) is its frames' size,
    and each frame one run: per frame x frames (the flow is a few percent more, not counted)."""
    content = read_size(cfg.content) if clip is None else clip.shape[::-1]
    styles = [read_size(path) for path in config.style_list(cfg.style)]
    (a, b), c, (t, u) = cal["memory"], cal["style"], cal["seconds"]
    method, m = cfg.optimizer.method, config.history(cfg.optimizer)
    if method == "lbfgs" and cal["history"]:
        # Measured: the calibration's own history is in b and u already; never less than it.
        longer = max(0, m - cal["history"]["at"][0])
        b, u = b + cal["history"]["memory"] * longer, u + cal["history"]["seconds"] * longer
    elif method == "scipy" and cal["device"].startswith("cpu"):
        # Exact: scipy's history is host memory (on a GPU, not the device's that is checked).
        b += SCIPY_BYTES * (m - CALIBRATION_HISTORY)
    seconds = 0.0
    for stage in scales.stages(cfg):
        h, w = scaled_shape(*content, stage.size)
        seconds += (stage.last - stage.first + 1) * (t + u * h * w)
    h, w = scaled_shape(*content, cfg.size)  # the last stage: the largest images
    pixels = h * w
    style_pixels = sum(math.prod(scaled_shape(*s, config.style_size(cfg))) for s in styles)
    growing = b * pixels + c * style_pixels  # grows as size squared, style_scale held
    if limit <= a:
        largest = 0
    elif growing <= 0 or math.isinf(limit):
        largest = config.MAX_SIZE
    else:
        largest = min(config.MAX_SIZE, int(cfg.size * math.sqrt((limit - a) / growing)))
        largest = largest // 16 * 16
    disk = state_bytes(method, m, pixels) if cfg.checkpoint_every else 0.0
    frames, frame_seconds = 0, 0.0
    if clip is not None:
        from pipeline.video import plan as clips

        frames, frame_seconds = clip.count, cfg.optimizer.iterations * (t + u * pixels)
        seconds = clips.total_iterations(cfg, clip.count) * (t + u * pixels)
    return Estimate(run_id, w, h, a + growing, t + u * pixels, seconds, limit, cal["device"],
                    largest, disk, frames, frame_seconds)


def for_jobs(jobs, workers: int = 1, log=None, on_skip=None) -> dict[str, Estimate]:
    """Each planned run's estimate, with `workers` runs sharing the device at once. A run
    whose content or style image cannot be read gets none (it fails by itself, naming the
    file, when it runs): `on_skip(job, message)` hears of it. Calibrates only the setups of
    runs it estimates."""
    out = {}
    sizes: dict[str, tuple[int, int] | images.ImageError] = {}

    def read_size(path):  # the runs of a sweep share their images: each header read once
        if path not in sizes:
            try:
                sizes[path] = images.read_size(path)
            except images.ImageError as e:
                sizes[path] = e
        if isinstance(sizes[path], images.ImageError):
            raise sizes[path]
        return sizes[path]

    calibrations: dict[str, tuple[dict, float]] = {}
    for job in jobs:
        clip = getattr(job, "clip", None)  # checked when planned: its size is known
        try:
            for path in ([] if clip else [job.cfg.content]) + config.style_list(job.cfg.style):
                read_size(path)
        except images.ImageError as e:
            if on_skip:
                on_skip(job, str(e))
            continue
        setup = setup_of(job.cfg)
        name = " ".join(setup.values())
        if name not in calibrations:
            cal = calibration(log, setup)
            devices = max(1, len(gpu_list())) if not cal["device"].startswith("cpu") else 1
            calibrations[name] = cal, available_memory(cal) / max(1, math.ceil(workers / devices))
        cal, limit = calibrations[name]
        out[job.run_id] = estimate(job.cfg, job.run_id, cal, limit, read_size, clip)
    return out
