"""How much memory and time a run will take on this machine, before it starts.

Not a table written by hand: a calibration measures real runs (random weights, the default
layers, the run's network, precision and optimiser method, one checkpoint taken as a run takes
it), each in a fresh process, and fits

    peak memory = a + b * pixels + c * style pixels (+ k * history * pixels, lbfgs)
    seconds per iteration = t + u * pixels (+ v * history * pixels, lbfgs)

which holds because every large buffer grows with a pixel count and the rest (the framework,
the weights) does not: VGG19's activations and their gradients, scipy's float64 vectors, with
the generated image's pixels; the style images' activations, computed once, forward only, when
the targets are made, with theirs; lbfgs's history, its while-loop copies and the history x
pixels temporaries of its products, with both the history and the pixels. The runs:

    two sizes, styles as large as the content (a, b, t, u);
    the smaller size with a style 4x as long (c: the only thing that changed is the style);
    lbfgs only: the larger size at history 200 (k, v against the same size at history 10).

scipy's history is not measured: its L-BFGS-B holds exactly 2 x history float64 vectors of
the image's size on the host, counted as such on the CPU (on a GPU they are not in the
device's memory). Memory is the process's peak RSS on the CPU (the whole process, since that is
what the machine must hold) and the backend's peak device memory on a GPU. The fit is cached
once per machine, backend, device, versions and setup (network, precision, method), under the
user's cache folder (PIPELINE_CACHE_DIR moves it), so only the first run on a machine pays for
it (~30-50 s on a 2-core CPU). A cache folder that cannot be written moves the cache to the
temporary directory, with a warning (see calibration).

Light on purpose: the deep-learning framework is imported only by the calibration's own
subprocesses, so `estimate`, `run` and the parent of a worker pool stay quick.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__, config, hardware, images, runs, scales

log = logging.getLogger("pipeline")

# Calibration sizes (square, long side) and iterations measured at each; the first iteration
# (tracing, compiling) is not timed. On a GPU the sizes are larger, so that the per-pixel part
# stands out from the fixed part.
CPU_SIZES, GPU_SIZES = (128, 256), (256, 512)
CPU_ITERATIONS, GPU_ITERATIONS = 3, 12
STYLE_FACTOR = 4  # the style run's style is this many times the smaller size, on its long side
# lbfgs's history at the two runs of the larger size. Its cost per correction is not constant:
# at 256 px on TensorFlow (CPU, VmHWM) 10 -> 50 added 12-30 bytes per pixel and correction
# (hidden under the network's own peak), 50 -> 200 about 115. The line through 10 and 200
# overcounts the histories between them (there, of the whole peak: +8% at 30, +14% at 50, +7%
# at 100) rather than undercount longer ones (through 10 and 100: -11% at 200).
CALIBRATION_HISTORY, LONG_HISTORY = 10, 200
CALIBRATION_FORMAT = 2  # in the cache key: a calibration of an older form is measured again
ENV_CACHE = "PIPELINE_CACHE_DIR"
ENV_SKIP = "PIPELINE_SKIP_ESTIMATE"  # 1: no estimate and no memory check (a user's choice)
# Two sizes, e.g. "32,48", to calibrate at instead: quick, for the test suite or a first look;
# the estimates of large runs are then rougher. Part of the cache key.
ENV_SIZES = "PIPELINE_CALIBRATION_SIZES"
GB = 1e9
STATE_SHOWN = 100e6  # a checkpoint's state.npz at least this large is named in the line
DEFAULT_SETUP = {"network": "vgg19", "precision": "float32", "method": "scipy"}


def setup_of(cfg: config.Config) -> dict:
    """What, besides the sizes, changes a run's memory and speed: one calibration each."""
    return {"network": cfg.model.network, "precision": cfg.model.precision,
            "method": cfg.optimizer.method}


class EstimateError(RuntimeError):
    """The calibration could not be measured; the message says why."""


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "style-pipeline"


def _backend() -> str:
    """Keras's backend as Keras will choose it, read without importing Keras."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        return json.loads((Path(home) / "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _gpus() -> list[dict]:
    """The NVIDIA GPUs this process may use (name, memory in bytes); [] without one. The
    driver is asked once per process (hardware.nvidia_gpus)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    named = None if visible is None else {v.strip() for v in visible.split(",")}
    return [g for g in hardware.nvidia_gpus()
            if named is None or g["index"] in named or g["uuid"] in named]


def calibration_sizes(gpu: bool) -> tuple[int, int]:
    text = os.environ.get(ENV_SIZES, "").strip()
    if not text:
        return GPU_SIZES if gpu else CPU_SIZES
    try:
        small, large = (int(part) for part in text.split(","))
    except ValueError:
        small = large = 0
    if not 16 <= small < large <= config.MAX_SIZE:
        raise EstimateError(f"{ENV_SIZES}={text}: expected two growing sizes of at least 16, "
                            f"e.g. 64,96")
    return small, large


def machine_key() -> dict:
    """What a calibration holds for: this host, backend, device and the versions in use."""
    versions = {}
    for package in ("keras", "tensorflow", "jax", "jaxlib", "scipy", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpus = _gpus()
    return {"host": socket.gethostname(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "backend": _backend(),
            "device": gpus[0]["name"] if gpus else "cpu", "pipeline": __version__,
            "python": platform.python_version(), **versions}


# --------------------------------------------------------------------------- calibration


def calibration(log_line=None, setup: dict | None = None) -> dict:
    """The cached calibration of this machine for `setup` (network, precision, method;
    default VGG19, float32, scipy), measured now if there is none yet. `log_line(text)` hears
    that a calibration starts.

    A cache folder that cannot be written (PIPELINE_CACHE_DIR under a file, a read-only home)
    is said once, and the calibration goes to a folder of this user's under the temporary
    directory instead: the memory check stays (a run refused now costs less than one killed
    for memory in the night), and only the first command pays for it. If that cannot be
    written either, EstimateError: the runs go ahead without the check."""
    key = calibration_key(setup)
    folder = cache_dir()
    try:
        return _cached_or_measured(folder, key, log_line)
    except OSError as e:
        fallback = fallback_cache_dir()
        _warn_once(f"warning: cannot write the estimate's cache in {folder} ({_why(e)}): using "
                   f"{fallback}; set {ENV_CACHE} to a writable folder")
    try:
        return _cached_or_measured(fallback, key, log_line)
    except OSError as e:
        raise EstimateError(f"no writable cache folder ({folder}, {fallback}: {_why(e)})") from None


def calibration_key(setup: dict | None = None) -> dict:
    """What a calibration of `setup` holds for: the machine, the setup, the sizes measured."""
    setup = {**DEFAULT_SETUP, **(setup or {})}
    sizes = calibration_sizes(gpu=bool(_gpus()))
    return {**machine_key(), **setup, "sizes": list(sizes), "format": CALIBRATION_FORMAT}


def cache_name(key: dict) -> str:
    """The calibration's file name in the cache folder."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"calibration-{digest}.json"


def fallback_cache_dir() -> Path:
    import tempfile

    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"style-pipeline-{user}"


def _why(e: OSError) -> str:
    return e.strerror or str(e)


_warned: list[str] = []


def _warn_once(message: str) -> None:
    """Every setup of a sweep would say the same."""
    if message not in _warned:
        _warned.append(message)
        log.warning(message)


def _cached_or_measured(folder: Path, key: dict, log_line) -> dict:
    """The calibration cached in `folder`, or measured and cached there; OSError (before
    measuring) when the folder cannot be written."""
    path = folder / cache_name(key)
    cached = _read(path)
    if cached:
        return cached
    # Two processes starting at once on a new machine: one measures, the other waits for it.
    with runs.Lock(path.with_name(f".{path.stem}.lock"), "calibration", wait=900):
        cached = _read(path)
        if cached:
            return cached
        setup = {name: key[name] for name in DEFAULT_SETUP}
        if log_line:
            log_line(f"estimate: calibrating this machine once ({key['backend']} on "
                     f"{key['device']}, {' '.join(setup.values())}, sizes {key['sizes'][0]} "
                     f"and {key['sizes'][1]}); cached in {path}")
        data = _calibrate(key, tuple(key["sizes"]), setup, gpu=key["device"] != "cpu")
        try:
            images.atomic_write(path, json.dumps(data, indent=2) + "\n")
        except OSError as e:  # a full disk: this command has its numbers all the same
            _warn_once(f"warning: cannot cache the calibration in {path} ({_why(e)})")
        return data


def _calibrate(key: dict, sizes: tuple[int, int], setup: dict, gpu: bool) -> dict:
    iterations = GPU_ITERATIONS if gpu else CPU_ITERATIONS
    small, large = sizes
    p1, p2 = (_measure_in_subprocess(size, iterations, setup) for size in sizes)
    p3 = _measure_in_subprocess(small, iterations, setup, style=STYLE_FACTOR * small)
    points = [p1, p2, p3]
    (a, slope), (t, u) = (_fit([p1["pixels"], p2["pixels"]], [p1[v], p2[v]])
                          for v in ("peak_bytes", "seconds_per_iteration"))
    # p1 and p2 hold a style as large as the content, so `slope` is b + c: split it.
    c = (p3["peak_bytes"] - p1["peak_bytes"]) / (p3["style_pixels"] - p1["style_pixels"])
    c = min(max(0.0, c), slope)
    history = None
    if setup["method"] == "lbfgs":
        p4 = _measure_in_subprocess(large, iterations, setup, history=LONG_HISTORY)
        points.append(p4)
        extra = (LONG_HISTORY - CALIBRATION_HISTORY) * p2["pixels"]
        history = {"at": [CALIBRATION_HISTORY, LONG_HISTORY],
                   "memory": max(0.0, (p4["peak_bytes"] - p2["peak_bytes"]) / extra),
                   "seconds": max(0.0, (p4["seconds_per_iteration"]
                                        - p2["seconds_per_iteration"]) / extra)}
    return {
        "key": key,
        "points": points,
        "memory": [a, slope - c],
        "style": c,
        "seconds": [t, u],
        "history": history,
        "device": p2["device"],
        "device_memory": p2.get("device_memory"),
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _read(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    need = {"memory", "style", "seconds", "history", "device"}
    return data if isinstance(data, dict) and need <= data.keys() else None


def _fit(pixels: list[int], values: list[float]) -> list[float]:
    """[a, b] of the line through two measurements. Noise (a busy machine) can tilt it past
    what is possible: neither part may be negative, and the larger measurement, the one
    nearest the sizes people run, is kept exact."""
    (p1, p2), (v1, v2) = pixels, values
    b = max(0.0, (v2 - v1) / (p2 - p1))
    if v2 - b * p2 < 0:
        b = v2 / p2
    return [v2 - b * p2, b]


def _measure_in_subprocess(size: int, iterations: int, setup: dict, style: int | None = None,
                           history: int = CALIBRATION_HISTORY) -> dict:
    what = f"size {size}" + (f", style {style}" if style else "") + (
        f", history {history}" if history != CALIBRATION_HISTORY else "")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.estimate", str(size), str(iterations),
             setup["network"], setup["precision"], setup["method"], str(history),
             str(style or size)],
            capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EstimateError(f"calibration at {what} failed: {e}") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EstimateError(f"calibration at {what} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def _measure(size: int, iterations: int, network: str = "vgg19", precision: str = "float32",
             method: str = "scipy", history: int = CALIBRATION_HISTORY,
             style: int | None = None) -> dict:
    """In a fresh process: one real run of `iterations` at size x size, with a square style
    `style` px long (default: the size), ending with a checkpoint as a run's last iteration
    does; its peak memory and seconds per iteration (first iteration excluded)."""
    import tempfile

    import numpy as np

    from pipeline import framework

    framework.load()
    from pipeline import autodiff, batch
    from pipeline.stylize import stylize

    style = style or size
    cfg = config.Config(content="calibration", style=["calibration"], size=size,
                        style_scale=style / size, checkpoint_every=iterations,
                        model=config.ModelConfig(weights="random", network=network,
                                                 precision=precision),
                        optimizer=config.OptimizerConfig(iterations=iterations, method=method,
                                                         history=history))
    rng = np.random.default_rng(0)
    content = rng.uniform(0, 255, (size, size, 3)).astype("float32")
    painting = rng.uniform(0, 255, (style, style, 3)).astype("float32")
    stamps: list[float] = []
    env = autodiff.environment()
    plan = scales.stages(cfg)
    with tempfile.TemporaryDirectory(prefix="calibration-") as tmp:
        folder = runs.RunFolder(tmp)
        folder.checkpoints.mkdir()

        def on_step(step):
            stamps.append(step.seconds)
            if step.iteration == iterations:  # the state a checkpoint copies to the host
                batch._checkpoint(folder, step, {}, plan)

        stylize(cfg, content, [painting], on_step=on_step)
    side = config.style_size(cfg)
    out = {"size": size, "pixels": size * size, "style_pixels": side * side,
           "history": history, "iterations": len(stamps),
           "seconds_per_iteration": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
           "device": env["device"]}
    if env["device"].startswith("cpu"):
        out["peak_bytes"] = _peak_memory()
    else:
        out["peak_bytes"], out["device_memory"] = _device_memory(env["backend"])
    return out


def _peak_memory() -> int:
    """This process's peak resident memory in bytes. VmHWM belongs to the address space, so
    it starts afresh at exec; getrusage's ru_maxrss does not (a child of a large parent, a
    test runner or a CLI that already ran a model, inherits its peak): only a fallback."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _device_memory(backend: str) -> tuple[int, int | None]:
    """(peak bytes in use, bytes the process may use) on the first GPU, from the backend."""
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return int(stats.get("peak_bytes_in_use", 0)), stats.get("bytes_limit")
    import tensorflow as tf

    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"]), None


# --------------------------------------------------------------------------- estimates


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

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.limit_bytes

    def line(self) -> str:
        disk = (f", checkpoints {self.state_bytes / GB:.2f} GB on disk (state.npz)"
                if self.state_bytes >= STATE_SHOWN else "")
        return (f"estimate: {self.width}x{self.height}: peak memory {self.peak_bytes / GB:.2f} GB "
                f"of {self.limit_bytes / GB:.1f} GB, {self.seconds_per_iteration:.3g} s/iteration, "
                f"about {_duration(self.seconds)} in all ({self.device}){disk}")

    def refusal(self) -> str:
        return (f"run {self.run_id}: estimated peak memory {self.peak_bytes / GB:.1f} GB at "
                f"{self.width}x{self.height} exceeds the {self.limit_bytes / GB:.1f} GB this "
                f"machine has for it ({self.device}); the largest size that fits is "
                f"{self.largest_size} (--set size={self.largest_size}, and scales to match)")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def scaled_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(height, width) of a width x height image scaled to `size` on its long side, as
    images.resize_long_side scales it."""
    scale = size / max(height, width)
    if width >= height:
        return max(1, round(height * scale)), size
    return size, max(1, round(width * scale))


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
        gpus = _gpus()
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
             read_size=images.read_size) -> Estimate:
    """The run's estimate from a calibration and `limit`, the bytes it may use. The content's
    and style images' sizes come from their headers (`read_size(path) -> (width, height)`);
    images.ImageError when one cannot be read."""
    content = read_size(cfg.content)
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
    return Estimate(run_id, w, h, a + growing, t + u * pixels, seconds, limit, cal["device"],
                    largest, disk)


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
        try:
            for path in (job.cfg.content, *config.style_list(job.cfg.style)):
                read_size(path)
        except images.ImageError as e:
            if on_skip:
                on_skip(job, str(e))
            continue
        setup = setup_of(job.cfg)
        name = " ".join(setup.values())
        if name not in calibrations:
            cal = calibration(log, setup)
            devices = max(1, len(_gpus())) if not cal["device"].startswith("cpu") else 1
            calibrations[name] = cal, available_memory(cal) / max(1, math.ceil(workers / devices))
        cal, limit = calibrations[name]
        out[job.run_id] = estimate(job.cfg, job.run_id, cal, limit, read_size)
    return out


def skipped() -> bool:
    return os.environ.get(ENV_SKIP, "") not in ("", "0")


if __name__ == "__main__":  # a calibration's measuring process: SIZE ITERATIONS SETUP HISTORY STYLE
    size, iterations, network, precision, method, history, style = sys.argv[1:8]
    print(json.dumps(_measure(int(size), int(iterations), network, precision, method,
                              int(history), int(style))))
