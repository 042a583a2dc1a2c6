"""`--executor ray` on a real local Ray cluster that this module starts (`ray start --head`,
2 CPUs, loopback only): the same runs as the local executor, a Ray worker killed outright,
SIGTERM to the driver and the same command again, a broken image among the runs.

Ray starts each driver's workers afresh, and TensorFlow with them: so this process is the
driver where a subprocess proves nothing more (its workers stay warm from test to test), and
the command line is the driver where signals and exit codes are the point."""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli, write_image
from PIL import Image
from test_batch import metrics_of, table, trace_length, wait_for, write_sweep
from test_video_run import write_clip, write_clip_config

from pipeline import batch, cli, cluster, config, hardware, runs
from pipeline.runs import RunFolder

# Every Ray process of these tests, the head's and the drivers', on the loopback interface
# alone (Ray otherwise picks the machine's outward address), with a token of their own.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DEDUP_LOGS": "0"}


@pytest.fixture(scope="module")
def head():
    """A one-node Ray cluster for the module, and this process connected to it as a driver;
    yields the cluster's address."""
    assert "ray" not in sys.modules  # RAY_ENV must be in place before ray is imported
    saved = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.update(RAY_ENV)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths live under it
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, hung = [], threading.Timer(180, proc.kill)  # a start that hangs ends the module
    hung.start()
    for line in proc.stdout:  # --block: it says so once everything is up, then waits
        lines.append(line)
        if "Ray runtime started" in line:
            break
    else:
        pytest.fail("ray start --head failed:\n" + "".join(lines))
    hung.cancel()
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    address = f"127.0.0.1:{port}"
    ray = cluster.import_ray()
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, namespace=cluster.NAMESPACE)
    signal.signal(signal.SIGTERM, sigterm)  # ray.init takes SIGTERM; pytest's own is kept
    yield address
    ray.shutdown()
    proc.send_signal(signal.SIGTERM)  # ray start --block stops what it started
    proc.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def on_ray(path, address):
    """This process as the driver: the runs of PATH through the Ray executor."""
    jobs = batch.plan(config.load(path))
    executor = cluster.RayExecutor(address, None, 1)
    executor.start(runs.experiment_dir(jobs[0].cfg), jobs)
    try:
        return executor, batch.run_batch(jobs, stop=threading.Event(), executor=executor)
    finally:
        executor.close()


def ray_run(path, address, *args, timeout=300):
    """`python -m pipeline run PATH --executor ray --address ADDRESS ARGS` to its end."""
    proc = start_ray_run(path, address, *args)
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr


def start_ray_run(path, address, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(path), "--executor", "ray",
         "--address", address, *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def iterations(exp, run_id):
    return [row["iteration"] for row in RunFolder(exp / run_id).read_trace()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_running_here():
    """Whether a Ray node runs on this machine (Ray's `auto` prefers one to a session file):
    its raylet's command line names the GCS address, which is how Ray itself looks."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"--gcs-address" in cmdline.read_bytes():
                return True
        except OSError:  # gone, or not ours to read
            pass
    return False


# Before the tests that start this module's cluster: `auto` must find none running.
@pytest.mark.parametrize("how", ["wrong-address", "stale-session"])
def test_an_address_where_no_cluster_answers_exits_2_in_seconds(tmp_path, how):
    """ray.init retries such an address for a quarter of an hour without a timeout. A stale
    session: `ray start` wrote the head's address into the session file, then the head died
    (no `ray stop` to clear the file); `--address auto` reads it."""
    port = free_port()  # nothing listens there: as a head that has gone
    ray_tmp = tmp_path / "ray-tmp"  # Ray's temp folder: the session file lives in it
    (ray_tmp / "ray").mkdir(parents=True)
    if how == "stale-session":
        if ray_running_here():
            pytest.skip("a Ray node runs on this machine: `auto` would connect to it")
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    address = "auto" if how == "stale-session" else f"127.0.0.1:{port}"
    path = write_sweep(tmp_path, "nowhere")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "--executor", "ray", "--address",
         address], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)},
        capture_output=True, text=True, timeout=120)  # unbounded, it would wait ~15 min
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert seconds < 60  # a bound, not a speed measurement
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback, no Ray retries
    assert line.startswith(f"error: --address {address}: no Ray cluster answers")
    assert f":{port}" in line and "connection refused" in line
    assert "ray start --head" in line  # how to start one
    assert not list((tmp_path / "out").glob("nowhere/*/metrics.json"))  # no run started


def test_a_sweep_on_ray_gives_the_local_executors_folders_ids_and_pixels(head, tmp_path):
    sweep = {"loss.tv_weight": [0.01, 1.0], "loss.style_weight": [0.001, 0.1]}
    path = write_sweep(tmp_path, "grid", sweep=sweep)
    executor, outcomes = on_ray(path, head)
    assert [o.status for o in outcomes] == ["completed"] * 4
    assert executor.capacity == 2 and executor.gpus == 0  # 2 CPUs, 1 CPU a run, no GPU
    exp = tmp_path / "out" / "grid"

    # The same config through the local executor, in this process, into another folder.
    local_cfg = config.load(path, [f"output_dir={tmp_path / 'local'}"])
    local = batch.run_batch(batch.plan(local_cfg), stop=threading.Event())
    assert [o.status for o in local] == ["completed"] * 4
    local_exp = tmp_path / "local" / "grid"

    ids = [job.run_id for job in batch.plan(config.load(path))]
    assert sorted(p.name for p in exp.iterdir() if p.is_dir() and p.name[0] != ".") == sorted(ids)
    assert sorted(metrics_of(local_exp)) == sorted(metrics_of(exp)) == sorted(ids)
    for run_id in ids:
        assert np.array_equal(pixels(exp / run_id / "result.png"),
                              pixels(local_exp / run_id / "result.png")), run_id
        assert iterations(exp, run_id) == list(range(1, 7))
    assert list(exp.glob(".probe-*")) == []  # the storage probe cleaned up after itself


def test_a_ray_worker_killed_outright_is_retried_and_resumes_from_its_checkpoint(head,
                                                                                tmp_path):
    path = write_sweep(tmp_path, "kill", sweep={"loss.tv_weight": [0.01, 1.0]}, size=32,
                       optimizer={"iterations": 40}, checkpoint_every=5)
    exp = tmp_path / "out" / "kill"
    ids = [job.run_id for job in batch.plan(config.load(path))]
    result = {}
    driver = threading.Thread(target=lambda: result.update(outcomes=on_ray(path, head)[1]))
    driver.start()
    folder = RunFolder(exp / ids[0])
    deadline = time.monotonic() + 300
    while not ((folder.read_metrics() or {}).get("iterations", 0) >= 5
               and trace_length(exp, ids[0]) >= 7):
        assert driver.is_alive() and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.05)
    victim = int(runs.holder_of(folder.lock).split()[1])  # "pid N on host since ..."
    assert victim != os.getpid()
    checkpoint = folder.read_metrics()["iterations"]
    before = folder.read_trace()[:checkpoint]
    os.kill(victim, signal.SIGKILL)  # the out-of-memory killer's way: no handler runs
    driver.join(timeout=300)
    assert [o.status for o in result["outcomes"]] == ["completed", "completed"]
    metrics = metrics_of(exp)
    assert metrics[ids[0]]["resumed_from"] >= checkpoint  # Ray's retry resumed, not restarted
    trace = folder.read_trace()
    # Every iteration once; those up to the checkpoint are the first attempt's, not redone.
    assert [row["iteration"] for row in trace] == list(range(1, 41))
    assert trace[:checkpoint] == before
    assert iterations(exp, ids[1]) == list(range(1, 41))


def test_a_broken_image_fails_only_its_own_run(head, tmp_path):
    path = write_sweep(tmp_path, "photos", content="photos/*.png")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, stem in enumerate(("a", "b")):
        write_image(photos / f"{stem}.png", (30, 30), seed=10 + i)
    (photos / "b.png").write_bytes((photos / "b.png").read_bytes()[:100])  # truncated
    _, outcomes = on_ray(path, head)
    assert [o.status for o in outcomes] == ["completed", "failed"]
    assert "b.png" in outcomes[1].message
    metrics = metrics_of(tmp_path / "out" / "photos")
    assert metrics[outcomes[1].run_id]["status"] == "failed"
    assert "b.png" in metrics[outcomes[1].run_id]["error"]


def test_clips_on_ray_are_tasks_whose_frames_run_in_order(head, tmp_path):
    """A sweep of two style weights over a 3-frame clip: each clip is one task, its frames in
    order (the trace's frame column), each frame equal bit for bit to the same command run
    locally with the task's one CPU thread (with two threads, float sums are taken in another
    order: frames 2 and 3 then differ by a grey level or more, frame 1 does not), and the flows
    computed once per experiment, as locally."""
    clip = write_clip(tmp_path)
    path = write_clip_config(tmp_path, "clips", clip, sweep={"loss.style_weight": [1e-3, 1.0]},
                             optimizer={"iterations": 4}, video={"first_iterations": 4})
    _, outcomes = on_ray(path, head)
    assert [o.status for o in outcomes] == ["completed"] * 2
    local = run_cli("run", path, "--set", f"output_dir={tmp_path / 'local'}",
                    env=hardware.thread_caps(1, os.environ))
    assert local.returncode == 0, local.stderr[-3000:]
    for outcome in outcomes:
        folder = tmp_path / "out" / "clips" / outcome.run_id
        rows = [json.loads(line) for line in (folder / "trace.jsonl").read_text().splitlines()]
        assert [r["frame"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
        assert (folder / "result.mp4").stat().st_size > 0
        for n in (1, 2, 3):
            name = f"frames/{n:06d}.png"
            assert np.array_equal(pixels(folder / name),
                                  pixels(tmp_path / "local" / "clips" / outcome.run_id / name))
    assert len(list((tmp_path / "out" / "clips" / "flows").iterdir())) == len(
        list((tmp_path / "local" / "clips" / "flows").iterdir())) > 0


def test_sigterm_to_the_driver_interrupts_its_runs_and_the_same_command_finishes_them(
        head, tmp_path, capsys):
    # 60 iterations: enough that no run ends in the second the stop takes to reach it. Two
    # stages, numbered across the run: 1-30 at 24 px, 31-60 at 32 px.
    path = write_sweep(tmp_path, "term", sweep={"loss.tv_weight": [0.01, 0.1, 1.0]}, size=32,
                       scales=[24, 32], scale_iterations=[30, 30], checkpoint_every=5)
    exp = tmp_path / "out" / "term"
    ids = [job.run_id for job in batch.plan(config.load(path))]
    driver = start_ray_run(path, head)
    wait_for(lambda: min(trace_length(exp, i) for i in ids[:2]) >= 3, driver,
             "two runs under way")
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr
    assert "2 interrupted" in stderr and "1 not started" in stderr
    found = metrics_of(exp)
    assert [found[i]["status"] for i in ids[:2]] == ["interrupted", "interrupted"]
    assert ids[2] not in found  # queued, never started
    assert [row["status"] for row in table(exp)] == ["interrupted", "interrupted", "pending"]
    stopped_at = {i: found[i]["iterations"] for i in ids[:2]}
    assert all(0 < n < 60 for n in stopped_at.values())

    rc, stderr = ray_run(path, head)
    assert rc == 0, stderr
    assert "3 completed, 0 failed, 0 interrupted" in stderr
    # The tasks' progress lines (Ray forwards them to the driver) count both stages.
    totals = re.findall(r": iteration \d+/(\d+) ", stderr)
    assert totals and set(totals) == {"60"}, stderr
    found = metrics_of(exp)
    for run_id in ids:
        assert found[run_id]["status"] == "completed"
        assert iterations(exp, run_id) == list(range(1, 61))
    assert [found[i]["resumed_from"] for i in ids[:2]] == [stopped_at[i] for i in ids[:2]]
    # The driver kept the experiment's files; status reads them as it does any other.
    assert [row["status"] for row in table(exp)] == ["completed"] * 3
    assert json.loads((exp / "plan.json").read_text())["workers"] == 2  # runs at once
    assert "summary: 3 run(s)" in (exp / "experiment.log").read_text()
    assert cli.main(["status", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "3 run(s), not running" in out and "3 completed" in out and "time left: none" in out


def test_a_second_driver_of_the_same_experiment_is_refused_by_the_cluster(head, tmp_path):
    """The experiment's flock may not hold on a cluster's file system; the cluster's own
    named actor does, whichever machine the second driver runs on."""
    path = write_sweep(tmp_path, "twice")
    jobs = batch.plan(config.load(path))
    exp = runs.experiment_dir(jobs[0].cfg)
    first, second = (cluster.RayExecutor(head, None, 1) for _ in range(2))
    first.start(exp, jobs)
    with pytest.raises(runs.Locked, match=f"experiment {exp} is in use by another driver"):
        second.start(exp, jobs)
    first.close()
    second.start(exp, jobs)  # free again
    second.close()


@pytest.mark.parametrize("unread", ["style.png", "style_mask.png", "content_mask.png",
                                    "init.png"])
def test_a_node_that_cannot_read_an_input_is_refused_before_anything_runs(head, tmp_path,
                                                                          unread):
    """Every file a run reads, masks and an init image too: a node without one would fail
    each run it takes, after the promise that the cluster was checked."""
    images = tmp_path / "images"
    images.mkdir()
    for name, seed in (("style_mask.png", 3), ("content_mask.png", 4), ("init.png", 5)):
        write_image(images / name, (24, 24), seed=seed)
    path = write_sweep(tmp_path, "unshared", style_masks=["images/style_mask.png"],
                       content_mask="images/content_mask.png", init="images/init.png")
    jobs = batch.plan(config.load(path))
    (images / unread).unlink()  # as on a node that does not mount it
    executor = cluster.RayExecutor(head, None, 1)
    with pytest.raises(config.ConfigError, match="must be shared by every node.*cannot read "
                       f".*{unread}"):
        executor.start(runs.experiment_dir(jobs[0].cfg), jobs)
    executor.close()


@pytest.mark.parametrize("args, message", [
    (["--address", "127.0.0.1:1"], "--address: only with --executor ray"),
    (["--executor", "ray", "--workers", "2"], "--workers is for --executor local"),
    (["--executor", "ray", "--gpus-per-run", "1.5"], "--gpus-per-run: a fraction up to 1"),
    (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run: must be more than 0"),
])
def test_executor_options_that_do_not_fit_exit_2(tmp_path, capsys, args, message):
    path = write_sweep(tmp_path, "options")
    assert cli.main(["run", str(path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_the_ray_extra_the_error_names_it(tmp_path):
    """A Python where `import ray` fails, as in a core install without the extra."""
    blocker = tmp_path / "blocker"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    path = write_sweep(tmp_path, "noray")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "--executor", "ray"], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}, capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {cluster.MISSING}"
    assert not (tmp_path / "out").exists()
