"""How much memory and time a run will take on this machine, before it starts.

Not a table written by hand: a calibration measures real runs (random weights, the default
layers, the run's network, precision and optimiser method) at two small sizes, each in a
fresh process, and fits

    peak memory = a + b * pixels        seconds per iteration = c + d * pixels

which holds because every large buffer (VGG19's activations and their gradients, scipy's
float64 vectors and history) grows with the pixel count, and the rest (the framework, the
weights) does not. Memory is the process's peak RSS on the CPU (the whole process, since that
is what the machine must hold) and the backend's peak device memory on a GPU. The fit is
cached once per machine, backend, device, versions and setup (network, precision, method),
under the user's cache folder
(PIPELINE_CACHE_DIR moves it), so only the first run on a machine pays for it (~30 s on a
2-core CPU).

Light on purpose: the deep-learning framework is imported only by the calibration's own
subprocesses, so `estimate`, `run` and the parent of a worker pool stay quick.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__, config, images, runs, scales

# Calibration sizes (square, long side) and iterations measured at each; the first iteration
# (tracing, compiling) is not timed. On a GPU the sizes are larger, so that the per-pixel part
# stands out from the fixed part.
CPU_SIZES, GPU_SIZES = (128, 256), (256, 512)
CPU_ITERATIONS, GPU_ITERATIONS = 3, 12
CALIBRATION_HISTORY = 10  # scipy's m in the calibration runs
ENV_CACHE = "PIPELINE_CACHE_DIR"
ENV_SKIP = "PIPELINE_SKIP_ESTIMATE"  # 1: no estimate and no memory check (the test suite)
GB = 1e9
DEFAULT_SETUP = {"network": "vgg19", "precision": "float32", "method": "scipy"}


def setup_of(cfg: config.Config) -> dict:
    """What, besides the size, changes a run's memory and speed: one calibration each."""
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
    """The visible NVIDIA GPUs (name, memory in bytes), from nvidia-smi; [] without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = []
    for line in out.strip().splitlines():
        index, name, memory = (part.strip() for part in line.split(","))
        if visible is None or index in visible.split(","):
            gpus.append({"name": name, "memory": int(float(memory)) * 2**20})
    return gpus


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


def calibration(log=None, setup: dict | None = None) -> dict:
    """The cached calibration of this machine for `setup` (network, precision, method;
    default VGG19, float32, scipy), measured now if there is none yet."""
    setup = {**DEFAULT_SETUP, **(setup or {})}
    key = {**machine_key(), **setup}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir()
    path = folder / f"calibration-{digest}.json"
    cached = _read(path)
    if cached:
        return cached
    # Two processes starting at once on a new machine: one measures, the other waits for it.
    with runs.Lock(folder / f".calibration-{digest}.lock", "calibration", wait=900):
        cached = _read(path)
        if cached:
            return cached
        gpu = key["device"] != "cpu"
        sizes, iterations = (GPU_SIZES, GPU_ITERATIONS) if gpu else (CPU_SIZES, CPU_ITERATIONS)
        if log:
            log(f"estimate: calibrating this machine once ({key['backend']} on {key['device']}, "
                f"{' '.join(setup.values())}, sizes {sizes[0]} and {sizes[1]}); cached in {path}")
        points = [_measure_in_subprocess(size, iterations, setup) for size in sizes]
        data = {
            "key": key,
            "points": points,
            "memory": _fit([p["pixels"] for p in points], [p["peak_bytes"] for p in points]),
            "seconds": _fit([p["pixels"] for p in points],
                            [p["seconds_per_iteration"] for p in points]),
            "device": points[-1]["device"],
            "device_memory": points[-1].get("device_memory"),
            "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        images.atomic_write(path, json.dumps(data, indent=2) + "\n")
        return data


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and {"memory", "seconds"} <= data.keys() else None


def _fit(pixels: list[int], values: list[float]) -> list[float]:
    """[a, b] of the line through two measurements. Noise (a busy machine) can tilt it past
    what is possible: neither part may be negative, and the larger measurement, the one
    nearest the sizes people run, is kept exact."""
    (p1, p2), (v1, v2) = pixels, values
    b = max(0.0, (v2 - v1) / (p2 - p1))
    if v2 - b * p2 < 0:
        b = v2 / p2
    return [v2 - b * p2, b]


def _measure_in_subprocess(size: int, iterations: int, setup: dict) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.estimate", str(size), str(iterations),
             setup["network"], setup["precision"], setup["method"]],
            capture_output=True, text=True, timeout=1800,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL",
                                                                      "3")})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EstimateError(f"calibration at size {size} failed: {e}") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EstimateError(f"calibration at size {size} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def _measure(size: int, iterations: int, network: str = "vgg19", precision: str = "float32",
             method: str = "scipy") -> dict:
    """In a fresh process: one real run of `iterations` at size x size; its peak memory and
    seconds per iteration (first iteration excluded)."""

    import numpy as np

    from pipeline import autodiff
    from pipeline.stylize import stylize

    cfg = config.Config(content="calibration", style=["calibration"], size=size,
                        model=config.ModelConfig(weights="random", network=network,
                                                 precision=precision),
                        optimizer=config.OptimizerConfig(iterations=iterations, method=method,
                                                         history=CALIBRATION_HISTORY))
    rng = np.random.default_rng(0)
    content, style = (rng.uniform(0, 255, (size, size, 3)).astype("float32") for _ in "cs")
    stamps: list[float] = []
    env = autodiff.environment()
    stylize(cfg, content, [style], on_step=lambda step: stamps.append(step.seconds))
    out = {"size": size, "pixels": size * size, "iterations": len(stamps),
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

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.limit_bytes

    def line(self) -> str:
        return (f"estimate: {self.width}x{self.height}: peak memory {self.peak_bytes / GB:.2f} GB "
                f"of {self.limit_bytes / GB:.1f} GB, {self.seconds_per_iteration:.3g} s/iteration, "
                f"about {_duration(self.seconds)} in all ({self.device})")

    def refusal(self) -> str:
        return (f"run {self.run_id}: estimated peak memory {self.peak_bytes / GB:.1f} GB at "
                f"{self.width}x{self.height} exceeds the {self.limit_bytes / GB:.1f} GB this "
                f"machine has for it ({self.device}); the largest size that fits is "
                f"{self.largest_size} (--set size={self.largest_size}, and scales to match)")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def generated_shape(content_path: str, size: int) -> tuple[int, int]:
    """(height, width) of the generated image at `size`, from the content file's header (as
    images.resize_long_side will scale it; EXIF rotation does not change the pixel count)."""
    from PIL import Image

    with Image.open(content_path) as img:
        w, h = img.size
    scale = size / max(h, w)
    if w >= h:
        return max(1, round(h * scale)), size
    return size, max(1, round(w * scale))


def available_memory(cal: dict) -> float:
    """Bytes a run may use: the GPU's memory (as the backend reported its limit, else as
    nvidia-smi does), or the RAM available now (MemAvailable) on the CPU."""
    if not cal["device"].startswith("cpu"):
        if cal.get("device_memory"):
            return float(cal["device_memory"])
        gpus = _gpus()
        if gpus:
            return float(gpus[0]["memory"])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def estimate(cfg: config.Config, run_id: str, cal: dict, limit: float) -> Estimate:
    (ma, mb), (ta, tb) = cal["memory"], cal["seconds"]
    # L-BFGS keeps 2 * m vectors of the image's size (scipy: float64 on the host; lbfgs:
    # float32 on the device): the history beyond the calibration's is added exactly.
    vector_bytes = {"scipy": 3 * 8, "lbfgs": 3 * 4}.get(cfg.optimizer.method, 0)
    mb = mb + 2 * (config.history(cfg.optimizer) - CALIBRATION_HISTORY) * vector_bytes
    seconds = 0.0
    for stage in scales.stages(cfg):
        h, w = generated_shape(cfg.content, stage.size)
        seconds += (stage.last - stage.first + 1) * (ta + tb * h * w)
    h, w = generated_shape(cfg.content, cfg.size)
    pixels = h * w
    fitting_pixels = (limit - ma) / mb if mb > 0 else math.inf
    if fitting_pixels <= 0:
        largest = 0
    elif math.isinf(fitting_pixels):
        largest = config.MAX_SIZE
    else:
        largest = min(config.MAX_SIZE, int(cfg.size * math.sqrt(fitting_pixels / pixels)))
        largest = largest // 16 * 16
    return Estimate(run_id, w, h, ma + mb * pixels, ta + tb * pixels, seconds, limit,
                    cal["device"], largest)


def for_jobs(jobs, workers: int = 1, log=None) -> dict[str, Estimate]:
    """Each planned run's estimate, with `workers` runs sharing the device at once."""
    if not jobs:
        return {}
    out = {}
    calibrations: dict[str, dict] = {}
    for job in jobs:
        setup = setup_of(job.cfg)
        name = " ".join(setup.values())
        if name not in calibrations:
            calibrations[name] = calibration(log, setup)
        cal = calibrations[name]
        devices = max(1, len(_gpus())) if not cal["device"].startswith("cpu") else 1
        limit = available_memory(cal) / max(1, math.ceil(workers / devices))
        out[job.run_id] = estimate(job.cfg, job.run_id, cal, limit)
    return out


def skipped() -> bool:
    return os.environ.get(ENV_SKIP, "") not in ("", "0")


if __name__ == "__main__":  # the calibration's measuring process: SIZE ITERATIONS [SETUP]
    print(json.dumps(_measure(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])))
