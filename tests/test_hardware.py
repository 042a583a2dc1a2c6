"""The machine and what is chosen from it: BLAS threads around scipy, the worker count, the
unused-GPU warning, and `doctor`. A GPU is faked by a small `nvidia-smi` script put first on
PATH (an external tool, not our code); everything of ours runs for real."""

import hashlib
import importlib.metadata
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
    """A PATH whose first `nvidia-smi -L` lists `count` made-up GPUs."""

    def make(count=1):
        folder = tmp_path / "fake-driver"
        folder.mkdir(exist_ok=True)
        script = folder / "nvidia-smi"
        lines = "".join(f'echo "GPU {i}: NVIDIA Fake {i} (UUID: GPU-{i:04d})"\n'
                        for i in range(count))
        script.write_text("#!/bin/sh\n" + lines)
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


@pytest.mark.parametrize("cores, free, gpus, runs, memory, expected", [
    (2, 2, 0, 10, 24 * GiB, 2),      # one worker per core
    (2, 1, 0, 10, 24 * GiB, 1),      # the other core is busy with other work
    (16, 16, 1, 100, 512 * GiB, 16),  # one GPU serves a worker per free core
    (4, 4, 8, 100, 512 * GiB, 8),    # every GPU gets a worker, even with fewer cores
    (16, 16, 1, 3, 512 * GiB, 3),    # no more workers than runs
    (64, 64, 0, 100, 24 * GiB, 9),   # 24 GiB free at 2.5 GiB per worker
    (8, 8, 0, 100, 1 * GiB, 1),      # too little memory for two
    (1, 1, 0, 0, None, 1),           # nothing to run still means one process; memory unknown
])
def test_choose_workers(cores, free, gpus, runs, memory, expected):
    count, why = hardware.choose_workers(cores, free, gpus, runs, memory)
    assert count == expected
    assert f"{free} free core(s) of {cores}" in why
    assert ("busy" in why) == (free < cores)
    assert ("capped" in why) == (expected < max(free, gpus))


def test_workers_auto_says_what_it_picked(tmp_path, fake_gpus):
    config = write_config(tmp_path, "auto", sweep={"loss.tv_weight": [0, 1, 2, 3, 4, 5]})
    proc = run_cli("run", config, "--workers", "auto", "--dry-run",
                   env={"PATH": fake_gpus(3)})
    assert proc.returncode == 0, proc.stderr
    cores = len(os.sched_getaffinity(0))
    # The machine's load moves between this test and the command: read the free cores the
    # command counted, and check the choice made from them.
    found = re.search(rf"--workers auto: (\d+) \((\d+) free core\(s\) of {cores}\b",
                      proc.stderr)
    assert found, proc.stderr
    count, free = int(found[1]), int(found[2])
    assert 1 <= free <= cores
    assert "3 GPU(s)" in proc.stderr
    if "free memory" not in proc.stderr:  # a machine with under 15 GiB free caps it lower
        assert count == min(max(free, 3), 6)
    assert run_cli("run", config, "--workers", "many").returncode == 2


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
    proc = run_cli("run", config, env={"PATH": fake_gpus(1)})
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
    # Online (no PIPELINE_OFFLINE: doctor never downloads), no driver, no thread variables.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIPELINE_OFFLINE", *hardware.THREAD_VARIABLES)}
    env.update(KERAS_HOME=str(tmp_path / "keras"), PYTHONPATH=str(ROOT))
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(p, "nvidia-smi")))
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
    assert lines["verdict"].startswith("ok")
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(flags))
    assert ("model.precision: bfloat16" in lines["verdict"]) == native_bf16


@pytest.mark.parametrize("backend, device, flags, hinted", [
    ("tensorflow", "cpu", {"avx2", "avx512f", "avx512_bf16"}, True),
    ("tensorflow", "cpu", {"avx2", "amx_tile", "amx_bf16"}, True),
    ("tensorflow", "cpu", {"avx2", "avx512f"}, False),  # no bfloat16 unit: emulated, slower
    ("tensorflow", "cpu", None, False),  # flags unknown
    ("jax", "cpu: cpu", {"avx512_bf16"}, False),  # XLA's CPU backend does not gain
    ("tensorflow", "gpu: /physical_device:GPU:0", {"avx512_bf16"}, False),
])
def test_bfloat16_is_suggested_only_where_it_was_measured_faster(backend, device, flags, hinted):
    assert (hardware.bfloat16_hint(backend, device, flags) is not None) == hinted


def test_doctor_names_each_problem_with_its_fix_and_exits_1(tmp_path, fake_gpus):
    damaged = tmp_path / "keras" / "models" / weights.WEIGHTS_FILE
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"a file by the right name, not the right bytes")
    assert hashlib.md5(damaged.read_bytes()).hexdigest() != weights.WEIGHTS_MD5
    threads = len(os.sched_getaffinity(0)) + 3
    proc = run_cli("doctor", env={"PATH": fake_gpus(2), "KERAS_HOME": str(tmp_path / "keras"),
                                  "OMP_NUM_THREADS": str(threads)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "GPU 1: NVIDIA Fake 1" in proc.stdout
    (verdict,) = [line for line in proc.stdout.splitlines() if line.startswith("verdict")]
    assert "3 problem(s)" in verdict
    assert "2 GPU(s)" in verdict and "make setup GPU=1" in verdict
    assert f"OMP_NUM_THREADS={threads}" in verdict
    assert str(damaged) in verdict and "MD5" in verdict
