"""A run's folder across stops, kills and failures, driven in process through batch.run_one
and run_batch (the same code a command runs, without a new Python per run): resumes with
nothing left, resumes stopped at once, torn and lost checkpoints, write errors, a non-finite
loss, each kind of init, and what `status` and `report` make of an unfinished experiment."""

import fcntl
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import cli_env, run_cli, write_config, write_image

from pipeline import batch, cli, config, report, runs
from pipeline.images import load_image, read_png_text


def plan(folder, name, **extra):
    """The jobs of a tiny config (24 px, 6 iterations, a checkpoint every 3)."""
    settings = {"size": 24, "optimizer": {"iterations": 6}, "checkpoint_every": 3, **extra}
    return batch.plan(config.load(write_config(folder, name, **settings)))


def iterations_in(folder: runs.RunFolder) -> list[int]:
    return [row["iteration"] for row in folder.read_trace()]


def stop_after(count: int):
    """An on_step and a should_stop that stop a run once `count` iterations are done."""
    steps = []
    return steps.append, lambda: len(steps) >= count


class LastState:
    """A progress watcher that keeps a copy of the state.npz saved at `iteration`."""

    def __init__(self, folder: runs.RunFolder, iteration: int):
        self.folder, self.iteration, self.saved = folder, iteration, None

    def __call__(self, step):
        if step.iteration == self.iteration:
            self.saved = self.folder.state.read_bytes()

    def close(self):
        pass


def test_a_resume_with_nothing_left_finishes_without_another_iteration(tmp_path):
    """A SIGKILL after the checkpoint on the last iteration, before the result was saved.
    The folder as the kill left it is made from a completed run (which removes its state)
    and the state.npz it wrote at that checkpoint, with a time in it that only a resume can
    report: a restart would be as deterministic as the resume, and end with the same image."""
    (job,) = plan(tmp_path, "last")
    folder = batch.folder_of(job)
    watcher = LastState(folder, 6)
    first = batch.run_batch([job], progress=lambda job: watcher)[0]  # no stop event given
    assert first.status == "completed"
    assert not folder.state.exists()  # a finished run needs no state to resume from
    before, trace, best = folder.read_metrics(), folder.read_trace(), load_image(folder.result)
    folder.state.write_bytes(watcher.saved)
    state = folder.load_state()
    done = (int(state["iteration"]), int(state["evaluations"]), 1000.5)
    extra = {k: v for k, v in state.items()
             if k not in ("image", "iteration", "evaluations", "seconds")}
    folder.save_checkpoint(state["image"], done, {}, extra)
    folder.write_metrics({**before, "status": "running"})  # as the kill left it
    folder.result.unlink()

    again = batch.run_one(job)
    assert again.status == "completed"
    after = folder.read_metrics()
    assert (after["iterations"], after["evaluations"]) == (6, before["evaluations"])
    assert (after["seconds"], after["resumed_from"]) == (1000.5, 6)
    assert folder.read_trace() == trace  # not one row written again
    # The result is the best image of the run, as the uninterrupted run's was.
    np.testing.assert_array_equal(load_image(folder.result), best)
    assert after["loss"] == before["loss"] and after["initial_loss"] == before["initial_loss"]


# Peak memory of one checkpoint of 128 MB of optimiser state (an lbfgs memory at 185 px with
# history 100, say), in a fresh process: VmHWM is reset just before the save (clear_refs 5).
CHECKPOINT_PEAK = """
import sys, tempfile, numpy as np
from pipeline import runs

def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

state = {f"optimizer.{k}": np.ones((16, 1 << 20), np.float32) for k in ("s", "y")}
folder = runs.RunFolder(sys.argv[1])
folder.checkpoints.mkdir(parents=True)
before = kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
folder.save_checkpoint(np.zeros((8, 8, 3), np.float32), (1, 1, 0.0), {}, state)
print((kb("VmHWM:") - before) / 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak RSS reset")
def test_a_checkpoint_streams_the_optimiser_state_to_its_file(tmp_path):
    """Not a copy of it all in memory first (a BytesIO, then its bytes: twice the state)."""
    proc = subprocess.run([sys.executable, "-c", CHECKPOINT_PEAK, str(tmp_path / "run")],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    peak_mb = float(proc.stdout)
    assert peak_mb < 0.25 * 128, f"a checkpoint of 128 MB of state peaked {peak_mb:.0f} MB higher"
    with np.load(tmp_path / "run" / "checkpoints" / "state.npz") as saved:
        assert saved["optimizer.s"].shape == (16, 1 << 20) and saved["optimizer.y"].all()


def test_a_resume_stopped_before_any_new_iteration_keeps_the_best_image(tmp_path):
    (job,) = plan(tmp_path, "best", optimizer={"iterations": 12})
    on_step, should_stop = stop_after(4)
    first = batch.run_one(job, on_step, should_stop)
    assert first.status == "interrupted"
    folder = first.folder
    best, loss = load_image(folder.result), folder.read_metrics()["loss"]
    assert json.loads(read_png_text(folder.result)["loss"]) == loss
    # The checkpoint may hold a worse image than result.png (the best point evaluated can be
    # a line-search trial, not the last iterate): here a flat grey one.
    state = folder.load_state()
    done = (int(state["iteration"]), int(state["evaluations"]), float(state["seconds"]))
    folder.save_checkpoint(np.full_like(state["image"], 128), done, {})

    second = batch.run_one(job, should_stop=lambda: True)
    assert second.status == "interrupted"
    np.testing.assert_array_equal(load_image(folder.result), best)
    assert folder.read_metrics()["loss"] == loss

    third = batch.run_one(job)  # and from there it runs to the end
    assert third.status == "completed"
    assert iterations_in(folder) == list(range(1, 13))


@pytest.mark.parametrize("damage", ["torn", "missing"])
def test_an_unreadable_checkpoint_starts_the_run_again(tmp_path, damage, caplog):
    (job,) = plan(tmp_path, damage, optimizer={"iterations": 8}, checkpoint_every=2)
    on_step, should_stop = stop_after(5)
    folder = batch.run_one(job, on_step, should_stop).folder
    assert folder.read_metrics()["status"] == "interrupted"
    if damage == "torn":  # cut mid-write: a kill during a copy, a full disk
        folder.state.write_bytes(folder.state.read_bytes()[:300])
    else:
        folder.state.unlink()

    outcome = batch.run_one(job)
    assert outcome.status == "completed"
    metrics = folder.read_metrics()
    assert metrics["iterations"] == 8 and metrics["resumed_from"] is None
    assert iterations_in(folder) == list(range(1, 9))
    assert "no readable checkpoint" in caplog.text


def test_a_torn_last_trace_line_is_dropped_on_resume(tmp_path):
    (job,) = plan(tmp_path, "torn")
    on_step, should_stop = stop_after(3)
    folder = batch.run_one(job, on_step, should_stop).folder
    with open(folder.trace, "a") as f:
        f.write('{"iteration": 4, "evaluat')  # a kill in the middle of a line
    assert iterations_in(folder) == [1, 2, 3]
    assert batch.run_one(job).status == "completed"
    lines = folder.trace.read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_a_write_error_after_optimising_fails_that_run_and_the_batch_goes_on(tmp_path):
    jobs = plan(tmp_path, "disk", sweep={"loss.tv_weight": [0.1, 1.0]})
    blocked = batch.folder_of(jobs[0])
    (blocked.result / "in-the-way").mkdir(parents=True)  # result.png cannot be replaced
    outcomes = batch.run_batch(jobs, stop=threading.Event())
    assert [o.status for o in outcomes] == ["failed", "completed"]
    assert "result.png" in outcomes[0].message
    metrics = blocked.read_metrics()
    assert metrics["status"] == "failed" and "result.png" in metrics["error"]


def test_a_non_finite_loss_fails_the_run_and_keeps_the_best_image(tmp_path):
    # A style weight near float32's limit overflows the loss on the first evaluation.
    (job,) = plan(tmp_path, "overflow", loss={"style_weight": 1e38})
    outcome = batch.run_one(job)
    assert outcome.status == "failed"
    metrics = outcome.folder.read_metrics()
    assert metrics["status"] == "failed" and metrics["stop_reason"] == "non_finite"
    assert "non-finite loss at evaluation 1" in metrics["error"]
    # Nothing better was seen than the starting image: the content, at the run's size.
    from pipeline.stylize import prepare

    content, _ = prepare(job.cfg, load_image(job.cfg.content), [])
    np.testing.assert_allclose(load_image(outcome.folder.result), content, atol=0.5)


def test_each_init_runs_from_its_own_starting_image(tmp_path):
    style = tmp_path / "images" / "style.png"
    path = write_config(tmp_path, "inits", size=24, optimizer={"iterations": 6},
                        sweep={"init": ["noise", "style", str(style)]})
    write_image(style, (20, 24), seed=2)  # the content's shape at size 24: no resampling
    jobs = batch.plan(config.load(path))
    outcomes = batch.run_batch(jobs)
    assert [o.status for o in outcomes] == ["completed"] * 3
    first = {o.run_id: o.folder.read_trace()[0]["total"] for o in outcomes}
    initial = {job.cfg.init: o.folder.read_metrics()["initial_loss"]["total"]
               for job, o in zip(jobs, outcomes)}
    # `style` and the style image's path start from the same pixels; noise from others.
    assert initial["style"] == pytest.approx(initial[str(style)], rel=1e-5)
    assert initial["noise"] != pytest.approx(initial["style"], rel=1e-2)
    assert len(set(first.values())) >= 2


def test_weights_missing_fail_once_before_anything_is_created(tmp_path):
    path = write_config(tmp_path, "nets", size=24, model={"weights": "imagenet"},
                        sweep={"seed": [1, 2, 3]})
    proc = run_cli("run", path)  # tests run with PIPELINE_OFFLINE=1 and an empty Keras home
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ImageNet VGG19 weights are not in Keras's cache" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_look_at_the_experiment_does_not_refuse_a_starting_run(tmp_path):
    """`status` and `--dry-run` take a momentary shared lock; a run starting just then waits."""
    exp = tmp_path / "exp"
    exp.mkdir()
    fd = os.open(exp / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a look in progress
    threading.Timer(0.3, os.close, [fd]).start()
    with runs.experiment_lock(exp):
        assert runs.holder_of(exp / ".lock").startswith(f"pid {os.getpid()} ")


def test_report_and_status_of_an_experiment_with_failed_and_pending_runs(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, stem in enumerate("abc"):
        write_image(photos / f"{stem}.png", (30, 30), seed=20 + i)
    (photos / "b.png").write_bytes(b"not a picture")
    jobs = plan(tmp_path, "mixed", content="photos/*.png")
    exp = batch.folder_of(jobs[0]).path.parent
    runs.write_plan(exp, [{"run_id": j.run_id, "label": j.label, "iterations": 6} for j in jobs], 1)
    assert [batch.run_one(j).status for j in jobs[:2]] == ["completed", "failed"]  # c: pending

    page, sheet = report.write_report(exp)
    text = page.read_text()
    for job, status in zip(jobs, ("completed", "failed", "pending")):
        assert f'class="card {status}"' in text and job.run_id in text
    assert "b.png" in text  # the failed run's error, on its card
    # The sheet has one cell per run: the result's thumbnail, or a grey box for the others.
    cells = np.asarray(load_image(sheet))
    assert cells.shape[1] > 3 * report.THUMB

    assert cli.main(["status", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "1 completed, 1 failed, 1 pending" in out
    assert "time left: about" in out  # from the completed run's pace: 12 iterations left


def test_report_of_a_single_run_with_nothing_swept(tmp_path):
    (job,) = plan(tmp_path, "single")
    assert batch.run_one(job).status == "completed"
    page, sheet = report.write_report(batch.folder_of(job).path.parent)
    assert "Swept: nothing" in page.read_text()
    assert load_image(sheet).shape[1] < 2 * report.THUMB  # one cell


def test_time_left_counts_the_iterations_of_runs_under_way(tmp_path):
    """Hand-computed: 10 + 4 iterations took 7 s (0.5 s each); 6 + 10 are left, 2 workers."""
    def row(status, iterations, seconds, planned=10):
        return {"status": status, "iterations": iterations, "seconds": seconds,
                "planned_iterations": planned, "folder": runs.RunFolder(tmp_path / status)}

    (tmp_path / "running").mkdir()
    with open(tmp_path / "running" / "trace.jsonl", "w") as f:  # the trace runs ahead
        for i in range(1, 5):
            f.write(json.dumps({"iteration": i}) + "\n")
    rows = [row("completed", 10, 5.0), row("running", 2, 2.0), row("pending", 0, None)]
    # done: 10 + 2 (metrics) = 12 iterations in 7 s; left: (10 - 4) + 10 = 16; 2 workers.
    assert cli._time_left(rows, 2) == "about 0m04s"  # 16 * 7 / 12 / 2 = 4.7 s

