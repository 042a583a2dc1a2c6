"""One stage's optimisation by the method a run's config names (optimizer.method): scipy's
L-BFGS-B on the host, fed by the objective's compiled value-and-gradient, or a device
optimiser compiled around the objective. The caller hands over the objective, the network's
variables and where to start; the method's own settings come from the config."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.config import OptimizerConfig, history
from pipeline.optimize.records import Result, Step
from pipeline.optimize.scipy import minimize


def device_method(name: str, history: int = 10):
    """The device optimiser called `name` (optimizer.method), for device.minimize."""
    if name == "lbfgs":
        from pipeline.optimize.lbfgs import LBFGS

        return LBFGS(history)
    if name == "adam":
        from pipeline.optimize.adam import Adam

        return Adam()
    raise ValueError(f"no device optimiser '{name}'")


def solve(
    opt: OptimizerConfig,
    objective,
    variables,
    x0: np.ndarray,
    iterations: int,
    on_step: Callable[[Step], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    done: tuple[int, int, float] = (0, 0, 0.0),
    state: dict | None = None,
    checkpoint_every: int = 0,
    shared=None,
) -> Result:
    """Minimise `objective(x) -> (total, terms)` (losses.Objective, keras.ops) from x0 until
    `iterations` in all. An objective marked `on_host` is a value-and-gradient already, computed
    on the host (tile.TiledValueAndGrad): scipy calls it as it is, and a device method takes
    one step per call around it (device.compile_host). `done` and `state` continue an earlier
    part of the run: its counts, and the optimiser's state that its checkpoint kept
    (Step.state), or None. `shared` (autodiff.Shared): compiled functions a clip's frames
    share (not the tiled objective's: it compiles per window frame)."""
    from pipeline import autodiff

    state = state or {}
    on_host = getattr(objective, "on_host", False)
    if opt.method == "scipy":
        best = None
        if {"best_x", "best"} <= state.keys():  # the stage's best so far, kept by a checkpoint
            names = ("total", *objective.terms)
            best = state["best_x"], {k: float(v) for k, v in zip(names, state["best"])}
        vg = objective if on_host else autodiff.value_and_grad(objective, variables, shared)
        return minimize(vg, x0, iterations, history(opt), on_step, should_stop, done,
                        ftol=opt.ftol, gtol=opt.gtol, best=best)
    from pipeline.optimize import device  # compiled on the device, many iterations a call

    method = device_method(opt.method, history(opt))
    compiled = (device.compile_host(method, objective) if on_host else
                device.compile_method(method, objective, variables, shared))
    return device.minimize(compiled, x0, iterations, on_step, should_stop, done, state or None,
                           checkpoint_every)
