"""The L-BFGS-B driver on objectives whose answers are known in closed form."""

import numpy as np
import pytest

from pipeline import optimize


def quadratic(target, condition=1.0):
    """f(x) = sum(s * (x - t)^2), s from 1 to `condition`: its bounded minimum is
    clip(t, 0, 255); a large condition number keeps L-BFGS from converging in a few steps."""

    def vg(x):
        scale = np.linspace(1, condition, x.size).reshape(x.shape)
        diff = x.astype(np.float64) - target
        return float(np.sum(scale * diff**2)), {"content": 0.0, "style": 0.0}, 2 * scale * diff
    return vg


def test_reaches_the_bounded_minimum_and_reports_each_iteration():
    rng = np.random.default_rng(0)
    target = rng.uniform(-100, 400, (4, 5, 3))  # partly outside 0..255
    steps = []
    result = optimize.minimize(quadratic(target), np.full((4, 5, 3), 128.0, np.float32),
                               iterations=50, on_step=steps.append)
    np.testing.assert_allclose(result.image, np.clip(target, 0, 255), atol=1e-2)
    assert result.reason in (optimize.CONVERGED, optimize.COMPLETED)
    assert [s.iteration for s in steps] == list(range(1, len(steps) + 1))
    assert result.iterations == len(steps)
    assert result.initial["total"] == pytest.approx(np.sum((128.0 - target) ** 2))
    assert steps[-1].image.shape == (4, 5, 3)


def test_iterations_cap_is_exact():
    vg = quadratic(np.random.default_rng(1).uniform(0, 255, (8, 8, 3)), condition=1e4)
    result = optimize.minimize(vg, np.zeros((8, 8, 3), np.float32), iterations=3)
    assert result.reason == optimize.COMPLETED
    assert result.iterations == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_loss_stops_and_keeps_the_best_image(bad):
    good = quadratic(np.random.default_rng(4).uniform(0, 255, (6, 6, 3)), condition=1e4)
    calls = []

    def vg(x):
        calls.append(x.copy())
        total, terms, grad = good(x)
        return (bad if len(calls) > 4 else total), terms, grad

    result = optimize.minimize(vg, np.zeros((6, 6, 3), np.float32), iterations=100)
    assert result.reason == optimize.NON_FINITE
    assert "loss" in result.message
    losses = [good(c)[0] for c in calls[:4]]
    np.testing.assert_allclose(result.image, calls[int(np.argmin(losses))])
    assert np.isfinite(result.final["total"])


def test_non_finite_gradient_is_caught_too():
    good = quadratic(np.full((2, 2, 3), 50.0))

    def vg(x):
        total, terms, grad = good(x)
        grad = grad.copy()
        grad[0, 0, 0] = np.nan
        return total, terms, grad

    result = optimize.minimize(vg, np.zeros((2, 2, 3), np.float32), iterations=10)
    assert result.reason == optimize.NON_FINITE
    assert "gradient" in result.message
    np.testing.assert_array_equal(result.image, np.zeros((2, 2, 3)))  # the only point seen


def test_should_stop_interrupts_between_evaluations():
    steps = []
    result = optimize.minimize(
        quadratic(np.random.default_rng(2).uniform(0, 255, (6, 6, 3)), condition=1e4),
        np.zeros((6, 6, 3), np.float32), iterations=100,
        on_step=steps.append, should_stop=lambda: len(steps) >= 2)
    assert result.reason == optimize.INTERRUPTED
    assert result.iterations == 2
    # The result is the best point evaluated, no worse than the last reported iterate.
    assert result.final["total"] <= steps[-1].total


def test_resumed_counts_continue_from_the_checkpoint():
    vg = quadratic(np.random.default_rng(3).uniform(0, 255, (5, 5, 3)), condition=1e4)
    steps = []
    result = optimize.minimize(vg, np.zeros((5, 5, 3), np.float32), iterations=10,
                               on_step=steps.append, done=(6, 9, 12.5))
    assert [s.iteration for s in steps] == [7, 8, 9, 10]
    assert result.iterations == 10
    assert result.evaluations >= 9 + 4
    assert steps[0].seconds >= 12.5


def test_no_iterations_left_finishes_without_calling_the_optimiser():
    """A resume from a checkpoint on the last iteration: scipy's maxiter=0 would still run
    one iteration (10/10 came back as 11)."""
    calls = []

    def vg(x):
        calls.append(x)
        return 1.0, {"content": 0.0, "style": 0.0}, np.zeros_like(x)

    x0 = np.random.default_rng(5).uniform(0, 255, (3, 4, 3)).astype(np.float32)
    steps = []
    result = optimize.minimize(vg, x0, iterations=10, on_step=steps.append, done=(10, 14, 2.5))
    assert calls == [] and steps == []
    assert (result.iterations, result.evaluations, result.seconds) == (10, 14, 2.5)
    assert result.reason == optimize.COMPLETED
    np.testing.assert_array_equal(result.image, x0)


def small_gradients(x):
    """A loss whose gradients are as small as a mean-based style loss's: scipy's default
    tolerances (pgtol 1e-5, factr 1e7) would call it converged after a few iterations."""
    total, terms, grad = quadratic(TARGET, condition=1e4)(x)
    return total * 1e-10, terms, grad * 1e-10


TARGET = np.random.default_rng(6).uniform(0, 255, (8, 8, 3))


def test_a_run_does_every_iteration_asked_for():
    result = optimize.minimize(small_gradients, np.zeros((8, 8, 3), np.float32), iterations=25)
    assert (result.reason, result.iterations) == (optimize.COMPLETED, 25)


@pytest.mark.parametrize("tolerance", [{"gtol": 1e-3}, {"ftol": 1e-2}])
def test_an_explicit_tolerance_stops_early(tolerance):
    result = optimize.minimize(small_gradients, np.zeros((8, 8, 3), np.float32), iterations=25,
                               **tolerance)
    assert result.reason == optimize.CONVERGED and result.iterations < 25


def test_an_input_scipy_refuses_is_an_error_not_a_completed_run():
    """scipy answers a negative factr with task "ERROR: FACTR < 0" and warnflag 2, as it
    answers a failed line search: this run ran nothing and must not read as completed."""
    x0 = np.zeros((4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="refused its input: ERROR: FACTR < 0"):
        optimize.minimize(quadratic(np.full((4, 4, 3), 99.0)), x0, iterations=5, ftol=-1.0)
