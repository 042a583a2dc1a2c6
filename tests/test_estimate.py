"""The estimate. Real calibrations (fresh processes) at the real sizes, in a private cache
folder, checked against the peak memory of real runs measured by the kernel (VmHWM of a
fresh process) at sizes, styles and histories the calibrations did not use; the model's
arithmetic against hand computations from made-up calibrations; the size of a checkpoint
against a real state.npz; and the refusal of runs that cannot fit, as a single run (exit 2)
and in a sweep."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, cli_env, run_cli, write_config

from pipeline import batch, config, estimate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SCIPY_BYTES = 2 * 3 * 8  # s and y, float64, per pixel and correction: L-BFGS-B's own arrays


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder; calibrations at the real sizes, not the suite's small ones."""
    folder = tmp_path_factory.mktemp("cache")
    saved = dict(os.environ)
    os.environ[estimate.ENV_CACHE] = str(folder)
    os.environ.pop(estimate.ENV_SIZES, None)
    try:
        yield folder
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def calibrated(cache):
    return cache, estimate.calibration()


@pytest.fixture(scope="module")
def calibrated_lbfgs(cache):
    return estimate.calibration(setup={"method": "lbfgs"})


def cached(cache) -> dict:
    """{method: calibration} of the cache folder's files."""
    found = (json.loads(p.read_text()) for p in cache.glob("calibration-*.json"))
    return {c["key"]["method"]: c for c in found}


def measured_peak(path, cache, *args) -> tuple[int, subprocess.CompletedProcess]:
    """`python -m pipeline run PATH` in a fresh process, and that process's peak resident
    memory from the kernel (VmHWM; getrusage's ru_maxrss would inherit pytest's)."""
    code = ("import sys\nfrom pipeline.cli import main\nrc = main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print('peak', int(hwm.split()[1]) * 1024)\nsys.exit(rc)")
    env = {k: v for k, v in cli_env(**{estimate.ENV_CACHE: str(cache)}).items()
           if k != estimate.ENV_SIZES}
    proc = subprocess.run([sys.executable, "-c", code, "run", str(path), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    return int(proc.stdout.split("peak")[-1]), proc


def made_up(a=1e9, b=4000.0, c=1500.0, t=0.05, u=4e-6, history=None, device="cpu",
            device_memory=None) -> dict:
    """A calibration with round numbers, to check the estimate's arithmetic by hand."""
    return {"memory": [a, b], "style": c, "seconds": [t, u], "history": history,
            "device": device, "device_memory": device_memory}


def pixels_at(size, shape=(40, 48)):
    """(height x width) of a (height, width) image scaled to `size` on its long side, written
    out here rather than taken from the code."""
    h, w = shape
    return size * max(1, round(min(h, w) * size / max(h, w)))


# --------------------------------------------------------------------------- calibration


def test_calibration_is_measured_once_and_cached(calibrated):
    cache, cal = calibrated
    assert cached(cache)["scipy"] == cal
    p1, p2, p3 = cal["points"]
    small, large = estimate.CPU_SIZES
    assert (p1["size"], p2["size"], p3["size"]) == (small, large, small)
    assert p1["style_pixels"] == p1["pixels"] and p2["style_pixels"] == p2["pixels"]
    assert p3["style_pixels"] == (estimate.STYLE_FACTOR * small) ** 2
    # The fit goes through all three measurements (checked here by hand, not by _fit): the
    # same-size runs, and the larger style, whose extra pixels alone explain its extra memory.
    (a, b), c = cal["memory"], cal["style"]
    for p in (p1, p2, p3):
        assert a + b * p["pixels"] + c * p["style_pixels"] == pytest.approx(p["peak_bytes"],
                                                                          rel=1e-9)
    assert b > 0 and c > 0 and cal["seconds"][1] >= 0 and cal["history"] is None
    assert estimate.calibration() == cal  # read back, not measured again


def test_estimate_against_a_measured_peak(calibrated, tmp_path):
    """A real run at 320 px with style_scale 2 (both beyond the calibration's sizes: the style
    images' activations, computed once for the targets, grow with their own pixels) in a fresh
    process; its peak RSS from the kernel must be within 15% of the estimate. Its log starts
    with the estimate line, and in a sweep the run that cannot fit is marked failed while the
    other runs."""
    cache, cal = calibrated
    # tile: off, as the whole runs this measures (the 4096 px run would fit tile by tile).
    path = write_config(tmp_path, name="big", size=320, style_scale=2, checkpoint_every=0,
                        optimizer={"iterations": 2}, sweep={"size": [320, 4096]}, tile="off")
    jobs = batch.plan(config.load(path))
    ok, huge = (estimate.estimate(j.cfg, j.run_id, cal, 20e9) for j in jobs)
    # By hand: the 32 x 32 style at 640 px counts its own pixels, not the content's.
    assert ok.peak_bytes == pytest.approx(
        cal["memory"][0] + cal["memory"][1] * 320 * 267 + cal["style"] * 640 * 640, rel=1e-12)
    peak, proc = measured_peak(path, cache)
    assert proc.returncode == 1, proc.stderr  # one run failed: the one that cannot fit
    assert ok.peak_bytes == pytest.approx(peak, rel=0.15)
    # The part that grows with the images (over the smaller calibration run) is right too, not
    # only the framework's fixed share that dominates at small sizes.
    base = cal["points"][0]["peak_bytes"]
    assert ok.peak_bytes - base == pytest.approx(peak - base, rel=0.3)
    assert f"{jobs[0].run_id}: estimate: 320x267: peak memory" in proc.stderr
    metrics = json.loads((tmp_path / "out" / "big" / jobs[0].run_id / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    refused = json.loads((tmp_path / "out" / "big" / jobs[1].run_id / "metrics.json").read_text())
    assert refused["status"] == "failed" and "largest size that fits is" in refused["error"]
    assert not huge.fits and ok.fits


def test_lbfgs_history_against_a_measured_peak(cache, calibrated_lbfgs, tmp_path):
    """lbfgs's history costs far more than its s and y (2 x 3 x 4 bytes per pixel and
    correction): the while loop's copies and the history x pixels temporaries of its
    products, and a checkpoint's host copy. The calibration measures it; a real run at a size
    and a history the calibration did not use (320 px, history 100: the neural-style recipe's)
    peaks where the estimate says."""
    cal = calibrated_lbfgs
    p1, p2, p4 = cal["points"][0], cal["points"][1], cal["points"][3]
    low, high = cal["history"]["at"]
    assert (p4["size"], p4["history"], p2["history"]) == (estimate.CPU_SIZES[1], high, low)
    per_correction = (p4["peak_bytes"] - p2["peak_bytes"]) / ((high - low) * p2["pixels"])
    assert cal["history"]["memory"] == pytest.approx(per_correction)
    assert per_correction > 2 * 3 * 4
    path = write_config(tmp_path, name="long", size=320, checkpoint_every=3,
                        optimizer={"method": "lbfgs", "history": 100, "iterations": 3})
    (job,) = batch.plan(config.load(path))
    guess = estimate.estimate(job.cfg, job.run_id, cal, math.inf)
    peak, proc = measured_peak(path, cache)
    assert proc.returncode == 0, proc.stderr
    assert guess.peak_bytes == pytest.approx(peak, rel=0.15)
    base = p1["peak_bytes"]
    assert guess.peak_bytes - base == pytest.approx(peak - base, rel=0.3)


def test_each_network_precision_and_method_is_calibrated_on_its_own(calibrated, tmp_path):
    """lbfgs is not scipy (its history on the device, not in float64 on the host): a sweep over
    the method uses one calibration per setup, measured with that setup, and the default
    setup's is reused. Each run's estimate is checked against its own setup's numbers by
    hand."""
    cache, default = calibrated
    path = write_config(tmp_path, name="setups", size=64,
                        sweep={"optimizer.method": ["scipy", "lbfgs"]})
    jobs = batch.plan(config.load(path))
    lines = []
    estimates = estimate.for_jobs(jobs, log=lines.append)
    cals = cached(cache)
    assert cals["scipy"] == default and not [line for line in lines if "scipy" in line]
    assert (cals["lbfgs"]["key"]["network"], cals["lbfgs"]["key"]["precision"]) == (
        "vgg19", "float32")
    assert len(cals["lbfgs"]["points"]) == 4  # its history measured; scipy's is exact
    pixels, style_pixels = 64 * 53, 64 * 64  # content 40 x 48, style 32 x 32, at 64 px
    for job in jobs:
        cal = cals[job.cfg.optimizer.method]
        (a, b), c = cal["memory"], cal["style"]
        if job.cfg.optimizer.method == "scipy":  # history 10: the calibration's own
            history = 0.0
        else:  # history 30, 20 more than the calibration's
            history = cal["history"]["memory"] * 20 * pixels
        expected = a + b * pixels + c * style_pixels + history
        assert estimates[job.run_id].peak_bytes == pytest.approx(expected, rel=1e-12)


def test_a_single_run_that_cannot_fit_is_refused_before_it_starts(calibrated, tmp_path):
    cache, _ = calibrated
    path = write_config(tmp_path, name="huge", size=8192)
    proc = run_cli("run", path)
    assert proc.returncode == 2, proc.stderr
    assert "estimated peak memory" in proc.stderr and "--set size=" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
    proc = run_cli("estimate", path)
    assert proc.returncode == 0 and "does NOT fit: largest size" in proc.stdout


# --------------------------------------------------------------------------- arithmetic


def test_largest_size_that_fits_by_hand(tmp_path):
    cal = made_up()
    # content 40x48: 4096x3413; whole (tile: auto would take the smallest core here: Big prints)
    cfg = config.load(write_config(tmp_path, size=4096, tile="off"))
    pixels, style_pixels = 4096 * 3413, 4096 * 4096  # the 32 x 32 style at style_scale 1
    a, b, c = 1e9, 4000.0, 1500.0
    limit = a + b * 1000 * 833 + c * 1000 * 1000 + 1  # room for a 1000x833 run, and a little
    one = estimate.estimate(cfg, "x", cal, limit)
    assert one.width == 4096 and one.height == 3413
    assert one.peak_bytes == pytest.approx(a + b * pixels + c * style_pixels, rel=1e-12)
    assert not one.fits
    # sqrt(4832000001 / 81084416000) * 4096 = 999.9...: 992 is the multiple of 16 below it.
    assert one.largest_size == 992
    assert math.isclose(one.seconds, 12 * (0.05 + 4e-6 * pixels))
    assert estimate.estimate(cfg, "x", cal, a - 1).largest_size == 0


def test_every_stage_is_timed_at_its_own_size(tmp_path):
    cfg = config.load(write_config(tmp_path, size=40, scales=[24, 40], scale_iterations=[5, 7]))
    one = estimate.estimate(cfg, "x", made_up(t=0.5, u=1e-3), math.inf)
    assert (pixels_at(24), pixels_at(40)) == (24 * 20, 40 * 33)
    assert one.seconds == pytest.approx(5 * (0.5 + 1e-3 * 480) + 7 * (0.5 + 1e-3 * 1320))
    assert one.seconds_per_iteration == pytest.approx(0.5 + 1e-3 * 1320)
    assert one.peak_bytes == pytest.approx(1e9 + 4000 * 1320 + 1500 * 40 * 40)


def test_the_history_is_counted_by_method_and_device(tmp_path):
    """lbfgs: the calibrated cost per pixel and correction beyond the calibration's history
    (never below it); scipy: exactly its 2 x history float64 vectors, on the CPU only (on a GPU
    they are in the host's memory, not the device's); Adam: none."""
    history = {"at": [10, 200], "memory": 110.0, "seconds": 2e-8}
    pixels, style_pixels = pixels_at(64), 64 * 64
    base = 1e9 + 4000 * pixels + 1500 * style_pixels
    path = write_config(tmp_path, size=64)

    def peak(cal, *sets):
        cfg = config.load(path, list(sets))
        return estimate.estimate(cfg, "x", cal, math.inf)

    long = peak(made_up(history=history), "optimizer.method=lbfgs", "optimizer.history=100")
    assert long.peak_bytes == pytest.approx(base + 110.0 * 90 * pixels, rel=1e-12)
    assert long.seconds_per_iteration == pytest.approx(0.05 + (4e-6 + 2e-8 * 90) * pixels)
    short = peak(made_up(history=history), "optimizer.method=lbfgs", "optimizer.history=4")
    assert short.peak_bytes == pytest.approx(base, rel=1e-12)
    scipy = peak(made_up(), "optimizer.history=30")
    assert scipy.peak_bytes == pytest.approx(base + SCIPY_BYTES * 20 * pixels, rel=1e-12)
    on_gpu = peak(made_up(device="gpu: Fake"), "optimizer.history=30")
    assert on_gpu.peak_bytes == pytest.approx(base, rel=1e-12)
    adam = peak(made_up(), "optimizer.method=adam", "optimizer.history=30")
    assert adam.peak_bytes == pytest.approx(base, rel=1e-12)


def test_every_style_image_is_counted(tmp_path):
    from conftest import write_image

    write_config(tmp_path)
    write_image(tmp_path / "images" / "tall.png", (60, 20), seed=3)
    cfg = config.load(write_config(tmp_path, name="two", size=64, style_scale=1.5,
                                   style=["images/style.png", "images/tall.png"]))
    one = estimate.estimate(cfg, "x", made_up(), math.inf)
    # Each style at ceil(1.5 * 64) = 96 px on its long side: 96 x 96, and 96 x 32.
    assert one.peak_bytes == pytest.approx(1e9 + 4000 * pixels_at(64) + 1500 * (96 * 96 + 96 * 32))


def test_the_memory_limit_is_shared_by_the_workers(tmp_path, monkeypatch):
    """On a GPU, each of the workers sharing it gets its share of the device's memory; on the
    CPU, of the memory available now."""
    monkeypatch.setenv(estimate.ENV_CACHE, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    jobs = batch.plan(config.load(write_config(tmp_path, size=64, sweep={"seed": [1, 2]})))

    def limits(cal, workers):
        (tmp_path / "cache" / estimate.cache_name(estimate.calibration_key())).write_text(
            json.dumps({**cal, "key": {}, "points": []}))
        return {e.limit_bytes for e in estimate.for_jobs(jobs, workers).values()}

    assert limits(made_up(device="gpu: Fake", device_memory=60e9), 3) == {20e9}
    assert limits(made_up(device="gpu: Fake", device_memory=60e9), 1) == {60e9}
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    (four,) = limits(made_up(), 4)
    assert four == pytest.approx(available / 4, rel=0.1)  # the machine's memory moves a little


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_takes_on_disk_what_the_estimate_says(tmp_path):
    """A real lbfgs run stopped after its first checkpoint keeps state.npz (to resume); its
    size is the estimate's (uncompressed arrays, plus a few hundred bytes of headers each)."""
    cfg = config.load(write_config(tmp_path, size=32, checkpoint_every=2,
                                   optimizer={"method": "lbfgs", "history": 7, "iterations": 8}))
    (job,) = batch.plan(cfg)
    folder = batch.folder_of(job)
    outcome = batch.run_one(job, should_stop=lambda: folder.state.exists())
    assert outcome.status == "interrupted", outcome.message
    on_disk = folder.state.stat().st_size
    expected = estimate.state_bytes("lbfgs", 7, pixels_at(32))
    # image, gradient, best image and 2 x 7 history vectors of 32 x 27 x 3 float32, and the
    # two 7 x 7 products: 4 * (17 * 3 * 864 + 98) bytes.
    assert expected == 4 * (17 * 3 * 864 + 98)
    assert expected <= on_disk <= expected + 20 * 600


def test_a_large_checkpoint_is_named_in_the_estimate_line(tmp_path):
    path = write_config(tmp_path, size=512)
    history = {"at": [10, 200], "memory": 110.0, "seconds": 0.0}
    big = estimate.estimate(config.load(path, ["optimizer.method=lbfgs", "optimizer.history=100"]),
                            "x", made_up(history=history), math.inf)
    pixels = pixels_at(512)
    assert big.state_bytes == 4 * ((3 + 200) * 3 * pixels + 2 * 100 * 100)
    assert f"checkpoints {big.state_bytes / 1e9:.2f} GB on disk" in big.line()
    small = estimate.estimate(config.load(path), "x", made_up(), math.inf)
    assert small.state_bytes == 4 * 3 * pixels and "on disk" not in small.line()
    none = estimate.estimate(config.load(path, ["optimizer.method=lbfgs", "checkpoint_every=0"]),
                             "x", made_up(history=history), math.inf)
    assert none.state_bytes == 0  # no checkpoints, no state.npz


def test_the_generated_shape_comes_from_the_header_alone(tmp_path):
    from PIL import Image

    from pipeline import images

    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "a.png")
    whole = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(whole[:60])  # the header and no pixels
    assert estimate.generated_shape(str(tmp_path / "a.png"), 100) == (60, 100)
    with pytest.raises(images.ImageError, match="a.png"):
        images.load_image(tmp_path / "a.png")
