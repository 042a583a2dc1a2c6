"""Shared test set-up: no test may reach the network, so ImageNet weights are never fetched
(PIPELINE_OFFLINE) and Keras's cache is a private empty folder.

The estimate runs as it does for users: every `run` in a test estimates its runs first. Its
calibration is measured once per setup for the whole session, into a session folder
(PIPELINE_CACHE_DIR) that the session's worker processes share, at small sizes
(PIPELINE_CALIBRATION_SIZES: each calibration run costs mostly the framework's start-up, ~8 s
on 2 cores, whatever the size). The estimate's accuracy tests calibrate at the real sizes
(tests/test_estimate.py). A test that turns the estimate off says why, where it does."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
os.environ["PIPELINE_OFFLINE"] = "1"
os.environ.pop("PIPELINE_SKIP_ESTIMATE", None)  # the user's path, whatever the shell says
# `make test` runs the files on two processes (pytest-xdist): the workers inherit the folder
# the first process made, so each calibration is measured once (the cache's lock lets one
# process measure while the other waits), and only that process removes it.
SESSION_CACHE = os.environ.get("PIPELINE_TEST_SESSION_CACHE")
if SESSION_CACHE is None:
    SESSION_CACHE = tempfile.mkdtemp(prefix="pipeline-cache-")
    os.environ["PIPELINE_TEST_SESSION_CACHE"] = SESSION_CACHE
    atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)
os.environ["PIPELINE_CACHE_DIR"] = SESSION_CACHE
os.environ["PIPELINE_CALIBRATION_SIZES"] = SMALL_CALIBRATION = "32,48"
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="keras-home-"))
if shutil.which("nvidia-smi"):  # the test process and the runs it starts share one GPU
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def write_image(path, shape, seed=0):
    """A smooth, seeded RGB picture (gradients plus a little noise) saved as a real file."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1),
                       128 + 60 * np.sin(xx / 3 + seed)], axis=-1)
    pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return Path(path)


def saved_from_keras_applications(ref, application, path):
    """`ref`'s weights copied into keras.applications' own network (VGG19 or VGG16, no top)
    by layer name and saved there: a weights file as a user would save one. Returns path."""
    theirs = application(include_top=False, weights=None)
    for layer in theirs.layers:
        if layer.get_weights():
            layer.set_weights(ref.get_layer(layer.name).get_weights())
    theirs.save_weights(path)
    return path


def write_config(folder, name="tiny", **extra):
    """A small run's YAML (random weights, 32 px, 12 iterations) beside its two images;
    `extra` keys replace the defaults."""
    images = folder / "images"
    images.mkdir(exist_ok=True)
    write_image(images / "content.png", (40, 48), seed=1)
    write_image(images / "style.png", (32, 32), seed=2)
    data = {
        "name": name,
        "output_dir": "out",
        "content": "images/content.png",
        "style": "images/style.png",
        "size": 32,
        "model": {"weights": "random"},
        "optimizer": {"iterations": 12},
        "checkpoint_every": 5,
        "log_every": 4,
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def images_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "content.png", (40, 48), seed=1)
    write_image(folder / "style.png", (32, 32), seed=2)
    return folder


def run_cli(*args, env=None, cwd=None, timeout=600):
    """`python -m pipeline ARGS` as a user runs it: a real subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd or ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def cli_env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}
