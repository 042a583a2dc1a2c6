"""What the machine offers, found without loading a deep-learning framework (so that the parent
of a worker pool stays light): the GPUs the NVIDIA driver lists, the cores and memory this
process may use, CPU features; and the choices made from them: how many workers, and how
workers share a GPU's memory."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess

log = logging.getLogger("pipeline")

# Host memory one worker needs: Python, the framework, VGG19 and a 512 px run on the CPU
# (peak resident 1.8 GB measured with TensorFlow, 2.2 GB with JAX), with a little room.
WORKER_MEMORY = int(2.5 * 2**30)

# How workers share one GPU. TensorFlow takes all of a GPU's memory in the first process
# unless it may grow; JAX preallocates 75% per process. Both are told to allocate what a run
# needs as it needs it, and to keep it: the same behaviour on both backends, and a run of any
# size fits while the GPU has room. A fixed per-worker share (XLA_PYTHON_CLIENT_MEM_FRACTION)
# would have to be guessed before a run's size is known, and would refuse a large run while
# the memory beside it sits idle. A user's own setting of these variables wins.
GPU_MEMORY_SHARING = {"TF_FORCE_GPU_ALLOW_GROWTH": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
# What a run records in its provenance: everything that decides where and in how much GPU
# memory it ran.
GPU_MEMORY_VARIABLES = (*GPU_MEMORY_SHARING, "XLA_PYTHON_CLIENT_MEM_FRACTION",
                        "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR",
                        "CUDA_VISIBLE_DEVICES")
# CPU features doctor shows (bfloat16 and matrix units): a hint, not a prediction; bfloat16's
# speed is measured (doctor._precision_speed).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "XLA_FLAGS")


def nvidia_gpus() -> list[dict]:
    """The GPUs the NVIDIA driver lists, whatever a framework can use: index (text, as
    CUDA_VISIBLE_DEVICES names it), name, memory in bytes (None if not reported) and uuid;
    [] without a driver. nvidia-smi is asked once per process (and PATH): it takes a few
    hundred milliseconds, and a sweep's estimate would otherwise ask it for every run."""
    return [dict(gpu) for gpu in _nvidia_smi(os.environ.get("PATH", os.defpath))]


@functools.cache
def _nvidia_smi(search_path: str) -> tuple[dict, ...]:
    program = shutil.which("nvidia-smi", path=search_path)
    if not program:
        return ()
    try:
        out = subprocess.run([program, "--query-gpu=index,name,memory.total,uuid",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    gpus = []
    for line in out.stdout.splitlines():
        index, _, rest = line.partition(",")
        fields = rest.rsplit(",", 2)  # a name with a comma in it stays whole
        if len(fields) != 3:
            continue
        name, memory, uuid = (field.strip() for field in fields)
        try:
            memory_bytes = int(float(memory)) * 2**20  # MiB
        except ValueError:  # "[N/A]"
            memory_bytes = None
        gpus.append({"index": index.strip(), "name": name, "memory": memory_bytes,
                     "uuid": uuid})
    return tuple(gpus)


def driver_gpus() -> list[str]:
    """The driver's GPUs as `nvidia-smi -L` lists them ("GPU 0: NVIDIA H100 (UUID: ...)")."""
    return [f"GPU {g['index']}: {g['name']} (UUID: {g['uuid']})" for g in nvidia_gpus()]


def gpus_hidden() -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing: the user chose the CPU."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed is not None and not [g for g in listed.split(",") if g.strip() not in ("", "-1")]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (containers, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def memory_bytes(available: bool = False) -> int | None:
    """The machine's memory, or what is available now (Linux: MemAvailable); None if unknown."""
    if available:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def free_cores(cores: int, load: float) -> int:
    """Cores not already busy: `load` is the 1-minute load average of the whole machine."""
    return min(cores, max(1, cores - round(load)))


def choose_workers(cores: int, free: int, gpus: int, runs: int, memory: int | None,
                   on_device: bool = False) -> tuple[int, str]:
    """How many worker processes to run `runs` runs in, and why, in words.

    scipy's L-BFGS-B keeps a run on the host between evaluations, one core each, so one GPU
    serves about as many workers as there are free cores; every GPU gets at least one.
    `on_device`: every run is lbfgs or adam, whose iterations run whole on the GPU, many per
    compiled call, the host idle meanwhile: a second worker on a GPU only splits it (and its
    memory: each run holds its own network, activations and history there, so the estimate
    would give each a share and refuse runs that fit alone). One worker per GPU then.
    Without a GPU, one single-threaded worker per free core: workers beyond the free cores
    fight for them (2 cores, 64 px: 2 workers made 1.26x the runs of 1 on an idle machine,
    0.67x while other processes kept both cores busy). Free memory (2.5 GiB per worker) and
    the number of runs cap the count.
    """
    busy = f" ({cores - free} busy with other work)" if free < cores else ""
    if gpus and on_device:
        n = gpus
        why = [f"{free} free core(s) of {cores}{busy} and {gpus} GPU(s), every run lbfgs or "
               "adam (on the GPU, the host idle): one worker per GPU"]
    elif gpus:
        n = max(free, gpus)
        why = [f"{free} free core(s) of {cores}{busy} and {gpus} GPU(s): one worker per free "
               "core, sharing the GPU(s)"]
    else:
        n = free
        why = [f"{free} free core(s) of {cores}{busy}, no GPU: one single-threaded worker per "
               "free core"]
    if memory is not None and n > max(1, memory // WORKER_MEMORY):
        n = max(1, memory // WORKER_MEMORY)
        why.append(f"capped at {n} by {memory / 2**30:.1f} GiB of free memory "
                   f"({WORKER_MEMORY / 2**30:g} GiB per worker)")
    if n > max(1, runs):
        n = max(1, runs)
        why.append(f"capped at {n} by the number of runs")
    return n, "; ".join(why)


def share_gpu_memory(environ=os.environ) -> dict:
    """Set the GPU memory sharing variables where the user has not; before a framework loads."""
    for name, value in GPU_MEMORY_SHARING.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in GPU_MEMORY_SHARING}


def gpu_memory_settings() -> dict:
    """The GPU placement and memory variables in effect, for a run's provenance."""
    return {name: os.environ[name] for name in GPU_MEMORY_VARIABLES if name in os.environ}


def unused_gpu_message(backend: str, device: str, gpus: list[str]) -> str | None:
    """One line when the driver lists a GPU that the backend does not compute on, with the
    fix; None when there is nothing to say (no GPU, or the user hid them on purpose)."""
    if not gpus or gpus_hidden() or device.startswith("gpu"):
        return None
    return (f"the NVIDIA driver lists {len(gpus)} GPU(s) ({gpus[0]}) but {backend} runs on "
            f"the CPU: install the CUDA builds with `make setup GPU=1` (or pip install -c "
            f"constraints.txt -e '.[cuda]')")


_warned: list[str] = []


def warn_if_gpu_unused(backend: str, device: str) -> None:
    """Log unused_gpu_message once per process (every run in it would say the same)."""
    if _warned:
        return
    message = unused_gpu_message(backend, device, driver_gpus())
    _warned.append(message or "")
    if message:
        log.warning("warning: %s; `python -m pipeline doctor` says more", message)
