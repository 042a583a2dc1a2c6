"""End to end, as a user runs it: `python -m pipeline run` in real subprocesses, with real
image files, the real VGG19 (random weights: no network here) and scipy's optimiser."""

import json
import os
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
    assert set(rows[0]) == {"iteration", "evaluations", "seconds", *TERMS, "stage", "size"}
    assert {(r["stage"], r["size"]) for r in rows} == {(1, 32)}
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
