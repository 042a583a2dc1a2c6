"""The machine and what is chosen from it: BLAS threads around scipy, the worker count, the
unused-GPU warning, and `doctor`. A GPU is faked by a small `nvidia-smi` script put first on
PATH (an external tool, not our code); everything of ours runs for real."""

import hashlib
import importlib.metadata
import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize  # noqa: F401  (loads scipy's BLAS, as a run does)
from conftest import ROOT, run_cli, write_config
from threadpoolctl import threadpool_info, threadpool_limits

from pipeline import hardware, optimize, weights

GiB = 2**30


def blas_threads() -> set[int]:
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


@pytest.fixture
def fake_gpus(tmp_path):
    """A PATH whose first `nvidia-smi` lists `count` made-up GPUs of 80 GiB (`-L`, or the
    fields a `--query-gpu=` asks for, as CSV), noting each call in `tmp_path / "calls"`."""

    def make(count=1):
        folder = tmp_path / "fake-driver"
        folder.mkdir(exist_ok=True)
        script = folder / "nvidia-smi"
        script.write_text(f"""#!{sys.executable}
import sys
with open({str(tmp_path / "calls")!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
gpus = [{{"index": str(i), "name": f"NVIDIA Fake {{i}}", "memory.total": "81920",
          "uuid": f"GPU-{{i:04d}}"}} for i in range({count})]
query = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--query-gpu=")]
for gpu in gpus:
    if query:
        print(", ".join(gpu[field] for field in query[0].split(",")))
    else:
        print(f"GPU {{gpu['index']}}: {{gpu['name']}} (UUID: {{gpu['uuid']}})")
""")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return f"{folder}{os.pathsep}{os.environ['PATH']}"

    return make


# ------------------------------------------------------------------ BLAS around L-BFGS-B


def recording_quadratic(seen):
    target = np.random.default_rng(0).uniform(0, 255, (6, 6, 3))

    def vg(x):
        seen.append(blas_threads())  # while scipy's L-BFGS-B is under way
        diff = x.astype(np.float64) - target
        return float(np.sum(diff**2)), {}, 2 * diff

    return vg


def test_blas_runs_one_thread_while_scipy_optimises_and_is_restored_after():
    assert blas_threads(), "no BLAS library loaded: nothing to test"
    seen = []
    with threadpool_limits(2, user_api="blas"):  # what a 2-core machine has without a limit
        assert blas_threads() == {2}
        result = optimize.minimize(recording_quadratic(seen), np.zeros((6, 6, 3), np.float32),
                                   iterations=5)
        assert blas_threads() == {2}
    assert result.evaluations == len(seen) >= 5
    assert all(threads == {1} for threads in seen)


def test_blas_limit_is_lifted_when_the_objective_raises():
    def broken(x):
        raise RuntimeError("the network broke")

    with threadpool_limits(2, user_api="blas"):
        with pytest.raises(RuntimeError, match="network broke"):
            optimize.minimize(broken, np.zeros((2, 2, 3), np.float32), iterations=3)
        assert blas_threads() == {2}


# ------------------------------------------------------------------ choosing the workers


@pytest.mark.parametrize("cores, load, free", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 9.0, 1), (16, 3.2, 13), (4, -1.0, 4)])
def test_free_cores(cores, load, free):
    assert hardware.free_cores(cores, load) == free


@pytest.mark.parametrize("cores, free, gpus, runs, memory, on_device, expected", [
    (2, 2, 0, 10, 24 * GiB, False, 2),      # one worker per core
    (2, 1, 0, 10, 24 * GiB, False, 1),      # the other core is busy with other work
    (16, 16, 1, 100, 512 * GiB, False, 16),  # one GPU serves a scipy worker per free core
    (4, 4, 8, 100, 512 * GiB, False, 8),    # every GPU gets a worker, even with fewer cores
    (16, 16, 1, 3, 512 * GiB, False, 3),    # no more workers than runs
    (64, 64, 0, 100, 24 * GiB, False, 9),   # 24 GiB free at 2.5 GiB per worker
    (8, 8, 0, 100, 1 * GiB, False, 1),      # too little memory for two
    (1, 1, 0, 0, None, False, 1),           # nothing to run still means one process
    (16, 16, 1, 100, 512 * GiB, True, 1),   # lbfgs/adam work on the GPU: one worker on it
    (4, 4, 2, 100, 512 * GiB, True, 2),     # ... one per GPU
    (16, 16, 4, 3, 512 * GiB, True, 3),     # ... and no more than runs
    (2, 2, 0, 10, 24 * GiB, True, 2),       # without a GPU they share the cores as scipy does
])
def test_choose_workers(cores, free, gpus, runs, memory, on_device, expected):
    count, why = hardware.choose_workers(cores, free, gpus, runs, memory, on_device)
    assert count == expected
    assert f"{free} free core(s) of {cores}" in why
    assert ("busy" in why) == (free < cores)
    uncapped = gpus if gpus and on_device else max(free, gpus)
    assert ("capped" in why) == (expected < uncapped)
    assert ("one worker per GPU" in why) == bool(gpus and on_device)


def auto_choice(stderr, cores):
    """(count, free cores, memory cap or None) from the `--workers auto` log line; a memory
    cap is checked against the free memory it names (2.5 GiB per worker)."""
    found = re.search(rf"--workers auto: (\d+) \((\d+) free core\(s\) of {cores}\b.*", stderr)
    assert found, stderr
    capped = re.search(r"capped at (\d+) by ([\d.]+) GiB of free memory", found[0])
    if capped:  # the GiB are rounded to 0.1: either side of it
        gib = float(capped[2])
        assert int(capped[1]) in {max(1, int((gib + d) // 2.5)) for d in (-0.05, 0.05)}
    return int(found[1]), int(found[2]), int(capped[1]) if capped else None


def test_workers_auto_says_what_it_picked(tmp_path, fake_gpus):
    config = write_config(tmp_path, "auto", sweep={"loss.tv_weight": [0, 1, 2, 3, 4, 5]})
    proc = run_cli("run", config, "--workers", "auto", "--dry-run",
                   env={"PATH": fake_gpus(3)})
    assert proc.returncode == 0, proc.stderr
    cores = len(os.sched_getaffinity(0))
    # The machine's load and free memory move between this test and the command: read what
    # the command counted, and check the choice made from it.
    count, free, memory_cap = auto_choice(proc.stderr, cores)
    assert 1 <= free <= cores
    assert "3 GPU(s): one worker per free core" in proc.stderr
    assert count == min(max(free, 3), 6, memory_cap or 6)
    if memory_cap is not None:
        assert memory_cap < min(max(free, 3), 6)
    # Every run lbfgs: one worker per GPU, whatever the free cores.
    proc = run_cli("run", config, "--workers", "auto", "--dry-run",
                   "--set", "optimizer.method=lbfgs", env={"PATH": fake_gpus(3)})
    count, free, memory_cap = auto_choice(proc.stderr, cores)
    assert "every run lbfgs or adam" in proc.stderr
    assert count == min(3, memory_cap or 3)
    assert run_cli("run", config, "--workers", "many").returncode == 2


def test_a_sweep_asks_the_driver_once(tmp_path, fake_gpus, monkeypatch):
    """nvidia-smi answers in a few hundred milliseconds, and a sweep's estimate asked it about
    twice per run: now once per process. The calibration is made up (for the fake GPU's name)
    so that nothing is measured."""
    from pipeline import estimate

    path = fake_gpus(1)
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv(estimate.ENV_CACHE, str(tmp_path / "cache"))
    key = estimate.calibration_key()
    assert key["device"] == "NVIDIA Fake 0"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / estimate.cache_name(key)).write_text(json.dumps({
        "key": key, "points": [], "memory": [2e9, 4000.0], "style": 1500.0,
        "seconds": [0.01, 1e-8], "history": None, "device": "gpu: NVIDIA Fake 0",
        "device_memory": None}))
    (tmp_path / "calls").unlink()
    config = write_config(tmp_path, "many", sweep={"seed": [1, 2, 3, 4, 5, 6]})
    proc = run_cli("estimate", config)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 6
    assert all("of 85.9 GB" in line for line in proc.stdout.splitlines())  # 81920 MiB
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


# ------------------------------------------------------------------ a GPU the backend ignores


def test_driver_gpus_reads_nvidia_smi(monkeypatch, fake_gpus):
    monkeypatch.setenv("PATH", fake_gpus(2))
    assert hardware.driver_gpus() == ["GPU 0: NVIDIA Fake 0 (UUID: GPU-0000)",
                                      "GPU 1: NVIDIA Fake 1 (UUID: GPU-0001)"]


def test_unused_gpu_message(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = ["GPU 0: NVIDIA Fake 0"]
    message = hardware.unused_gpu_message("jax", "cpu: cpu", gpus)
    assert "1 GPU(s)" in message and "jax runs on the CPU" in message
    assert "make setup GPU=1" in message
    assert hardware.unused_gpu_message("jax", "gpu: NVIDIA H100", gpus) is None
    assert hardware.unused_gpu_message("tensorflow", "cpu", []) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: nothing to say
    assert hardware.unused_gpu_message("tensorflow", "cpu", gpus) is None


def test_the_warning_is_said_once_per_process(monkeypatch, fake_gpus, caplog):
    monkeypatch.setenv("PATH", fake_gpus(1))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hardware, "_warned", [])
    for _ in range(3):  # every run in a process would say the same
        hardware.warn_if_gpu_unused("tensorflow", "cpu")
    assert [r.getMessage().count("NVIDIA driver lists") for r in caplog.records] == [1]


def test_a_run_on_a_gpu_machine_without_cuda_builds_says_so_in_one_line(tmp_path, fake_gpus):
    config = write_config(tmp_path, "warned", size=24, optimizer={"iterations": 1})
    # The estimate off: it would calibrate anew for the fake GPU (a calibration holds for one
    # device) and time the CPU under its name; what is checked here is the warning alone.
    proc = run_cli("run", config, env={"PATH": fake_gpus(1), "PIPELINE_SKIP_ESTIMATE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "NVIDIA" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("warning: the NVIDIA driver lists 1 GPU(s)")
    assert "tensorflow runs on the CPU" in lines[0] and "make setup GPU=1" in lines[0]


# ------------------------------------------------------------------ doctor


def cpu_flags_from_proc():
    with open("/proc/cpuinfo") as f:
        return next(line for line in f if line.startswith("flags")).split(":")[1].split()


def test_doctor_reports_the_machine_and_exits_0_when_fine(tmp_path):
    env = doctor_env(tmp_path)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # doctor quiets TensorFlow itself
    proc = subprocess.run([sys.executable, "-m", "pipeline", "doctor"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    lines = {line[:12].strip(): line[12:].strip() for line in out.splitlines() if line[:12].strip()}
    assert lines["backend"].startswith("tensorflow")
    assert "CPU:0" in lines["devices"]
    assert lines["driver GPUs"].startswith("none")
    for package in ("keras", "tensorflow", "scipy", "numpy", "threadpoolctl"):
        assert f"{package} {importlib.metadata.version(package)}" in lines["versions"]
    for pool in threadpool_info():  # this process loaded the same numpy and scipy
        assert os.path.basename(pool["filepath"]) in lines["BLAS"]
    assert f"{len(os.sched_getaffinity(0))} usable core(s) of {os.cpu_count()}" in lines["CPU"]
    flags = cpu_flags_from_proc()
    for flag in ("avx512_bf16", "amx_bf16"):
        assert f"{flag} {'yes' if flag in flags else 'no'}" in lines["CPU"]
    expected = tmp_path / "keras" / "models" / weights.WEIGHTS_FILE
    assert lines["weights"] == (f"ImageNet VGG19 missing: looked for {expected} "
                                "($KERAS_HOME/models/, else ~/.keras/models/)")
    vgg16 = tmp_path / "keras" / "models" / weights.IMAGENET_FILES["vgg16"][0]
    assert f"ImageNet VGG16 missing: looked for {vgg16}" in out
    assert lines["verdict"].startswith("ok")
    # bfloat16 against float32, measured here (or read from this session's cache): advised
    # exactly when it measured at least 1.1x faster.
    found = re.fullmatch(r"float32 ([\d.]+) s, bfloat16 ([\d.]+) s per value-and-gradient at "
                         r"128 px: bfloat16 [\d.]+x (faster|slower) \((measured now.*|measured "
                         r".*, cached)\)", lines["precision"])
    assert found, lines["precision"]
    ratio = float(found[1]) / float(found[2])
    if abs(ratio - 1.1) > 0.02:  # printed to 3 digits: no verdict at the edge
        assert ("model.precision: bfloat16" in lines["verdict"]) == (ratio >= 1.1)
    assert not [line for line in proc.stderr.splitlines() if "oneDNN" in line], proc.stderr


def doctor_env(tmp_path, **extra):
    """Online (doctor never downloads), no driver, no thread variables, an empty Keras home."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIPELINE_OFFLINE", *hardware.THREAD_VARIABLES)}
    env.update(KERAS_HOME=str(tmp_path / "keras"), PYTHONPATH=str(ROOT), **extra)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(p, "nvidia-smi")))
    return env


@pytest.mark.parametrize("float32, bfloat16, advised", [
    (0.175, 0.236, False),  # an Intel Xeon with AVX512_BF16 and no AMX: 1.35x slower
    (0.154, 0.095, True),  # an AMD EPYC with AVX512_BF16: 1.6x faster
])
def test_bfloat16_is_advised_from_a_measurement_not_from_the_cpu_flags(
        tmp_path, monkeypatch, float32, bfloat16, advised):
    """The flags say nothing: what doctor says comes from what it measured on this machine
    (here, a measurement it cached earlier, made up as another machine's)."""
    from pipeline import autodiff, doctor

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    env = doctor_env(tmp_path)
    key, path = doctor.precision_cache("tensorflow", autodiff.environment()["device"])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": key, "seconds": {"float32": float32,
                                                        "bfloat16": bfloat16},
                                "measured": "2026-12-01 10:00:00"}))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "doctor"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (precision,) = [line for line in proc.stdout.splitlines() if line.startswith("precision")]
    speed = f"{float32 / bfloat16:.2f}x faster" if advised else f"{bfloat16 / float32:.2f}x slower"
    assert precision.split(None, 1)[1] == (
        f"float32 {float32:.3f} s, bfloat16 {bfloat16:.3f} s per value-and-gradient at 128 px: "
        f"bfloat16 {speed} (measured 2026-12-01 10:00:00, cached)")
    (verdict,) = [line for line in proc.stdout.splitlines() if line.startswith("verdict")]
    assert ("model.precision: bfloat16" in verdict) == advised


def test_doctor_names_each_problem_with_its_fix_and_exits_1(tmp_path, fake_gpus):
    damaged = tmp_path / "keras" / "models" / weights.WEIGHTS_FILE
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"a file by the right name, not the right bytes")
    assert hashlib.md5(damaged.read_bytes()).hexdigest() != weights.WEIGHTS_MD5
    damaged16 = damaged.with_name(weights.IMAGENET_FILES["vgg16"][0])  # every network's file
    damaged16.write_bytes(b"not VGG16's weights either")
    threads = len(os.sched_getaffinity(0)) + 3
    proc = run_cli("doctor", env={"PATH": fake_gpus(2), "KERAS_HOME": str(tmp_path / "keras"),
                                  "OMP_NUM_THREADS": str(threads)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "GPU 1: NVIDIA Fake 1" in proc.stdout
    (verdict,) = [line for line in proc.stdout.splitlines() if line.startswith("verdict")]
    assert "4 problem(s)" in verdict
    assert "2 GPU(s)" in verdict and "make setup GPU=1" in verdict
    assert f"OMP_NUM_THREADS={threads}" in verdict
    assert f"{damaged} is not Keras's VGG19 file (its MD5 differs)" in verdict
    assert f"{damaged16} is not Keras's VGG16 file (its MD5 differs)" in verdict
