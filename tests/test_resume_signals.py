"""Coarse-to-fine runs stopped by real signals just after a stage ended, resumed by the same
command, and compared with the same runs left alone: `python -m pipeline run` in real
subprocesses, SIGTERM (the run saves and exits 130) and SIGKILL (nothing runs on the way out).

The stop lands after stage 1's last checkpoint, while stage 2 compiles or makes its first
call: the resumed run must start stage 2 from stage 1's best image, as a run never stopped
does, not from stage 1's last iterate. Stage 1 is 15 iterations because there both device
optimisers have just overshot (their last iterate is not their best), so the two differ.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, cli_env, run_cli, write_config

from pipeline.images import load_image
from pipeline.runs import RunFolder

# The signal each method's run is stopped with. scipy's optimiser memory is not saved, but at
# a stage's end there is none to lose: its resume is exact there too.
SIGNALS = {"lbfgs": signal.SIGTERM, "adam": signal.SIGKILL, "scipy": signal.SIGKILL}
SETTINGS = dict(size=40, scales=[24, 40], scale_iterations=[15, 6], checkpoint_every=3,
                loss={"style_weight": 1000},
                model={"weights": "random", "content_layers": ["block1_conv2"],
                       "style_layers": ["block1_conv1"]},
                sweep={"optimizer.method": list(SIGNALS)})
# Each method would calibrate the memory estimate once (30-60 s each on 2 cores); the
# estimate is not what these runs test.
ENV = {"PIPELINE_SKIP_ESTIMATE": "1"}


def folders(exp) -> dict[str, RunFolder]:
    """The experiment's run folders by optimizer.method."""
    out = {}
    for metrics in exp.glob("*/metrics.json"):
        method = json.loads(metrics.read_text())["swept"]["optimizer.method"]
        out[method] = RunFolder(metrics.parent)
    return out


def stop_after_stage_one(config, exp, method):
    """Start the command, wait until `method`'s run has saved its checkpoint at iteration 15
    (stage 1's last), send its signal; returns the exit code and what the stop left."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], cwd=ROOT,
                            env=cli_env(**ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while True:
        folder = folders(exp).get(method) if exp.exists() else None
        state = folder.load_state() if folder else None
        if state is not None and int(state["iteration"]) >= 15:
            break
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached iteration 15"
        time.sleep(0.02)
    os.kill(proc.pid, SIGNALS[method])
    _, stderr = proc.communicate(timeout=120)
    state = folder.load_state()
    return proc.returncode, stderr, {"stage": int(state["stage"]),
                                     "iteration": int(state["iteration"]),
                                     "status": folder.read_metrics()["status"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signals")
    whole = write_config(folder, "whole", **SETTINGS)
    proc = run_cli("run", whole, env=ENV)
    assert proc.returncode == 0, proc.stderr
    parts = write_config(folder, "parts", **SETTINGS)
    exp = folder / "out" / "parts"
    # One method's run per command: each command first finishes the run stopped before.
    stops = {method: stop_after_stage_one(parts, exp, method) for method in SIGNALS}
    proc = run_cli("run", parts, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return folders(folder / "out" / "whole"), folders(exp), stops


@pytest.mark.parametrize("method", list(SIGNALS))
def test_a_run_stopped_between_stages_resumes_as_if_never_stopped(runs, method):
    whole, parts, stops = runs
    code, stderr, left = stops[method]
    if SIGNALS[method] == signal.SIGTERM:
        assert code == 130, stderr
        assert left == {"stage": 1, "iteration": 15, "status": "interrupted"}, \
            "the stop did not land between the stages"
    else:
        assert code == -signal.SIGKILL
        assert left == {"stage": 1, "iteration": 15, "status": "running"}
    a, b = whole[method], parts[method]
    metrics = {name: f.read_metrics() for name, f in (("whole", a), ("parts", b))}
    assert metrics["parts"]["status"] == "completed" and metrics["parts"]["resumed_from"] == 15

    def rows(folder):  # every column but the wall time
        return [{k: v for k, v in row.items() if k != "seconds"} for row in folder.read_trace()]

    trace = rows(a)
    assert [r["iteration"] for r in trace] == list(range(1, 22))
    if method != "scipy":  # the case at stake: stage 1's last iterate is not its best
        assert trace[14]["total"] > min(r["total"] for r in trace[:14])
    resumed = rows(b)
    problems = [f"trace row {r['iteration']} differs" for r, q in zip(trace, resumed) if r != q]
    if len(resumed) != len(trace):
        problems.append(f"{len(resumed)} trace rows")
    if not np.array_equal(load_image(b.result), load_image(a.result)):
        problems.append("result.png differs")
    # initial_loss is the first evaluation's, from the first part: a SIGKILL left none in
    # metrics.json, and the resumed part's first evaluation is another image's.
    problems += [f"{key} differs" for key in ("loss", "evaluations", "iterations", "initial_loss")
                 if metrics["parts"][key] != metrics["whole"][key]]
    assert not problems, "; ".join(problems)
    assert not b.state.exists() and not a.state.exists()  # finished runs keep no state
