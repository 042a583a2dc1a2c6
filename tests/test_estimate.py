"""The estimate: a real calibration (two fresh processes) in a private cache folder, checked
against the peak memory of a real run measured by the kernel (getrusage in a fresh process),
and the refusal of runs that cannot fit, as a single run (exit 2) and in a sweep."""

import json
import math
import os
import sys

import pytest
from conftest import ROOT, cli_env, write_config

from pipeline import batch, config, estimate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    saved = dict(os.environ)
    os.environ.update({estimate.ENV_CACHE: str(cache), estimate.ENV_SKIP: "0"})
    try:
        yield cache, estimate.calibration()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_calibration_is_measured_once_and_cached(calibrated):
    cache, cal = calibrated
    (path,) = cache.glob("calibration-*.json")
    assert json.loads(path.read_text())["memory"] == cal["memory"]
    assert [p["size"] for p in cal["points"]] == list(estimate.CPU_SIZES)
    (p1, p2) = cal["points"]
    # The fit goes through both measurements (checked here by hand, not by _fit).
    a, b = cal["memory"]
    assert a + b * p1["pixels"] == pytest.approx(p1["peak_bytes"], rel=1e-9)
    assert a + b * p2["pixels"] == pytest.approx(p2["peak_bytes"], rel=1e-9)
    assert b > 0 and cal["seconds"][1] >= 0
    assert estimate.calibration() == cal  # read back, not measured again


def test_estimate_against_a_measured_peak(calibrated, tmp_path):
    """A real run at 320 px (beyond both calibration sizes) in a fresh process; its peak RSS
    from the kernel must be within 30% of the estimate. Its log starts with the estimate line,
    and in a sweep the run that cannot fit is marked failed while the other runs."""
    cache, cal = calibrated
    path = write_config(tmp_path, name="big", size=320, optimizer={"iterations": 2},
                        checkpoint_every=0, sweep={"size": [320, 8192]})
    jobs = batch.plan(config.load(path))
    ok, huge = (estimate.estimate(j.cfg, j.run_id, cal, 20e9) for j in jobs)
    # VmHWM, the kernel's own peak for this process (ru_maxrss would inherit pytest's).
    code = ("import sys\nfrom pipeline.cli import main\nrc = main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print('peak', int(hwm.split()[1]) * 1024)\nsys.exit(rc)")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code, "run", str(path)], cwd=ROOT,
                          env=cli_env(**{estimate.ENV_CACHE: str(cache), estimate.ENV_SKIP: "0"}),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr  # one run failed: the one that cannot fit
    peak = int(proc.stdout.split("peak")[-1])
    assert ok.peak_bytes == pytest.approx(peak, rel=0.3)
    # The part that grows with the image (over the smaller calibration run) is right too, not
    # only the framework's fixed share that dominates at small sizes.
    base = cal["points"][0]["peak_bytes"]
    assert ok.peak_bytes - base == pytest.approx(peak - base, rel=0.5)
    assert f"{jobs[0].run_id}: estimate: 320x267: peak memory" in proc.stderr
    metrics = json.loads((tmp_path / "out" / "big" / jobs[0].run_id / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    refused = json.loads((tmp_path / "out" / "big" / jobs[1].run_id / "metrics.json").read_text())
    assert refused["status"] == "failed" and "largest size that fits is" in refused["error"]
    assert not huge.fits and ok.fits


def test_largest_size_that_fits_by_hand(calibrated, tmp_path):
    _, cal = calibrated
    cfg = config.load(write_config(tmp_path, size=4096))  # content 40x48: 4096x3413
    a, b = cal["memory"]
    limit = a + b * 1000 * 833 + 1  # room for exactly a 1000x833 image, and a little more
    one = estimate.estimate(cfg, "x", cal, limit)
    assert one.width == 4096 and one.height == 3413
    assert one.peak_bytes == pytest.approx(a + b * 4096 * 3413)
    assert not one.fits
    # sqrt(1000 * 833 / (4096 * 3413)) * 4096 = 999.9...: 992 is the multiple of 16 below it.
    assert one.largest_size == 992
    assert math.isclose(one.seconds, 12 * (cal["seconds"][0] + cal["seconds"][1] * 4096 * 3413))


def test_a_single_run_that_cannot_fit_is_refused_before_it_starts(calibrated, tmp_path):
    cache, _ = calibrated
    from conftest import run_cli

    path = write_config(tmp_path, name="huge", size=8192)
    proc = run_cli("run", path, env={estimate.ENV_CACHE: str(cache), estimate.ENV_SKIP: "0"})
    assert proc.returncode == 2, proc.stderr
    assert "estimated peak memory" in proc.stderr and "--set size=" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
    proc = run_cli("estimate", path, env={estimate.ENV_CACHE: str(cache),
                                          estimate.ENV_SKIP: "0"})
    assert proc.returncode == 0 and "does NOT fit: largest size" in proc.stdout


def test_each_network_precision_and_method_is_calibrated_on_its_own(calibrated, tmp_path):
    """Adam is not scipy (no float64 host vectors, one evaluation per step): a sweep over the
    method calibrates the new setup once, with that setup, beside the default one, which it
    reuses; each run's estimate comes from its own setup's calibration."""
    cache, default = calibrated
    path = write_config(tmp_path, name="setups", size=64,
                        sweep={"optimizer.method": ["scipy", "adam"]})
    jobs = batch.plan(config.load(path))
    estimates = estimate.for_jobs(jobs)
    cals = {c["key"]["method"]: c for c in (json.loads(p.read_text())
                                           for p in cache.glob("calibration-*.json"))}
    assert set(cals) == {"scipy", "adam"} and cals["scipy"] == default
    assert (cals["adam"]["key"]["network"], cals["adam"]["key"]["precision"]) == (
        "vgg19", "float32")
    for job in jobs:
        cal = cals[job.cfg.optimizer.method]
        expected = estimate.estimate(job.cfg, job.run_id, cal, estimates[job.run_id].limit_bytes)
        assert estimates[job.run_id] == expected
