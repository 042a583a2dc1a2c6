"""The driver shared by the optimisers that run on the device (L-BFGS and Adam): many
iterations per compiled call, the host touched only between calls.

Each call runs a keras.ops while_loop of `n` iterations, compiled once by autodiff (the one
backend-specific room): the optimiser's step (which evaluates the objective), a check for
NaN or Inf, the best image so far, and one row of loss terms per iteration. Between calls
the host turns those rows into Step records, hands over pixels and state at checkpoint
iterations, and asks whether to stop. `n` is chosen so that a call takes about
TARGET_SECONDS: long enough that a GPU is not starved by the host, short enough that a stop
request on a slow CPU lands within seconds.

A method is an object with `init(x0) -> dict` (its own state, numpy arrays) and
`step(vg, state) -> (new state, total, terms, evaluations)` in keras.ops; `state` always
holds `x` (the iterate), `loss` and `grad` (the objective at `x`), next to the method's own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from keras import ops

from pipeline import autodiff
from pipeline.optimize.records import COMPLETED, INTERRUPTED, NON_FINITE, Result, Step

TARGET_SECONDS = 1.0  # wall time of one compiled call, once its cost per iteration is known
CAPACITY = 512  # most iterations in one call: the size of its per-iteration row buffers


def _program(method, terms: tuple[str, ...]):
    """The compiled call: up to n iterations, stopping early at a non-finite value."""

    def program(vg, state, n):
        slots = ops.arange(CAPACITY)
        rows = {name: ops.zeros((CAPACITY,)) for name in ("total", *terms, "evaluations")}

        def cond(i, state, rows, ok):
            return ops.logical_and(i < n, ok)

        def body(i, state, rows, ok):
            new, total, values, evaluations = method.step(vg, state)
            # A NaN or Inf ends the call; the step is not counted and the best image stays.
            ok = ops.logical_and(ops.isfinite(total), ops.all(ops.isfinite(new["grad"])))
            row = {"total": total, **values, "evaluations": evaluations}
            rows = {k: ops.where(slots == i, ops.cast(row[k], "float32"), rows[k]) for k in rows}
            better = ops.logical_and(ok, total < state["best"][0])
            new["best_x"] = ops.where(better, new["x"], state["best_x"])
            new["best"] = ops.where(better, ops.stack([total, *(values[t] for t in terms)]),
                                    state["best"])
            return i + ops.cast(ok, "int32"), new, rows, ok

        start = (ops.zeros((), "int32"), state, rows, ops.convert_to_tensor(True))
        return ops.while_loop(cond, body, start)

    return program


def _host(state) -> dict:
    return {k: ops.convert_to_numpy(v) for k, v in state.items()}


def _fits(saved: dict | None, fresh: dict) -> bool:
    """A checkpoint's state can continue this run: the same arrays, of the same shapes."""
    return saved is not None and saved.keys() == fresh.keys() and all(
        np.shape(saved[k]) == np.shape(v) for k, v in fresh.items())


@dataclass
class Compiled:
    """A method's compiled call for one objective, and the objective's own value-and-gradient
    (for the start image). Compile once, minimise from as many start images as you like."""

    method: object
    terms: tuple[str, ...]
    vg: Callable  # autodiff.ValueAndGrad
    run: Callable  # (state, n) -> (count, state, rows, ok)


def compile_method(method, objective, variables, shared=None) -> Compiled:
    """Compiling happens at the first call of each, not here; with `shared`
    (autodiff.Shared), once for every objective of the same signature."""
    key = (type(method).__name__, sorted(vars(method).items()))  # what shapes the program
    return Compiled(method, objective.terms, autodiff.value_and_grad(objective, variables, shared),
                    autodiff.compiled_loop(objective, variables,
                                           _program(method, objective.terms), shared, repr(key)))


def compile_host(method, vg) -> Compiled:
    """`method` driven by `vg`, a value-and-gradient computed on the host (an
    autodiff.ValueAndGrad with `terms`, such as tile.TiledValueAndGrad), one iteration per call.

    A tiled evaluation cannot be traced into one program: it is two calls per tile with host
    work between (the Grams summed, dL/dG formed). So here run(state, n) is a host loop of n
    iterations, each the method's own step (keras.ops, run eagerly) handed `vg` as a function
    of tensors. Everything else (Step records, checkpoints and their state, resume, the best
    image, the stop at a NaN) is minimize's, unchanged, so a tiled run resumes from a whole
    run's checkpoint and back.

    What it costs: the step's own arithmetic runs op by op instead of fused (at 512 px, L-BFGS
    with history 30 spends a few ms per iteration more; benchmarks/bench_tiles.py
    --eager-step), against a tiled evaluation of seconds. Limits: a step whose evaluations sit
    inside ops.while_loop (LBFGS(line_search=True)) runs on TensorFlow, whose eager while_loop
    is a Python loop, and not on JAX, which traces the loop's body.
    """
    terms = tuple(vg.terms)

    def tensors(x):
        total, values, grad = vg(ops.convert_to_numpy(x))
        return (ops.convert_to_tensor(np.float32(total)),
                {k: ops.convert_to_tensor(np.float32(v)) for k, v in values.items()},
                ops.convert_to_tensor(grad))

    def run(state, n):
        # As _program's loop body: a non-finite step ends the call uncounted, and the best
        # image moves only on a finite, lower loss.
        rows = {name: np.zeros(n, np.float32) for name in ("total", *terms, "evaluations")}
        count, ok = 0, True
        while count < n and ok:
            new, total, values, evaluations = method.step(tensors, state)
            total = float(ops.convert_to_numpy(total))
            ok = math.isfinite(total) and bool(np.all(np.isfinite(ops.convert_to_numpy(
                new["grad"]))))
            row = {"total": total, **{k: float(ops.convert_to_numpy(v)) for k, v in
                                      values.items()},
                   "evaluations": float(ops.convert_to_numpy(evaluations))}
            for name in rows:
                rows[name][count] = row[name]
            if ok and total < float(ops.convert_to_numpy(state["best"])[0]):
                new["best_x"] = new["x"]
                new["best"] = np.array([total, *(row[t] for t in terms)], np.float32)
            else:
                new["best_x"], new["best"] = state["best_x"], state["best"]
            state = new
            count += ok
        return count, state, rows, ok

    return Compiled(method, terms, vg, run)


def minimize(
    compiled: Compiled,
    x0: np.ndarray,
    iterations: int,
    on_step: Callable[[Step], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    done: tuple[int, int, float] = (0, 0, 0.0),
    state: dict | None = None,
    checkpoint_every: int = 0,
) -> Result:
    """Run the compiled method from x0 (H, W, C) until `iterations` in all, pixels kept in
    0..255.

    `done` is (iterations, evaluations, seconds) already spent by an earlier part of this
    run, and `state` the optimiser state its last checkpoint saved (Step.state): with it, the
    run continues exactly as if it had never stopped. Calls end on multiples of
    `checkpoint_every`, so that every checkpoint iteration's Step carries image and state.
    """
    done_iterations, evaluations, done_seconds = done
    start = time.perf_counter()
    method, terms = compiled.method, compiled.terms
    x0 = np.asarray(x0, np.float32)
    shapes = {"x": x0, "loss": np.float32(0), "grad": x0, "best_x": x0,
              "best": np.zeros(1 + len(terms), np.float32), **method.init(x0)}
    initial = None
    if _fits(None if state is None else {"x": x0, **state}, shapes):
        state = {"x": x0, **{k: np.asarray(v, np.asarray(shapes[k]).dtype)
                             for k, v in state.items()}}
    elif iterations <= done_iterations:  # a resume from the last checkpoint, without state
        return Result(x0, COMPLETED, "no iterations left", done_iterations, evaluations,
                      done_seconds, None, None)
    else:  # a fresh start (or a checkpoint without usable state): evaluate x0 first
        total, values, grad = compiled.vg(x0)
        evaluations += 1
        initial = {"total": total, **values}
        if not (math.isfinite(total) and np.isfinite(grad).all()):
            return Result(x0, NON_FINITE, "non-finite loss or gradient at the start image",
                          done_iterations, evaluations, done_seconds + time.perf_counter() - start,
                          initial, None)
        best = np.array([total, *(values[t] for t in terms)], np.float32)
        state = {**method.init(x0), "x": x0, "loss": np.float32(total),
                 "grad": grad.astype(np.float32), "best_x": x0, "best": best}
    iteration, size, warm = done_iterations, 1, False
    # Nothing left (a resume from the last checkpoint): the result is the saved best image.
    reason, message = COMPLETED, (f"{iterations} iterations" if iteration < iterations
                                  else "no iterations left")
    while iteration < iterations:
        if should_stop():
            reason, message = INTERRUPTED, "stopped on request"
            break
        n = min(size, iterations - iteration, CAPACITY)
        if checkpoint_every:
            n = min(n, checkpoint_every - iteration % checkpoint_every)
        began = time.perf_counter()
        count, state, rows, ok = compiled.run(state, n)
        rows, count = _host(rows), int(ops.convert_to_numpy(count))
        image = ops.convert_to_numpy(state["x"])  # also waits for the call to finish
        elapsed = time.perf_counter() - began
        finite = bool(ops.convert_to_numpy(ok))
        for j in range(count):
            iteration += 1
            evaluations += int(rows["evaluations"][j])
            # After a non-finite step, x is that step's: no Step of this call may carry it.
            last = j == count - 1 and finite
            if on_step is not None:
                # x is the image. The rest stays the backend's until a checkpoint writes it,
                # converting one array at a time: lbfgs's pairs can be most of a run's memory.
                saved = {k: v for k, v in state.items() if k != "x"}
                on_step(Step(
                    iteration=iteration,
                    evaluations=evaluations,
                    # The host sees a call's end, not its iterations: time is shared evenly.
                    seconds=done_seconds + began - start + elapsed * (j + 1) / count,
                    total=float(rows["total"][j]),
                    terms={t: float(rows[t][j]) for t in terms},
                    image=image if last else None,
                    state=(lambda saved=saved: dict(saved)) if last else None,
                    size=max(x0.shape[:2]),
                    initial=initial,
                ))
        if not finite:
            reason = NON_FINITE
            message = f"non-finite loss or gradient at iteration {iteration + 1}"
            break
        # Size the next call: the first one also compiled, so its time says little.
        if warm and count:
            size = int(np.clip(TARGET_SECONDS * count / elapsed, 1, 4 * n))
        else:
            size, warm = 2 * n, True

    best = ops.convert_to_numpy(state["best"])
    return Result(
        image=ops.convert_to_numpy(state["best_x"]).astype(np.float32),
        reason=reason,
        message=message,
        iterations=iteration,
        evaluations=evaluations,
        seconds=done_seconds + time.perf_counter() - start,
        initial=initial,
        final={"total": float(best[0]), **{t: float(v) for t, v in zip(terms, best[1:])}},
    )
