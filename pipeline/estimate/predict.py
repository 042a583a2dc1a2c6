"""Each run's estimate from its setup's calibration: peak memory at its largest stage, seconds
per iteration and in all, the largest size that fits, what its checkpoints take on disk, and
whether it runs whole or tile by tile (`tile`, pipeline/tile: auto takes the largest core that
fits). The figures for one way of running it are figures.py's."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline import config, images
from pipeline.estimate.calibration import GB, calibration, gpu_list, setup_of
from pipeline.estimate.figures import (
    STYLE_PIXEL_BYTES,
    Model,
    optimiser_bytes,
    scaled_shape,
)
from pipeline.tile import geometry

STATE_SHOWN = 100e6  # a checkpoint's state.npz at least this large is named in the line
ENV_LIMIT = "PIPELINE_MEMORY_LIMIT"  # e.g. 8G: the most memory one run may use (a cap)
# auto chooses the largest core whose estimate leaves this share of the memory unused if one
# does (the estimate is within ~15% of measured peaks: a smaller core costs a little time, a
# run killed for memory in the night its whole budget), else the largest that fits at all.
AUTO_HEADROOM = 0.1


@dataclass(frozen=True)
class Tiled:
    """A run computed tile by tile at one core size: its figures at the largest stage."""

    core: int
    tiles: int
    peak_bytes: float
    seconds_per_iteration: float
    seconds: float
    optimiser_bytes: float  # of peak_bytes: the optimiser's vectors

    @property
    def optimiser_dominates(self) -> bool:
        """The optimiser's vectors are most of the peak: a smaller core hardly helps."""
        return self.optimiser_bytes >= 0.5 * self.peak_bytes


@dataclass
class Estimate:
    run_id: str
    width: int
    height: int
    peak_bytes: float  # at the largest stage, as the run will run (whole or tiled)
    seconds_per_iteration: float  # at the largest stage
    seconds: float  # every stage's iterations
    limit_bytes: float  # what one run may use here
    device: str
    largest_size: int  # the largest `size` that fits whole (same aspect, multiple of 16)
    state_bytes: float = 0.0  # the checkpoint's state.npz on disk, while the run is under way
    tile: int | None = None  # the tile core the run uses (config.tile, or auto's choice)
    tiles: int = 1  # at its largest stage
    asked: str | int = "auto"  # config.tile as set
    whole_bytes: float = 0.0  # the peak run whole
    whole_seconds_per_iteration: float = 0.0
    tiled: Tiled | None = None  # tile by tile: at `tile`, or at the core auto would choose
    largest_tiled: int = 0  # the largest size that fits tile by tile (at the smallest core)
    method: str = "scipy"
    # (method, peak bytes, core) of the other methods tile by tile, each at the largest core
    # that fits it (None: none does; the bytes are then at the smallest core)
    fitting_methods: tuple = ()
    frames: int = 0  # a clip's frames (0: an image)
    frame_seconds: float = 0.0  # a clip's frame after the first

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.limit_bytes

    def line(self) -> str:
        disk = (f", checkpoints {self.state_bytes / GB:.2f} GB on disk (state.npz)"
                if self.state_bytes >= STATE_SHOWN else "")
        how = ""
        if self.tile:
            chose = "tile: auto chose" if self.asked == "auto" else "tile:"
            if self.asked == "auto" and not self.fits:
                chose = "tile: auto finds no core that fits; the smallest,"
            how = (f"{chose} a {self.tile} px core, {self.tiles} tiles (whole, the run would "
                   f"need {self.whole_bytes / GB:.2f} GB): ")
        clip = (f"{_duration(self.frame_seconds)} per frame x {self.frames} frames, "
                if self.frames else "")
        return (f"estimate: {self.width}x{self.height}: {how}peak memory "
                f"{self.peak_bytes / GB:.2f} GB of {self.limit_bytes / GB:.1f} GB, "
                f"{self.seconds_per_iteration:.3g} s/iteration, {clip}about "
                f"{_duration(self.seconds)} in all ({self.device}){disk}{self.optimiser_note()}")

    def comparison(self) -> str:
        """Whole against tile by tile, memory and time: what `estimate` prints under the line;
        "" where one window holds the whole image (nothing to compare)."""
        if self.tiled is None:
            return ""
        whole = (f"whole {self.whole_bytes / GB:.2f} GB, "
                 f"{self.whole_seconds_per_iteration:.3g} s/iteration")
        t = self.tiled
        return (f"{whole}; tile by tile (core {t.core} px, {t.tiles} tiles) "
                f"{t.peak_bytes / GB:.2f} GB, {t.seconds_per_iteration:.3g} s/iteration")

    def optimiser_note(self) -> str:
        """Where the optimiser's vectors are most of a tiled peak: so, and the methods that fit."""
        if not self.tile or self.tiled is None or not self.tiled.optimiser_dominates:
            return ""
        fit = [f"{m} ({b / GB:.1f} GB with a {core} px core)"
               for m, b, core in self.fitting_methods if core]
        names = {"scipy": "scipy's L-BFGS-B", "lbfgs": "lbfgs's history", "adam": "Adam"}
        return (f"; {names[self.method]} keeps {self.tiled.optimiser_bytes / GB:.1f} GB of it, "
                "which tiling cannot shrink: " + (
                    f"optimizer.method {' or '.join(fit)} would fit" if fit else
                    "no other optimizer.method fits either"))

    def refusal(self) -> str:
        where = (f"at {self.width}x{self.height}" + (f" tile by tile (a {self.tile} px core)"
                                                    if self.tile else ""))
        said = (f"run {self.run_id}: estimated peak memory {self.peak_bytes / GB:.1f} GB {where} "
                f"exceeds the {self.limit_bytes / GB:.1f} GB this machine has for it "
                f"({self.device})")
        if self.tile:
            return (f"{said}; " + (f"the largest size that fits tile by tile is "
                                   f"{self.largest_tiled} (--set size={self.largest_tiled})"
                                   if self.largest_tiled else "no size fits tile by tile")
                    + self.optimiser_note())
        said += (f"; the largest size that fits is {self.largest_size} (--set "
                 f"size={self.largest_size}, and scales to match)" if self.largest_size else
                 "; no size fits whole (what does not grow with the image is too much)")
        if self.tiled is not None and self.tiled.peak_bytes <= self.limit_bytes:
            said += (f", or tile: auto (--set tile=auto), which computes the same objective "
                     f"tile by tile in {self.tiled.peak_bytes / GB:.1f} GB")
        elif self.tiled is not None:
            said += (f"; tile: auto would need {self.tiled.peak_bytes / GB:.1f} GB even tile by "
                     "tile")
        return said


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


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


def memory_limit() -> float:
    """PIPELINE_MEMORY_LIMIT in bytes (8G, 500M, 1.5e9; decimal units, as the estimate prints),
    or infinity when it is not set. A machine shared with others, or with other work, is
    kept to it: each run must fit under it, whatever the machine has free."""
    text = os.environ.get(ENV_LIMIT, "").strip()
    if not text:
        return math.inf
    match = re.fullmatch(r"(\d+(?:\.\d*)?(?:[eE]\d+)?)\s*([kKmMgGtT]?)[bB]?", text)
    if not match or float(match[1]) <= 0:
        raise config.ConfigError(f"{ENV_LIMIT}={text}: expected an amount of memory, e.g. 8G "
                                 "or 500M")
    return float(match[1]) * 1000 ** " kmgt".index(match[2].lower() or " ")


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


def _largest(size: int, fixed: float, growing: float, limit: float) -> int:
    """The largest size (a multiple of 16, at most MAX_SIZE) at which fixed + growing, which
    grows as the size squared from `size`, stays within `limit`."""
    if limit <= fixed:
        return 0
    if growing <= 0 or math.isinf(limit):
        return config.MAX_SIZE
    return min(config.MAX_SIZE, int(size * math.sqrt((limit - fixed) / growing))) // 16 * 16


def estimate(cfg: config.Config, run_id: str, cal: dict, limit: float,
             read_size=images.read_size, clip=None) -> Estimate:
    """The run's estimate from a calibration and `limit`, the bytes it may use: whole, or tile
    by tile as `tile` says (auto: whole if that fits, else the largest core that fits). The
    content's and style images' sizes come from their headers (`read_size(path) -> (width,
    height)`); images.ImageError when one cannot be read. A clip (video.plan.Clip) is its
    frames' size, and each frame one run: per frame x frames (the flow is a few percent more,
    not counted)."""
    content = read_size(cfg.content) if clip is None else clip.shape[::-1]
    styles = [read_size(path) for path in config.style_list(cfg.style)]
    model = Model(cfg, cal, content, styles)
    h, w = model.shape()
    pixels, style_pixels = h * w, sum(math.prod(s) for s in model.stages[-1][2])
    whole = model.run(None)
    stride = model.halo.stride
    best = model.largest_core(limit * (1 - AUTO_HEADROOM)) or model.largest_core(limit)
    shown = best or (stride if model.splits(stride) else None)  # tile by tile, for comparison
    asked = cfg.tile
    if isinstance(asked, int) and model.run(asked).tiles > 1:
        core = asked
    elif asked == "auto" and whole.peak_bytes > limit and shown:
        core = shown  # the largest core that fits; or the smallest, which is refused
    else:
        core = None  # off, auto where the whole fits, or a size that leaves one window
    chosen = whole if core is None else model.run(core)
    if core is not None:
        shown = core
    tiled = None
    if shown:
        f = model.run(shown)
        tiled = Tiled(shown, f.tiles, f.peak_bytes, f.seconds_per_iteration, f.seconds,
                      f.optimiser_bytes)
    # The other methods, tile by tile: the same peak with their vectors instead of these.
    others = []
    if tiled is not None and tiled.optimiser_dominates:
        for m in config.METHODS:
            if m == model.method:
                continue
            # This setup's figures with m's vectors instead of this method's, at the largest
            # core that fits them, as auto would choose it (a tenth spare where one does).
            more = (optimiser_bytes(m, config.history(config.OptimizerConfig(method=m)))
                    - model.optimiser) * pixels
            fits = (model.largest_core(limit * (1 - AUTO_HEADROOM) - more)
                    or model.largest_core(limit - more))
            others.append((m, model.run(fits or stride).peak_bytes + more, fits))
    # The largest sizes that fit: whole, and tile by tile at the smallest core.
    largest = _largest(cfg.size, model.a, model.b_run * pixels + model.c * style_pixels, limit)
    window = min(h, geometry.window_limit(stride, model.halo)) * min(
        w, geometry.window_limit(stride, model.halo))
    functions = 3 * model.frames((h, w), stride) + sum(  # about as many at any size
        model.frames(s, stride) for s in model.stages[-1][2])
    largest_tiled = _largest(cfg.size, model.a + model.b * window
                             + model.function_bytes * functions,
                             model.pixel_bytes * pixels + STYLE_PIXEL_BYTES * style_pixels, limit)
    disk = (state_bytes(model.method, model.history, pixels) if cfg.checkpoint_every else 0.0)
    seconds, frames, frame_seconds = chosen.seconds, 0, 0.0
    if clip is not None:
        from pipeline.video import plan as clips

        frames = clip.count
        frame_seconds = cfg.optimizer.iterations * chosen.seconds_per_iteration
        seconds = clips.total_iterations(cfg, clip.count) * chosen.seconds_per_iteration
    return Estimate(run_id, w, h, chosen.peak_bytes, chosen.seconds_per_iteration,
                    seconds, limit, cal["device"], largest, disk, core, chosen.tiles,
                    asked, whole.peak_bytes, whole.seconds_per_iteration, tiled, largest_tiled,
                    model.method, tuple(others), frames, frame_seconds)


def for_jobs(jobs, workers: int = 1, log=None, on_skip=None) -> dict[str, Estimate]:
    """Each planned run's estimate, with `workers` runs sharing the device at once, each
    within PIPELINE_MEMORY_LIMIT if set. A run whose content or style image cannot be read
    gets none (it fails by itself, naming the file, when it runs): `on_skip(job, message)`
    hears of it. Calibrates only the setups of runs it estimates."""
    out = {}
    sizes: dict[str, tuple[int, int] | images.ImageError] = {}
    cap = memory_limit()

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
            share = available_memory(cal) / max(1, math.ceil(workers / devices))
            calibrations[name] = cal, min(share, cap)
        cal, limit = calibrations[name]
        out[job.run_id] = estimate(job.cfg, job.run_id, cal, limit, read_size, clip)
    return out
