"""The device optimisers (optimizer.method lbfgs and adam) and model.precision.

The math is checked against independent computations: L-BFGS's direction against the
dense BFGS inverse-Hessian update in numpy, Adam against Keras's own Adam on the tutorial's
0..1 pixels, convergence against the closed-form bounded minimum of a quadratic. Then, with
the real VGG19 and real checkpoint files: a run stopped and resumed gives the same pixels, bit
for bit, as one that never stopped (TensorFlow here, JAX in a subprocess).
"""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ROOT, cli_env, write_config
from keras import ops

from pipeline import batch, config, images, model, optimize
from pipeline.losses import Objective
from pipeline.optimize import device
from pipeline.optimize.adam import Adam
from pipeline.optimize.lbfgs import LBFGS
from pipeline.stylize import prepare

SHAPE = (4, 5, 3)


class Quadratic:
    """f(x) = sum(s * (x - t)^2), s from 1 to `condition`: its minimum over 0..255 is
    clip(t, 0, 255). With `nan_above`, the loss is NaN once x[0, 0, 0] exceeds it."""

    terms = ("a",)

    def __init__(self, target, condition=1.0, nan_above=None):
        self.target = target.astype("float32")
        self.scale = np.linspace(1, condition, target.size).reshape(target.shape).astype("float32")
        self.nan_above = nan_above

    def __call__(self, x):
        total = ops.sum(self.scale * ops.square(x - self.target))
        if self.nan_above is not None:
            total = ops.where(x[0, 0, 0] > self.nan_above, float("nan"), total)
        return total, {"a": ops.mean(x)}


def run(method, objective, x0, iterations, **kwargs):
    steps = []
    result = device.minimize(device.compile_method(method, objective, []), x0, iterations,
                             on_step=steps.append, **kwargs)
    return result, steps


@pytest.mark.parametrize("count", [0, 1, 2, 5, 9])
def test_lbfgs_direction_is_the_dense_bfgs_inverse_hessian(count):
    """-H g, H from gamma I updated by each kept pair, oldest first (Nocedal and Wright
    (7.19)). The compact form with its ring buffers must give the same vector: before any
    pair, with the ring part full, and with 5 or 9 pairs through a ring of 3 (the oldest
    forgotten). A pair with s.y <= 0 is offered between the others and must change nothing."""
    rng = np.random.default_rng(count)
    n, m = 6, 3
    lbfgs = LBFGS(history=m)
    state = {k: ops.convert_to_tensor(v) for k, v in lbfgs.init(np.zeros(n, "float32")).items()}
    pairs = []
    for i in range(count):
        s = rng.normal(size=n).astype("float32")
        y = (s + 0.3 * rng.normal(size=n)).astype("float32")  # s.y > 0
        pairs.append((s, y))
        state = lbfgs.remember(state, ops.convert_to_tensor(s), ops.convert_to_tensor(y),
                               ops.convert_to_tensor(True))
        if i == 1:  # negative curvature: not kept
            state = lbfgs.remember(state, ops.convert_to_tensor(s), ops.convert_to_tensor(-y),
                                   ops.convert_to_tensor(False))
    g = rng.normal(size=n).astype("float32")
    d = ops.convert_to_numpy(lbfgs.direction(ops.convert_to_tensor(g), state))
    kept = [(s.astype(float), y.astype(float)) for s, y in pairs[-m:]]
    h = np.eye(n)
    if kept:
        s, y = kept[-1]
        h = (s @ y) / (y @ y) * np.eye(n)
    for s, y in kept:
        rho = 1 / (s @ y)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    np.testing.assert_allclose(d, -h @ g, rtol=1e-4, atol=1e-5)
    assert int(state["pairs"]) == count


@pytest.mark.parametrize("line_search", [False, True])
def test_lbfgs_reaches_the_bounded_minimum_and_reports_each_iteration(line_search):
    target = np.random.default_rng(1).uniform(-100, 400, SHAPE)  # partly outside 0..255
    x0 = np.full(SHAPE, 128.0, np.float32)
    result, steps = run(LBFGS(5, line_search), Quadratic(target, 10.0), x0, 60,
                        checkpoint_every=7)
    # float32 all through: the loss (~1e6, mostly from the pixels held at a bound) resolves
    # about 0.1 of a grey level, not scipy's float64 0.01.
    np.testing.assert_allclose(result.image, np.clip(target, 0, 255), atol=0.1)
    assert result.reason == optimize.COMPLETED and result.iterations == 60
    assert [s.iteration for s in steps] == list(range(1, 61))
    assert result.initial["total"] == pytest.approx(
        np.sum(Quadratic(target, 10.0).scale * (128.0 - target) ** 2), rel=1e-5)
    if not line_search:  # one evaluation per iteration, plus the start image's
        assert [s.evaluations for s in steps] == list(range(2, 62))
    # Pixels and optimiser state at every checkpoint iteration and at the end.
    with_image = {s.iteration for s in steps if s.image is not None}
    assert {7, 14, 21, 28, 35, 42, 49, 56, 60} <= with_image
    assert all(s.state is not None for s in steps if s.image is not None)
    assert set(steps[-1].state()) >= {"s", "y", "sy", "yy", "pairs", "grad", "best_x"}
    assert np.all(steps[-1].image >= 0) and np.all(steps[-1].image <= 255)


def test_adam_is_the_tutorials_adam_converted_to_0_255_pixels():
    """Keras's own Adam(0.02, beta_1=0.99, epsilon=0.1) on u = x / 255 of the same objective,
    clipped to 0..1 as the tutorial does, must give 255 u = our x at every step."""
    target = np.random.default_rng(2).uniform(-50, 300, SHAPE)
    objective = Quadratic(target, 30.0)
    x0 = np.random.default_rng(3).uniform(0, 255, SHAPE).astype("float32")
    result, steps = run(Adam(), objective, x0, 8, checkpoint_every=1)

    u = keras.Variable(x0 / 255.0)
    reference = keras.optimizers.Adam(learning_rate=0.02, beta_1=0.99, epsilon=0.1)
    for step in steps:
        x = 255.0 * ops.convert_to_numpy(u).astype(np.float64)
        grad_u = 255.0 * 2 * objective.scale * (x - target)  # d/du f(255 u)
        reference.apply_gradients([(ops.convert_to_tensor(grad_u, "float32"), u)])
        u.assign(ops.clip(u, 0.0, 1.0))
        np.testing.assert_allclose(step.image, 255.0 * ops.convert_to_numpy(u), rtol=1e-4,
                                   atol=1e-3)
    assert result.final["total"] < result.initial["total"]


@pytest.mark.parametrize("method", [LBFGS(5), Adam()], ids=["lbfgs", "adam"])
def test_non_finite_loss_stops_with_the_best_image_so_far(method):
    target = np.full(SHAPE, 250.0)
    result, steps = run(method, Quadratic(target, nan_above=100.0),
                        np.zeros(SHAPE, np.float32), 200, checkpoint_every=1)
    assert result.reason == optimize.NON_FINITE
    assert result.iterations == len(steps) < 200
    best = min(steps, key=lambda s: s.total)
    np.testing.assert_array_equal(result.image, best.image)
    assert result.final["total"] == pytest.approx(best.total)
    assert result.image[0, 0, 0] <= 100.0


def test_a_stop_request_is_honoured_between_calls():
    steps = []
    compiled = device.compile_method(LBFGS(5), Quadratic(np.full(SHAPE, 200.0), 1e3), [])
    result = device.minimize(compiled, np.zeros(SHAPE, np.float32), 100, steps.append,
                             should_stop=lambda: len(steps) >= 3, checkpoint_every=1)
    assert result.reason == optimize.INTERRUPTED and result.iterations == 3
    assert result.final["total"] <= steps[-1].total


class Linear:
    """f(x) = -sum(x): the gradient never changes, so every pair has s.y = 0."""

    terms = ("a",)

    def __call__(self, x):
        return -ops.sum(x), {"a": ops.mean(x)}


class Concave:
    """f(x) = -sum((x - 128)^2): y = -2 s, so every pair has s.y < 0."""

    terms = ("a",)

    def __call__(self, x):
        return -ops.sum(ops.square(x - 128.0)), {"a": ops.mean(x)}


def test_lbfgs_takes_the_short_first_step_at_the_first_iteration_only():
    """torch.optim.LBFGS's rule, run through step() itself. With every pair rejected there is
    no curvature: the direction is -g, the first step min(1, 1/|g|_1) long, every later one
    whole. f = -sum(x), 60 pixels: |g|_1 = 60, so 1/60, then 1 per iteration."""
    result, steps = run(LBFGS(5), Linear(), np.full(SHAPE, 100.0, np.float32), 20)
    np.testing.assert_allclose(steps[-1].image, 100 + 1 / 60 + 19, atol=1e-3)
    state = steps[-1].state()
    assert (int(state["pairs"]), int(state["iterations"])) == (0, 20)
    # f = -sum((x - 128)^2) from 130: g = -4, |g|_1 = 240, so the first step moves 4/240 =
    # 1/60; each later one adds -g = 2 (x - 128): x - 128 triples.
    _, steps = run(LBFGS(5), Concave(), np.full(SHAPE, 130.0, np.float32), 4)
    np.testing.assert_allclose(steps[-1].image, 128 + (2 + 1 / 60) * 27, rtol=1e-5)
    assert int(steps[-1].state()["pairs"]) == 0


def test_lbfgs_resumes_its_step_count_and_an_older_state_without_it_starts_afresh():
    compiled = device.compile_method(LBFGS(5), Linear(), [])
    x0 = np.full(SHAPE, 100.0, np.float32)
    first = []
    device.minimize(compiled, x0, 10, first.append, checkpoint_every=5)
    saved, done = first[-1].state(), (10, first[-1].evaluations, first[-1].seconds)
    rest = []
    device.minimize(compiled, first[-1].image, 20, rest.append, done=done, state=saved,
                    checkpoint_every=5)
    assert [s.iteration for s in rest] == list(range(11, 21))
    np.testing.assert_allclose(rest[-1].image, 100 + 1 / 60 + 19, atol=1e-3)  # as if whole
    # A checkpoint from before the count was kept: its state does not fit, so the run goes
    # on from the checkpoint's image with a fresh memory (and a short first step again).
    older = {k: v for k, v in saved.items() if k != "iterations"}
    rest = []
    result = device.minimize(compiled, first[-1].image, 20, rest.append, done=done,
                             state=older, checkpoint_every=5)
    assert result.reason == optimize.COMPLETED and [s.iteration for s in rest] == list(
        range(11, 21))
    np.testing.assert_allclose(rest[-1].image, 100 + 1 / 60 + 9 + 1 / 60 + 9, atol=1e-3)


def test_the_best_image_is_the_lowest_loss_of_the_whole_run():
    """Adam overshoots a near target (its steps are about 5 grey levels) and oscillates: the
    kept image must be the lowest loss seen, not merely better than the step before it."""
    target = 128.0 + np.random.default_rng(5).uniform(-3, 3, SHAPE)
    result, steps = run(Adam(), Quadratic(target), np.full(SHAPE, 128.0, np.float32), 40,
                        checkpoint_every=1)
    totals = [s.total for s in steps]
    # The case that tells the two apart: a step better than its predecessor, worse than best.
    assert any(totals[j] < totals[j - 1] and totals[j] > min(totals[:j]) for j in range(1, 40))
    best = int(np.argmin(totals))
    assert totals[best] < result.initial["total"]
    np.testing.assert_array_equal(result.image, steps[best].image)
    assert result.final["total"] == totals[best]


class PseudoHuber:
    """f(x) = sum(sqrt(c^2 + (x - t)^2)): quadratic near t, nearly linear far from it, where
    its curvature is tiny and a quasi-Newton step overshoots far past t."""

    terms = ("a",)

    def __init__(self, target, c=20.0):
        self.target, self.c = target.astype("float32"), c

    def __call__(self, x):
        return ops.sum(ops.sqrt(self.c**2 + ops.square(x - self.target))), {"a": ops.mean(x)}

    def value_and_grad(self, x):
        r = np.asarray(x, np.float64) - self.target
        root = np.sqrt(self.c**2 + r**2)
        return root.sum(), r / root


def test_lbfgs_line_search_accepts_only_sufficient_decrease():
    """Each accepted step satisfies Armijo's condition, checked here in float64 from the
    iterates; the quasi-Newton step from far away overshoots, so the search must halve."""
    objective = PseudoHuber(128.0 + np.random.default_rng(6).uniform(-10, 10, SHAPE))
    x0 = np.full(SHAPE, 20.0, np.float32)
    result, steps = run(LBFGS(5, line_search=True), objective, x0, 8, checkpoint_every=1)
    previous = x0
    for step in steps:
        f_old, g_old = objective.value_and_grad(previous)
        f_new, _ = objective.value_and_grad(step.image)
        assert f_new <= f_old + 1e-4 * np.sum(g_old * (step.image - previous)) + 1e-2
        previous = step.image
    assert steps[-1].evaluations - 1 > len(steps)  # halvings happened (1: the start image)


# --------------------------------------------------------------------------- the real network


def interrupted_equals_whole(folder: Path, method: str, colors: str = "none") -> list[str]:
    """Run a small config whole, and again stopped after 5 iterations and resumed from its
    folder's checkpoint, each as batch.run_one runs it; returns what differs (nothing)."""
    # Two convolutions of VGG19 are network enough here, and compile in a fraction of the time.
    settings = dict(size=24, optimizer={"iterations": 11, "method": method},
                    checkpoint_every=4, preserve_colors=colors,
                    model={"weights": "random", "content_layers": ["block1_conv2"],
                           "style_layers": ["block1_conv1"]})
    jobs = {}
    for name in ("whole", "parts"):
        (jobs[name],) = batch.plan(config.load(write_config(folder, name, **settings)))
    # The state each run carried at its last checkpoint (iteration 8, in either part), as it
    # was saved: a completed run's folder keeps none.
    states, seen = {}, []

    def keep_state(name):
        def on_step(step):
            seen.append(step)
            if step.iteration == 8:
                states[name] = {"optimizer." + k: np.asarray(v) for k, v in step.state().items()}
        return on_step

    assert batch.run_one(jobs["whole"], keep_state("whole")).status == "completed"
    seen.clear()
    stopped = batch.run_one(jobs["parts"], keep_state("parts"), lambda: len(seen) >= 5)
    assert stopped.status == "interrupted", stopped.message
    stopped_at = seen[-1].iteration
    out = {name: batch.folder_of(job) for name, job in jobs.items()}
    problems = []
    own = {"s", "y", "sy", "yy", "pairs", "iterations"} if method == "lbfgs" else {"m", "v", "t"}
    if not {"optimizer." + k for k in own} <= set(out["parts"].load_state()):
        problems.append("the stopped run's state.npz lacks the optimiser's state")
    assert batch.run_one(jobs["parts"], keep_state("parts")).status == "completed"
    if out["parts"].read_metrics()["resumed_from"] != stopped_at:
        problems.append("did not resume from the stop")
    traces = {n: [(r["iteration"], r["total"], r["style"]) for r in f.read_trace()]
              for n, f in out.items()}
    if traces["whole"] != traces["parts"] or len(traces["whole"]) != 11:
        problems.append(f"traces differ: {traces}")
    if any(f.state.exists() for f in out.values()):
        problems.append("a completed run kept its state.npz")
    a, b = states.get("whole", {}), states.get("parts", {})
    if a.keys() != b.keys() or len(a) < 5 or not all(np.array_equal(a[k], b[k]) for k in a):
        problems.append("checkpoint state differs")
    elif colors == "luminance" and a["optimizer.best_x"].shape != (20, 24, 1):
        problems.append("the optimiser's variable is not the luminance alone")
    if not np.array_equal(images.load_image(out["whole"].result),
                          images.load_image(out["parts"].result)):
        problems.append("result pixels differ")
    if json.loads(out["whole"].metrics.read_text())["loss"] != \
            json.loads(out["parts"].metrics.read_text())["loss"]:
        problems.append("final losses differ")
    return problems


@pytest.mark.parametrize("method, colors", [("lbfgs", "none"), ("adam", "none"),
                                            ("lbfgs", "luminance")])
def test_stopped_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, method, colors):
    """With `preserve_colors: luminance` the optimiser's variable is one channel: its state
    and checkpoints too."""
    assert interrupted_equals_whole(tmp_path, method, colors) == []


def test_lbfgs_direction_and_resumes_on_jax(tmp_path):
    """On JAX: L-BFGS's direction against dense BFGS, and both methods stopped and resumed
    equal to uninterrupted. One process: JAX's start-up is most of the time."""
    code = ("import sys; from pathlib import Path; import test_optimizers_device as t; "
            "import keras; assert keras.backend.backend() == 'jax'; "
            "[t.test_lbfgs_direction_is_the_dense_bfgs_inverse_hessian(c) for c in (0, 2, 9)]; "
            "[(Path(sys.argv[1]) / m).mkdir() for m in ('lbfgs', 'adam')]; "
            "print('PROBLEMS', [p for m in ('lbfgs', 'adam') "
            "for p in t.interrupted_equals_whole(Path(sys.argv[1]) / m, m)])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT / "tests",
                          env=cli_env(KERAS_BACKEND="jax"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PROBLEMS []" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- precision


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("precision"), size=48)


def first_loss(small_config, precision):
    (job,) = batch.plan(config.load(small_config, [f"model.precision={precision}"]))
    cfg = job.cfg
    content, styles = prepare(cfg, images.load_image(cfg.content),
                              [images.load_image(cfg.style[0])])
    extractor, names, _ = model.feature_extractor(cfg.model, cfg.seed)
    objective = Objective(extractor, names, cfg, content, styles)
    x = np.clip(content + np.random.default_rng(0).normal(0, 30, content.shape), 0, 255)
    total, terms = objective(ops.convert_to_tensor(x.astype("float32")))
    features = extractor(ops.convert_to_tensor(content[None].astype("float32")))
    return float(total), {k: float(v) for k, v in terms.items()}, features, total


@pytest.fixture(scope="module")
def float32_loss(small_config):
    return first_loss(small_config, "float32")


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_low_precision_network_gives_the_float32_loss_within_2_percent(small_config, precision,
                                                                        float32_loss):
    reference, ref_terms, ref_features, _ = float32_loss
    total, terms, features, tensor = first_loss(small_config, precision)
    assert total == pytest.approx(reference, rel=0.02)
    for name in ("content", "style"):
        assert terms[name] == pytest.approx(ref_terms[name], rel=0.02)
    # The network really computed in the low precision; the loss did not.
    dtype = keras.backend.standardize_dtype
    assert {dtype(f.dtype) for f in features} == {precision}
    assert {dtype(f.dtype) for f in ref_features} == {"float32"}
    assert dtype(tensor.dtype) == "float32"
    assert total != reference  # rounding differs, as it must in another precision


# --------------------------------------------------------------------------- config


def test_method_and_precision_are_validated_swept_and_hashed(tmp_path):
    path = write_config(tmp_path, sweep={"optimizer.method": ["scipy", "lbfgs", "adam"],
                                         "model.precision": ["float32", "bfloat16"]})
    jobs = batch.plan(config.load(path))
    assert [(j.cfg.optimizer.method, j.cfg.model.precision) for j in jobs] == [
        (m, p) for p in ("float32", "bfloat16") for m in ("scipy", "lbfgs", "adam")]
    # The hash, not the id: an id holds the swept values whether or not the hash does.
    assert len({config.config_hash(j.cfg) for j in jobs}) == 6
    for key, value in (("optimizer.method", "sgd"), ("model.precision", "int8")):
        with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
            config.load(path, [f"{key}={value}", "sweep={}"])
    assert config.load(path, ["sweep={}"]).model.precision == "float32"
