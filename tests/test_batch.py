"""Batches as a user runs them overnight: sweeps and globs in real subprocesses, a broken file
in the batch, SIGKILL half way and the same command again, two invocations at once, worker
processes, and the table, status and report they leave behind."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import ROOT, cli_env, run_cli, write_config, write_image
from PIL import Image

from pipeline import batch, config, runs
from pipeline.runs import RunFolder

TERMS = ("total", "content", "style", "tv")


def write_sweep(folder, name, sweep=None, **extra):
    """A tiny batch: 24 px, 6 iterations, a checkpoint every 3; `sweep` makes it many runs."""
    settings = {"size": 24, "optimizer": {"iterations": 6}, "checkpoint_every": 3,
                "log_every": 3, **({"sweep": sweep} if sweep else {}), **extra}
    return write_config(folder, name, **settings)


def metrics_of(exp):
    """{run_id: metrics.json} for every run folder of an experiment."""
    return {p.parent.name: json.loads(p.read_text()) for p in exp.glob("*/metrics.json")}


def table(exp):
    with open(exp / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def wait_for(condition, proc, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"exited before {what}: {proc.communicate()}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def trace_length(exp, run_id):
    return len(RunFolder(exp / run_id).read_trace())


def start_batch(path, *args):
    """`python -m pipeline run PATH ARGS` in the background; stderr kept for the end."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path), *args],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def start_pool(folder, name):
    """A 4-run sweep under way with --workers 2, once each worker's run has begun."""
    path = write_sweep(folder, name, sweep={"loss.tv_weight": [0.01, 0.1, 1.0, 10.0]},
                       size=32, optimizer={"iterations": 30}, checkpoint_every=5)
    exp = folder / "out" / name
    ids = [job.run_id for job in batch.plan(config.load(path))]
    parent = start_batch(path, "--workers", "2")
    wait_for(lambda: min(trace_length(exp, i) for i in ids[:2]) >= 3, parent,
             "both workers' runs to start")
    return path, exp, ids, parent


# --------------------------------------------------------------------------- a 2x2 sweep


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A completed 2x2 sweep, shared by the tests that read what it left."""
    folder = tmp_path_factory.mktemp("grid")
    path = write_sweep(folder, "grid", sweep={"loss.tv_weight": [0.01, 1.0],
                                              "loss.style_weight": [0.001, 0.1]})
    proc = run_cli("run", path)
    assert proc.returncode == 0, proc.stderr
    return folder, path, folder / "out" / "grid", proc


def test_dry_run_lists_the_runs_and_runs_nothing(tmp_path):
    path = write_sweep(tmp_path, "dry", sweep={"size": [24, 32], "loss.tv_weight": [0, 1, 2]})
    proc = run_cli("run", path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6
    # Sorted keys (loss.tv_weight before size), the last key changing fastest.
    assert [line.split()[1:] for line in lines[:3]] == [
        ["loss.tv_weight=0", "size=24"], ["loss.tv_weight=0", "size=32"],
        ["loss.tv_weight=1", "size=24"]]
    assert len({line.split()[0] for line in lines}) == 6
    assert "6 run(s)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_sweep_runs_every_combination_once(grid):
    _, _, exp, proc = grid
    found = metrics_of(exp)
    assert len(found) == 4
    assert {m["status"] for m in found.values()} == {"completed"}
    assert {(m["swept"]["loss.style_weight"], m["swept"]["loss.tv_weight"])
            for m in found.values()} == {(a, b) for a in (0.001, 0.1) for b in (0.01, 1.0)}
    # Each run's saved config is the base with its swept values set, and nothing else moved.
    for run_id, m in found.items():
        saved = yaml.safe_load((exp / run_id / "config.yaml").read_text())
        assert saved["loss"]["style_weight"] == m["swept"]["loss.style_weight"]
        assert saved["loss"]["tv_weight"] == m["swept"]["loss.tv_weight"]
        assert saved["size"] == 24 and saved["sweep"] == {}
    assert "4 completed, 0 failed, 0 interrupted, 0 skipped" in proc.stderr
    log = (exp / "experiment.log").read_text()
    assert "summary: 4 run(s)" in log and all(run_id in log for run_id in found)


def test_runs_csv_has_a_row_per_run_with_its_values_and_losses(grid):
    _, _, exp, _ = grid
    rows = table(exp)
    found = metrics_of(exp)
    assert [row["run_id"] for row in rows] == [job.run_id for job in batch.plan(
        config.load(grid[1]))]
    assert list(rows[0])[:4] == ["run_id", "status", "loss.style_weight", "loss.tv_weight"]
    for row in rows:
        m = found[row["run_id"]]
        assert row["status"] == "completed"
        assert float(row["loss.style_weight"]) == m["swept"]["loss.style_weight"]
        assert float(row["loss.tv_weight"]) == m["swept"]["loss.tv_weight"]
        for term in TERMS:
            assert float(row[f"{term}_loss"]) == pytest.approx(m["loss"][term])
        assert int(row["iterations"]) == 6
        assert row["result"] == str(exp / row["run_id"] / "result.png")
        # The total is the weighted sum of the unweighted terms it sits beside.
        weighted = (config.LossConfig().content_weight * float(row["content_loss"])
                    + float(row["loss.style_weight"]) * float(row["style_loss"])
                    + float(row["loss.tv_weight"]) * float(row["tv_loss"]))
        assert float(row["total_loss"]) == pytest.approx(weighted, rel=1e-4)


def test_the_same_command_again_touches_nothing(grid):
    _, path, exp, _ = grid
    before = {run_id: mtimes(exp / run_id) for run_id in metrics_of(exp)}
    proc = run_cli("run", path)
    assert proc.returncode == 0, proc.stderr
    assert "0 completed, 0 failed, 0 interrupted, 4 skipped" in proc.stderr
    assert {run_id: mtimes(exp / run_id) for run_id in before} == before


def test_status_prints_counts_each_run_and_the_time_left(grid):
    _, _, exp, _ = grid
    proc = run_cli("status", exp)
    assert proc.returncode == 0, proc.stderr
    assert "4 run(s), not running" in proc.stdout
    assert "4 completed" in proc.stdout
    for run_id, m in metrics_of(exp).items():
        (line,) = [line for line in proc.stdout.splitlines() if run_id in line]
        assert "completed" in line and "6/6" in line
        assert f"loss.tv_weight={m['swept']['loss.tv_weight']}" in line
    assert "time left: none" in proc.stdout


def _find(sheet: np.ndarray, thumb: np.ndarray) -> tuple[int, int]:
    """Where `thumb` lies in `sheet`, pixel for pixel (the sheet is a lossless PNG)."""
    h, w = thumb.shape[:2]
    corner = np.lib.stride_tricks.sliding_window_view(sheet, (4, 4, 3))[..., 0, :, :, :]
    ys, xs = np.nonzero((corner == thumb[:4, :4]).all(axis=(2, 3, 4)))
    hits = [(y, x) for y, x in zip(ys, xs, strict=True)
            if np.array_equal(sheet[y:y + h, x:x + w], thumb)]
    assert len(hits) == 1, f"found {len(hits)} times"
    return hits[0]


def test_report_writes_a_page_a_labelled_grid_and_loss_curves(grid):
    _, _, exp, _ = grid
    proc = run_cli("report", exp)
    assert proc.returncode == 0, proc.stderr
    page = (exp / "report.html").read_text()
    found = metrics_of(exp)
    for run_id in found:
        assert run_id in page
        assert f'href="{run_id}/result.png"' in page
        loss_png = Image.open(exp / run_id / "loss.png")
        assert loss_png.format == "PNG" and loss_png.width > 200
    assert page.count("data:image/png;base64,") == 5  # 4 results + the sheet: self-contained
    assert "src=\"http" not in page and "<script" not in page

    # The contact sheet: style_weight (the first key) down the rows, tv_weight across.
    sheet = np.asarray(Image.open(exp / "contact_sheet.png").convert("RGB"))
    where = {}
    for m in found.values():
        result = Image.open(exp / m["run_id"] / "result.png").convert("RGB")
        scale = 192 / max(result.size)
        thumb = result.resize((round(result.width * scale), round(result.height * scale)),
                              Image.Resampling.LANCZOS)
        where[m["swept"]["loss.style_weight"], m["swept"]["loss.tv_weight"]] = _find(
            sheet, np.asarray(thumb))
    assert where[0.001, 0.01][0] == where[0.001, 1.0][0] < where[0.1, 0.01][0]  # rows
    assert where[0.001, 0.01][1] == where[0.1, 0.01][1] < where[0.001, 1.0][1]  # columns


# --------------------------------------------------------------------------- failures


def test_a_broken_image_fails_its_run_and_the_batch_goes_on(tmp_path):
    path = write_sweep(tmp_path, "photos", content="photos/*.png")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, stem in enumerate(("a", "b", "c")):
        write_image(photos / f"{stem}.png", (30, 30), seed=10 + i)
    good_b = (photos / "b.png").read_bytes()
    (photos / "b.png").write_bytes(good_b[:100])  # truncated, as by an interrupted copy
    proc = run_cli("run", path, "--retries", "1")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "2 completed, 1 failed" in proc.stderr
    assert "retrying 1 failed run(s)" in proc.stderr  # --retries 1: tried twice
    exp = tmp_path / "out" / "photos"
    by_content = {m["swept"]["content"]: m for m in metrics_of(exp).values()}
    assert [by_content[s]["status"] for s in "abc"] == ["completed", "failed", "completed"]
    assert "b.png" in by_content["b"]["error"]
    assert {row["content"]: row["status"] for row in table(exp)} == {
        "a": "completed", "b": "failed", "c": "completed"}
    assert "b.png" in next(row["error"] for row in table(exp) if row["content"] == "b")

    # Mended, the same command retries only the failed run.
    done = {s: mtimes(exp / by_content[s]["run_id"]) for s in "ac"}
    (photos / "b.png").write_bytes(good_b)
    again = run_cli("run", path)
    assert again.returncode == 0, again.stderr
    assert "1 completed, 0 failed, 0 interrupted, 2 skipped" in again.stderr
    assert {s: mtimes(exp / by_content[s]["run_id"]) for s in "ac"} == done
    # New pixels, new run id: the failed run's folder stays, out of the table and counts.
    assert [row["status"] for row in table(exp)] == ["completed"] * 3
    assert metrics_of(exp)[by_content["b"]["run_id"]]["status"] == "failed"
    status = run_cli("status", exp)
    assert "3 completed" in status.stdout and "failed" not in status.stdout.split("(")[0]
    assert "1 older run folder(s)" in status.stdout


def test_a_file_that_is_no_image_among_the_photos_fails_only_its_run(tmp_path):
    """The estimate reads every content image's header before any run starts: one it cannot
    read gets no estimate, and its run fails by itself, naming the file, while the others
    complete (exit 1). A .jpg that is really text, and a notes file the glob also matches."""
    path = write_sweep(tmp_path, "glob", content="photos/*")
    photos = tmp_path / "photos"
    photos.mkdir()
    for stem in ("a", "c"):
        write_image(photos / f"{stem}.jpg", (30, 30), seed=3)
    (photos / "b.jpg").write_text("not a photo: a text file saved as .jpg\n")
    (photos / "notes.txt").write_text("shot on a sunny day\n")
    proc = run_cli("run", path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "2 completed, 2 failed" in proc.stderr
    by_content = {m["swept"]["content"]: m for m in metrics_of(tmp_path / "out" / "glob").values()}
    assert {k: m["status"] for k, m in by_content.items()} == {
        "a": "completed", "b": "failed", "c": "completed", "notes": "failed"}
    assert "b.jpg: not a readable image" in by_content["b"]["error"]
    assert "notes.txt: not a readable image" in by_content["notes"]["error"]
    estimated = [line for line in proc.stderr.splitlines() if ": estimate: " in line]
    assert sorted(line.split(":")[0] for line in estimated) == sorted(
        by_content[k]["run_id"] for k in "ac")


def test_out_of_memory_names_the_size_and_a_smaller_one(tmp_path):
    cfg = config.load(write_sweep(tmp_path, "oom", size=1024))
    tf_text = ("OOM when allocating tensor with shape[1,64,1024,1024] and type float on "
               "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc")
    for error in (MemoryError(), RuntimeError(tf_text),
                  RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")):
        message = batch.describe_error(error, cfg)
        assert "out of memory at size 1024" in message
        assert "--set size=768" in message
    assert batch.describe_error(ValueError("bad\n  thing"), cfg) == "bad thing"


# --------------------------------------------------------------------------- kills and locks


def test_sigkill_mid_batch_then_the_same_command_finishes_each_run_once(tmp_path):
    # 100 iterations: the third run must still be under way after two more commands ran.
    path = write_sweep(tmp_path, "night", sweep={"loss.tv_weight": [0.01, 0.1, 1.0]},
                       size=32, optimizer={"iterations": 100}, checkpoint_every=5)
    exp = tmp_path / "out" / "night"
    ids = [job.run_id for job in batch.plan(config.load(path))]
    first = start_batch(path)
    wait_for(lambda: trace_length(exp, ids[1]) >= 3, first, "the second run to start")

    # A second invocation meanwhile is refused, names the holder and changes nothing.
    second = run_cli("run", path)
    assert second.returncode == 3, second.stderr
    assert f"pid {first.pid}" in second.stderr and str(exp) in second.stderr
    watching = run_cli("status", exp).stdout
    assert f"running: pid {first.pid}" in watching
    status = {run_id: line.split()[0] for line in watching.splitlines()
              for run_id in ids if run_id in line}
    assert status[ids[0]] == "completed" and status[ids[2]] in ("pending", "running")

    wait_for(lambda: trace_length(exp, ids[2]) >= 12, first, "the third run's 12th step")
    first.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    first.communicate(timeout=60)
    assert json.loads((exp / ids[2] / "metrics.json").read_text())["status"] == "running"
    # Every file is whole (a kill during a write can only leave a `.*.tmp` beside it).
    for saved in exp.rglob("*.json"):
        json.loads(saved.read_text())
    for png in exp.rglob("*.png"):
        Image.open(png).load()
    checkpoint = json.loads((exp / ids[2] / "metrics.json").read_text())["iterations"]
    assert checkpoint >= 10 and checkpoint % 5 == 0
    after = run_cli("status", exp).stdout
    assert "not running" in after
    (line,) = [line for line in after.splitlines() if ids[2] in line]
    assert line.split()[0] == "killed" and f"{checkpoint}/100" in line
    finished = {run_id: mtimes(exp / run_id) for run_id in ids[:2]}

    again = run_cli("run", path)
    assert again.returncode == 0, again.stderr
    assert "1 completed, 0 failed, 0 interrupted, 2 skipped" in again.stderr
    assert {run_id: mtimes(exp / run_id) for run_id in ids[:2]} == finished  # untouched
    found = metrics_of(exp)
    assert {found[i]["status"] for i in ids} == {"completed"}
    assert found[ids[2]]["resumed_from"] == checkpoint
    for run_id in ids:  # each run's trace counts every iteration exactly once
        trace = RunFolder(exp / run_id).read_trace()
        assert [row["iteration"] for row in trace] == list(range(1, 101))
        assert found[run_id]["iterations"] == 100
    assert [row["status"] for row in table(exp)] == ["completed"] * 3
    assert list(exp.rglob("*.tmp")) == []


def test_workers_share_the_batch_and_survive_their_parent_being_killed(tmp_path):
    path, exp, ids, parent = start_pool(tmp_path, "pool")  # two runs at once, one per worker
    parent.kill()
    parent.communicate(timeout=120)  # EOF on stderr: the orphaned workers have exited too
    # The orphaned workers notice, stop their runs at the next evaluation and save them;
    # the same command then waits for their locks, resumes both and runs the rest.
    again = run_cli("run", path, "--workers", "2")
    assert again.returncode == 0, again.stderr
    found = metrics_of(exp)
    assert {found[i]["status"] for i in ids} == {"completed"}
    for run_id in ids:
        trace = RunFolder(exp / run_id).read_trace()
        assert [row["iteration"] for row in trace] == list(range(1, 31))
    assert "[worker 0]" in (exp / "experiment.log").read_text()
    assert "[worker 1]" in (exp / "experiment.log").read_text()
    assert any(found[i]["resumed_from"] for i in ids[:2])
    # Each worker shares a GPU's memory (set before its framework loaded), says so, and its
    # runs record it.
    sharing = {"TF_FORCE_GPU_ALLOW_GROWTH": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    said = " ".join(f"{k}={v}" for k, v in sharing.items())
    for slot in (0, 1):
        assert re.search(rf"\[worker {slot}\] GPU \S+, \d+ CPU thread\(s\), {said}",
                         (exp / "experiment.log").read_text())
    for run_id in ids:
        provenance = yaml.safe_load((exp / run_id / "config.yaml").read_text())["provenance"]
        assert sharing.items() <= provenance["gpu_memory"].items()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_worker_killed_outright_fails_only_its_own_run(tmp_path, sig):
    """The out-of-memory killer's SIGKILL, or a crash in native code, breaks a process pool
    for good; the batch must fail the run that was in the dead worker, say how it died, and
    finish every other."""
    _, exp, ids, parent = start_pool(tmp_path, "dead")
    holder = runs.holder_of(exp / ".locks" / ids[0])  # "pid N on host since ..."
    victim = int(holder.split()[1])
    assert victim != parent.pid
    os.kill(victim, sig)
    _, stderr = parent.communicate(timeout=300)
    assert parent.returncode == 1, stderr
    assert "3 completed, 1 failed" in stderr
    found = metrics_of(exp)
    assert found[ids[0]]["status"] == "failed"
    error = found[ids[0]]["error"]
    assert f"its worker process (pid {victim})" in error
    if sig == signal.SIGKILL:
        assert "killed by SIGKILL" in error and "out-of-memory killer" in error
        assert "--set size=16" in error  # three quarters of 32, a multiple of 16
    else:
        assert "died of SIGSEGV" in error and "memory" not in error
    for run_id in ids[1:]:
        assert found[run_id]["status"] == "completed"
        trace = RunFolder(exp / run_id).read_trace()
        assert [row["iteration"] for row in trace] == list(range(1, 31))
    assert "a worker died; starting a new pool" in (exp / "experiment.log").read_text()
