"""`python -m pipeline doctor`: what this machine and installation will run on, and what is
wrong with it. The first thing to run when something is slow: it prints the backend and the
devices it sees, the GPUs the driver sees, versions, BLAS thread pools, CPU features, thread
settings, each network's ImageNet weights file, and float32 against bfloat16 as measured here
(a few seconds, once per machine), then one verdict line. Exit 0 when all is well, 1 when it
found a problem (each with its fix)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

from pipeline import framework, hardware

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
    problems: list[str] = []
    notes: list[str] = []
    print("style-pipeline doctor")

    keras = framework.load()
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

    versions = [f"python {platform.python_version()}",
                *(f"{package} {version}" for package, version in _versions().items())]
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

    missing = []
    for network, (_, md5) in weights.IMAGENET_FILES.items():  # every network's file
        path, name = weights.cached_path(network), f"ImageNet {network.upper()}"
        label = "" if missing or network != "vgg19" else "weights"
        if not os.path.isfile(path):
            missing.append(network)
            _line(label, f"{name} missing: looked for {path}" + (
                " ($KERAS_HOME/models/, else ~/.keras/models/)" if label else ""))
        elif _md5(path) == md5:
            _line(label, f"{name} present: {path}")
        else:
            _line(label, f"{name} damaged: {path}")
            problems.append(f"{path} is not Keras's {network.upper()} file (its MD5 differs): "
                            f"delete it and download {weights.weights_url(network)} again")
    if missing and os.environ.get("PIPELINE_OFFLINE"):
        fixes = [f"download {weights.weights_url(n)} to {weights.cached_path(n)}" for n in missing]
        text = (f"ImageNet weights missing ({', '.join(n.upper() for n in missing)}) and "
                f"PIPELINE_OFFLINE is set: {'; '.join(fixes)}, or use model.weights: random")
        # The default network's file is what a config without model.network needs.
        (problems if "vgg19" in missing else notes).append(text)
    elif missing:
        notes.append("the first run with model.weights: imagenet downloads the weights")

    speed = _precision_speed(backend, device) if backend in ("tensorflow", "jax") else None
    if speed:
        _line("precision", speed["line"])
        if speed.get("advice"):
            notes.append(speed["advice"])

    if problems:
        print(f"verdict      {len(problems)} problem(s): " + " | ".join(problems))
        return 1
    print("verdict      ok" + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


# ------------------------------------------------------------------ bfloat16, measured

SPEED_SIZE, SPEED_CALLS = 128, 5
FASTER = 1.1  # bfloat16 is advised from this speed-up on: less is within a busy machine's noise


def _precision_speed(backend: str, device: str) -> dict | None:
    """Seconds per value-and-gradient in float32 and in bfloat16 on this machine, measured
    once (cached like the estimate's calibration, per host, backend, device and versions),
    and the line and advice that follow from them. CPU flags do not predict it: bfloat16 ran
    1.6x faster than float32 on an AMD EPYC with AVX512_BF16 and 1.35x slower on an Intel Xeon
    with AVX512_BF16 and no AMX (TensorFlow, 128 px)."""
    import json
    import time

    from pipeline import images

    key, path = precision_cache(backend, device)
    try:
        data = json.loads(path.read_text())
        seconds = {p: float(data["seconds"][p]) for p in ("float32", "bfloat16")}
        when = f"measured {data['measured']}{_at_load(data.get('load'))}, cached"
    except (OSError, ValueError, KeyError, TypeError):
        try:
            seconds = _time_precisions()
        except Exception as e:  # the verdict's other lines matter more than this one
            return {"line": f"not measured ({type(e).__name__}: {str(e)[:120]})"}
        measured, load = time.strftime("%Y-%m-%d %H:%M:%S"), hardware.load_average()
        when = f"measured now{_at_load(load)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            images.atomic_write(path, json.dumps({"key": key, "seconds": seconds, "load": load,
                                                  "measured": measured}, indent=2) + "\n")
        except OSError:
            when += ", not cached"
    ratio = seconds["float32"] / seconds["bfloat16"]
    verdict = (f"bfloat16 {ratio:.2f}x faster" if ratio >= 1 else
               f"bfloat16 {1 / ratio:.2f}x slower")
    out = {"line": f"float32 {seconds['float32']:.3f} s, bfloat16 {seconds['bfloat16']:.3f} s "
                   f"per value-and-gradient at {SPEED_SIZE} px: {verdict} ({when})",
           "seconds": seconds}
    if ratio >= FASTER:
        out["advice"] = (f"bfloat16 measured {ratio:.1f}x faster than float32 here: "
                         "model.precision: bfloat16")
    return out


def _at_load(load) -> str:
    """The machine's load when it was measured: a busy machine's numbers are noisier."""
    return f" at load {load:.1f} on {os.cpu_count()} cores" if load is not None else ""


def precision_cache(backend: str, device: str) -> tuple[dict, Path]:
    """What a precision measurement holds for, and its file in the estimate's cache folder."""
    import hashlib
    import json

    from pipeline import estimate

    key = {"measure": "precision", "host": platform.node(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "backend": backend, "device": device,
           **{p: v for p, v in _versions().items() if p in ("keras", "tensorflow", "jax")}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key, estimate.cache_dir() / f"precision-{digest}.json"


def _time_precisions() -> dict[str, float]:
    """Best of SPEED_CALLS value-and-gradient calls of VGG19 (random weights, the default
    layers) at SPEED_SIZE px in each precision, the precisions taking turns so that both
    see the same load; each compiled and called once first."""
    import time

    import numpy as np

    from pipeline import autodiff, config, model
    from pipeline.losses import Objective

    rng = np.random.default_rng(0)
    content, style, x = (rng.uniform(0, 255, (SPEED_SIZE, SPEED_SIZE, 3)).astype("float32")
                         for _ in range(3))
    calls = {}
    for precision in ("float32", "bfloat16"):
        cfg = config.Config(content="-", style=["-"], size=SPEED_SIZE,
                            model=config.ModelConfig(weights="random", precision=precision))
        extractor, names, _ = model.feature_extractor(cfg.model, cfg.seed)
        vg = autodiff.value_and_grad(Objective(extractor, names, cfg, content, [style]),
                                     extractor.variables)
        vg(x)  # traced and compiled here
        calls[precision] = vg
    best = {precision: float("inf") for precision in calls}
    for _ in range(SPEED_CALLS):
        for precision, vg in calls.items():
            start = time.perf_counter()
            vg(x)
            best[precision] = min(best[precision], time.perf_counter() - start)
    return best


def _versions() -> dict[str, str]:
    out = {}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
