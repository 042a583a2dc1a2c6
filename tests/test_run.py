"""End to end, as a user runs it: `python -m pipeline run` in real subprocesses, with real
image files, the real VGG19 (random weights: no network here) and scipy's optimiser."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import ROOT, cli_env, run_cli, write_config
from PIL import Image

from pipeline.images import load_image, read_png_text

METRIC_KEYS = {"status", "run_id", "iterations", "evaluations", "seconds", "initial_loss", "loss"}
TERMS = {"total", "content", "style", "tv"}


def only_run(folder, name="tiny", out="out"):
    (run,) = [p for p in (folder / out / name).glob("[!.]*") if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One completed run, shared by the tests that read its files."""
    folder = tmp_path_factory.mktemp("tiny")
    config = write_config(folder)
    proc = run_cli("run", config)
    assert proc.returncode == 0, proc.stderr
    return folder, config, proc


def test_run_writes_the_documented_files(tiny):
    folder, _, proc = tiny
    run = only_run(folder)
    assert run.name.startswith("tiny-")
    for name in ("result.png", "config.yaml", "metrics.json", "trace.jsonl"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").glob("*.png")) == [
        "iter_000005.png", "iter_000010.png"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["status"] == "completed" and metrics["run_id"] == run.name
    assert metrics["iterations"] == 12
    assert metrics["evaluations"] >= 12
    assert TERMS <= metrics["loss"].keys() and TERMS <= metrics["initial_loss"].keys()
    assert metrics["loss"]["total"] < 0.5 * metrics["initial_loss"]["total"]
    # The result is the content's shape at size 32 (40x48 -> 27x32), a real PNG with its id.
    assert load_image(run / "result.png").shape == (27, 32, 3)
    assert read_png_text(run / "result.png")["run_id"] == run.name
    # One trace line per iteration, in order, totals falling overall.
    rows = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"iteration", "evaluations", "seconds", *TERMS, "stage", "size",
                            "tile"}
    assert {(r["stage"], r["size"], r["tile"]) for r in rows} == {(1, 32, None)}  # whole
    assert rows[-1]["total"] < rows[0]["total"]
    # The resolved config records versions and can be run again as it is.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["size"] == 32 and os.path.isabs(saved["content"])
    for key in ("python", "keras", "scipy", "numpy", "backend", "device"):
        assert key in saved["provenance"]
    assert "iteration 4/12" in proc.stderr  # plain log lines when not on a terminal


def test_a_completed_run_is_not_redone(tiny):
    folder, config, _ = tiny
    run = only_run(folder)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = run_cli("run", config)
    assert proc.returncode == 0, proc.stderr
    assert "already completed" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_same_config_same_pixels(tiny, tmp_path):
    folder, config, _ = tiny
    proc = run_cli("run", config, "--set", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    again = only_run(tmp_path, "tiny", out="")
    first = np.asarray(Image.open(only_run(folder) / "result.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(again / "result.png")), first)


def test_jax_backend_gives_the_same_objective(tiny, tmp_path):
    """The random weights are drawn with numpy, so both backends see the same network: the
    loss at the first evaluation must agree to float32 precision."""
    folder, config, _ = tiny
    proc = run_cli("run", config, "--set", f"output_dir={tmp_path}",
                   env={"KERAS_BACKEND": "jax"})
    assert proc.returncode == 0, proc.stderr
    run = only_run(tmp_path, "tiny", out="")
    jax_metrics = json.loads((run / "metrics.json").read_text())
    tf_metrics = json.loads((only_run(folder) / "metrics.json").read_text())
    assert yaml.safe_load((run / "config.yaml").read_text())["provenance"]["backend"] == "jax"
    assert jax_metrics["status"] == "completed"
    for term in TERMS:
        assert jax_metrics["initial_loss"][term] == pytest.approx(
            tf_metrics["initial_loss"][term], rel=1e-3, abs=1e-3)
    assert jax_metrics["loss"]["total"] < 0.5 * jax_metrics["initial_loss"]["total"]


def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    config = write_config(tmp_path, name="long", size=48,
                          optimizer={"iterations": 60}, checkpoint_every=4)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    trace = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until the optimisation is well under way
        runs = list((tmp_path / "out" / "long").glob("*/trace.jsonl"))
        if runs and len(runs[0].read_text().splitlines()) >= 10:
            trace = runs[0]
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert trace is not None, "the run never got going"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    run = trace.parent
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    stopped_at = metrics["iterations"]
    assert 10 <= stopped_at < 60
    assert (run / "result.png").is_file()
    assert "resume" in stderr

    again = run_cli("run", config)
    assert again.returncode == 0, again.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["iterations"] == 60
    assert metrics["resumed_from"] == stopped_at  # saved at the stop, so nothing is redone
    rows = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 61))
    assert metrics["loss"]["total"] < rows[stopped_at - 1]["total"]


def test_a_broken_image_fails_the_run_with_its_name(tmp_path):
    config = write_config(tmp_path, name="broken")
    style = tmp_path / "images" / "style.png"
    style.write_bytes(style.read_bytes()[:60])  # truncated
    proc = run_cli("run", config)
    assert proc.returncode == 1
    assert "style.png" in proc.stderr and "Traceback" not in proc.stderr
    metrics = json.loads((only_run(tmp_path, "broken") / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "style.png" in metrics["error"]


def test_missing_imagenet_weights_end_with_instructions(tmp_path):
    config = write_config(tmp_path, name="imagenet", model={"weights": "imagenet"})
    proc = run_cli("run", config, env={"KERAS_HOME": str(tmp_path / "keras"),
                                       "PIPELINE_OFFLINE": "1"})
    assert proc.returncode == 2  # found before any run starts: nothing to resume
    assert "model.weights: random" in proc.stderr
    assert str(tmp_path / "keras" / "models") in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- what a user sees


def test_a_batch_already_done_calibrates_nothing(tiny, tmp_path):
    """Every run completed: the estimate has nothing to say, so no calibration starts (on a
    machine it has not seen, 30-60 s per setup for nothing)."""
    _, config, _ = tiny
    fresh = tmp_path / "cache"
    proc = run_cli("run", config, env={"PIPELINE_CACHE_DIR": str(fresh)})
    assert proc.returncode == 0, proc.stderr
    assert "already completed" in proc.stderr
    assert "calibrating" not in proc.stderr and not list(fresh.glob("calibration-*"))


def test_an_unwritable_estimate_cache_warns_once_and_the_runs_go_ahead(tiny, tmp_path):
    """PIPELINE_CACHE_DIR under a file: one warning, and the calibration lives in the
    temporary directory instead (copied there from this session's, so that nothing is measured
    again here); if that cannot be written either, the runs go ahead without the check."""
    from conftest import SESSION_CACHE

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    temp = tmp_path / "tmp"
    fallback = temp / f"style-pipeline-{os.getuid()}"
    shutil.copytree(SESSION_CACHE, fallback, ignore=shutil.ignore_patterns(".*"))
    env = {"PIPELINE_CACHE_DIR": str(blocker / "cache"), "TMPDIR": str(temp)}
    config = write_config(tmp_path, name="nocache", size=24, optimizer={"iterations": 2})

    def warned(proc):
        return [line for line in proc.stderr.splitlines() if "cannot write" in line]

    proc = run_cli("estimate", config, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and len(warned(proc)) == 1
    assert str(blocker / "cache") in warned(proc)[0] and str(fallback) in warned(proc)[0]
    assert "24x20: peak memory" in proc.stdout and "fits" in proc.stdout
    proc = run_cli("run", config, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and len(warned(proc)) == 1
    assert ": estimate: 24x20" in proc.stderr and "calibrating" not in proc.stderr

    shutil.rmtree(fallback)
    fallback.write_text("")  # neither can be written now
    config = write_config(tmp_path, name="nocheck", size=24, optimizer={"iterations": 2})
    proc = run_cli("run", config, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and len(warned(proc)) == 1
    assert "running without the memory check" in proc.stderr
    assert json.loads((only_run(tmp_path, "nocheck") / "metrics.json").read_text())[
        "status"] == "completed"


STARTUP_LINES = ("oneDNN custom operations", "Could not find cuda drivers",
                 "absl::InitializeLog", "failed call to cuInit", "cpu_feature_guard")


def test_tensorflow_start_up_lines_are_quiet_unless_asked_for(tmp_path):
    """The command line and each worker load TensorFlow; none of its INFO start-up lines (nor
    CUDA's failure to start on a machine without NVIDIA's driver) reach the user. A user's
    TF_CPP_MIN_LOG_LEVEL=0 brings them back."""
    env = {k: v for k, v in cli_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    config = write_config(tmp_path, name="quiet", size=24, optimizer={"iterations": 2},
                          sweep={"seed": [1, 2]})
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--workers",
                           "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "[worker 0]" in proc.stderr and "[worker 1]" in proc.stderr
    assert not [line for line in proc.stderr.splitlines()
                if any(text in line for text in STARTUP_LINES)], proc.stderr
    # framework.load is the one place every process loads TensorFlow through.
    proc = subprocess.run([sys.executable, "-c", "from pipeline import framework; "
                           "framework.load()"], cwd=ROOT, env={**env, "TF_CPP_MIN_LOG_LEVEL": "0"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "oneDNN custom operations are on" in proc.stderr


@pytest.mark.parametrize("line, level, driver, shown", [
    ("I0000 00:00:17.1 123 port.cc:153] oneDNN custom operations are on.", 1, False, False),
    ("I0000 00:00:17.1 123 port.cc:153] oneDNN custom operations are on.", 0, False, True),
    ("W0000 00:00:17.1 123 x.cc:1] a real warning", 1, False, True),
    ("W0000 00:00:17.1 123 x.cc:1] a real warning", 2, False, False),
    ("E0000 00:00:17.1 123 x.cc:1] a real error", 2, False, True),
    ("E0000 00:00:17.1 123 cuda_platform.cc:52] failed call to cuInit: INTERNAL", 1, False,
     False),
    ("E0000 00:00:17.1 123 cuda_platform.cc:52] failed call to cuInit: INTERNAL", 1, True, True),
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
     1, True, False),
    ("/x/keras/src/y.py:3: UserWarning: something a user should read", 3, False, True),
])
def test_which_start_up_lines_are_shown(line, level, driver, shown):
    from pipeline import framework

    assert framework.hidden(line + "\n", level, driver) is not shown
