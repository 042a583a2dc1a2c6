"""`python -m pipeline doctor`: what this machine and installation will run on, and what is
wrong with it. The first thing to run when something is slow: it prints the backend and the
devices it sees, the GPUs the driver sees, versions, BLAS thread pools, CPU features, thread
settings and the ImageNet weights file, then one verdict line. Exit 0 when all is well, 1
when it found a problem (each with its fix)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys

from pipeline import hardware

PACKAGES = ("keras", "tensorflow", "jax", "jaxlib", "jax-cuda12-plugin", "scipy", "numpy",
            "threadpoolctl")


def _line(label: str, text: str) -> None:
    print(f"{label:<12} {text}")


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    problems: list[str] = []
    notes: list[str] = []
    print("style-pipeline doctor")

    import keras
    import scipy.optimize  # noqa: F401  (loads scipy's BLAS, so that it is listed below)
    from threadpoolctl import threadpool_info

    from pipeline import autodiff, weights

    backend = keras.backend.backend()
    chosen = os.environ.get("KERAS_BACKEND")
    _line("backend", f"{backend} ("
          f"{'KERAS_BACKEND=' + chosen if chosen else 'Keras default; KERAS_BACKEND=jax for JAX'})")
    if backend not in ("tensorflow", "jax"):
        problems.append(f"backend {backend} is not supported: KERAS_BACKEND=jax or tensorflow")
        devices, device = [], "cpu"
    else:
        try:
            devices = autodiff.devices()
            device = autodiff.environment()["device"]
        except Exception as e:  # a broken CUDA install fails here: say so, go on with the rest
            problems.append(f"{backend} cannot list its devices ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): make setup again")
            devices, device = [], "cpu"
    _line("devices", ", ".join(devices) or "none")

    gpus = hardware.driver_gpus()
    _line("driver GPUs", "; ".join(gpus) if gpus else "none (nvidia-smi lists none, or is absent)")
    unused = hardware.unused_gpu_message(backend, device, gpus)
    if unused:
        problems.append(unused)
    elif gpus and hardware.gpus_hidden():
        notes.append("CUDA_VISIBLE_DEVICES hides the GPUs: runs use the CPU")
    elif device.startswith("gpu") and backend == "tensorflow":
        notes.append("JAX is the backend measured fast on GPUs: KERAS_BACKEND=jax")

    versions = [f"python {platform.python_version()}"]
    for package in PACKAGES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    _line("versions", ", ".join(versions))

    pools = [f"{p['internal_api']} {p.get('version')} {p['num_threads']} thread(s) "
             f"({os.path.basename(p['filepath'])})" for p in threadpool_info()]
    _line("BLAS", "; ".join(pools) or "none loaded")
    _line("", "scipy's L-BFGS-B runs with 1 BLAS thread (the network uses its own pools)")

    cores, total = hardware.usable_cores(), os.cpu_count()
    flags = hardware.cpu_flags()
    features = ("unknown" if flags is None else
                ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in hardware.SPEED_FLAGS))
    _line("CPU", f"{platform.machine()}, {cores} usable core(s) of {total}; {features}")
    hint = hardware.bfloat16_hint(backend, device, flags)
    if hint:
        notes.append(hint)
    load = hardware.load_average()
    _line("load", f"{load:.1f} (1 minute): {hardware.free_cores(cores, load)} free core(s), "
          "which --workers auto counts")
    memory, available = hardware.memory_bytes(), hardware.memory_bytes(available=True)
    if memory:
        _line("memory", f"{memory / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")
    settings = [f"{name}={os.environ[name]}" for name in hardware.THREAD_VARIABLES
                if name in os.environ]
    _line("threads", ", ".join(settings) or "no thread variables set (frameworks use every core)")
    for name in hardware.THREAD_VARIABLES[:-1]:  # XLA_FLAGS is not a count
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > cores:
            problems.append(f"{name}={value} is more than the {cores} usable core(s): threads "
                            f"would wait for each other; unset it or set it to {cores}")
    memory_settings = hardware.gpu_memory_settings()
    _line("GPU memory", ", ".join(f"{k}={v}" for k, v in memory_settings.items())
          or "framework defaults (workers set memory growth for themselves)")

    path = weights.cached_path()
    if os.path.isfile(path):
        if _md5(path) == weights.WEIGHTS_MD5:
            _line("weights", f"ImageNet VGG19 present: {path}")
        else:
            _line("weights", f"ImageNet VGG19 damaged: {path}")
            problems.append(f"{path} is not Keras's VGG19 file (its MD5 differs): delete it and "
                            f"download {weights.WEIGHTS_URL} again")
    else:
        _line("weights", f"ImageNet VGG19 missing: looked for {path} "
              "($KERAS_HOME/models/, else ~/.keras/models/)")
        fix = (f"download {weights.WEIGHTS_URL} to {path}, or use model.weights: random")
        if os.environ.get("PIPELINE_OFFLINE"):
            problems.append(f"ImageNet weights missing and PIPELINE_OFFLINE is set: {fix}")
        else:
            notes.append("the first run with model.weights: imagenet downloads the weights")

    if problems:
        print(f"verdict      {len(problems)} problem(s): " + " | ".join(problems))
        return 1
    print("verdict      ok" + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
