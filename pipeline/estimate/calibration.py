"""A calibration: real runs measured on this machine, each in a fresh process, and the fit
of peak memory and seconds per iteration against pixel counts (the package's docstring has the
model), cached per machine, backend, device, versions and setup."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
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
DEFAULT_SETUP = {"network": "vgg19", "precision": "float32", "method": "scipy"}
GB = 1e9


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


def gpu_list() -> list[dict]:
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
    gpus = gpu_list()
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
    sizes = calibration_sizes(gpu=bool(gpu_list()))
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


def measure(size: int, iterations: int, network: str = "vgg19", precision: str = "float32",
             method: str = "scipy", history: int = CALIBRATION_HISTORY,
             style: int | None = None) -> dict:
    """In a fresh process: one real run of `iterations` at size x size, with a square style
    `style` px long (default: the size), ending with a checkpoint as a run's last iteration
    does; its peak memory and seconds per iteration (first iteration excluded)."""
    import tempfile

    import numpy as np

    from pipeline import framework

    framework.load()
    from pipeline import autodiff, life
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
                life.save_checkpoint(folder, step, {}, len(plan) > 1)

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


def skipped() -> bool:
    return os.environ.get(ENV_SKIP, "") not in ("", "0")
