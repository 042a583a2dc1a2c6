"""L-BFGS-B over the pixels, driven by scipy's fmin_l_bfgs_b (as jcjohnson/neural-style's
`feval`): an Evaluator hands it the loss and flat gradient, and every iteration becomes a
Step record for whoever is watching. Nothing here knows about files or terminals."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import fmin_l_bfgs_b
from threadpoolctl import threadpool_limits

from pipeline.optimize.records import (
    ABNORMAL,
    COMPLETED,
    CONVERGED,
    INTERRUPTED,
    NON_FINITE,
    Result,
    Step,
)

if TYPE_CHECKING:  # only the type: the optimiser itself needs no deep-learning framework
    from pipeline.autodiff import ValueAndGrad


class _Halt(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class Evaluator:
    """What fmin_l_bfgs_b calls: float64 flat pixels in, float64 loss and gradient out.

    The network runs in float32; float64 exists only at this boundary, as scipy requires.
    It remembers the best image so far, so that a stop at any moment still has a result.
    """

    def __init__(self, vg: ValueAndGrad, shape, should_stop: Callable[[], bool],
                 best: tuple[np.ndarray, dict] | None = None):
        self.vg, self.shape, self.should_stop = vg, shape, should_stop
        self.evaluations = 0
        self.first: dict | None = None
        self.last: dict | None = None
        self.best: dict | None = None if best is None else best[1]
        self.best_x: np.ndarray | None = None if best is None else np.ravel(best[0])

    def __call__(self, flat: np.ndarray) -> tuple[float, np.ndarray]:
        if self.should_stop():
            raise _Halt(INTERRUPTED, "stopped on request")
        total, terms, grad = self.vg(flat.reshape(self.shape).astype(np.float32))
        self.evaluations += 1
        if not (math.isfinite(total) and np.isfinite(grad).all()):
            # scipy would treat this as an ordinary value and may report success; refuse.
            what = "loss" if not math.isfinite(total) else "gradient"
            raise _Halt(NON_FINITE, f"non-finite {what} at evaluation {self.evaluations}")
        self.last = {"total": total, **terms}
        if self.first is None:
            self.first = self.last
        if self.best is None or total < self.best["total"]:
            self.best, self.best_x = self.last, flat.copy()  # scipy reuses its x buffer
        return total, grad.astype(np.float64).ravel()


def minimize(
    vg: ValueAndGrad,
    x0: np.ndarray,
    iterations: int,
    history: int = 10,
    on_step: Callable[[Step], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    done: tuple[int, int, float] = (0, 0, 0.0),
    ftol: float = 0.0,
    gtol: float = 0.0,
    best: tuple[np.ndarray, dict] | None = None,
) -> Result:
    """Run L-BFGS-B from x0 (H, W, C) until `iterations` in all, pixels bounded to 0..255.

    `done` is (iterations, evaluations, seconds) already spent by an earlier part of this
    run (a resume): they count towards the totals and the budget, and `best` is that part's
    best image and its loss (Step.state's `best_x` and `best`): the result is the best of
    all parts. The optimiser's memory is not saved in checkpoints, so a resumed run rebuilds
    it: close to, not bit-equal with, an uninterrupted run. `ftol` and `gtol` (0: off) are
    scipy's early stops (see OptimizerConfig).
    """
    done_iterations, done_evaluations, done_seconds = done
    evaluator = Evaluator(vg, x0.shape, should_stop, best)
    remaining = iterations - done_iterations
    if remaining <= 0:
        # Nothing left (a resume from the last checkpoint): scipy's maxiter=0 would still
        # run one iteration, so it is not called at all.
        return Result(image=_image(evaluator, x0), reason=COMPLETED, message="no iterations left",
                      iterations=done_iterations, evaluations=done_evaluations,
                      seconds=done_seconds, initial=None, final=evaluator.best)
    start = time.perf_counter()
    iteration = done_iterations

    def callback(xk):
        nonlocal iteration
        iteration += 1
        if on_step is not None:
            # L-BFGS-B's line search ends on the point it accepts, so the last evaluation
            # is this iterate's: its terms cost nothing extra.
            on_step(Step(
                iteration=iteration,
                evaluations=done_evaluations + evaluator.evaluations,
                seconds=done_seconds + time.perf_counter() - start,
                total=evaluator.last["total"],
                terms={k: v for k, v in evaluator.last.items() if k != "total"},
                image=xk.reshape(x0.shape).astype(np.float32),
                size=max(x0.shape[:2]),
                # The best so far (a new best replaces evaluator.best_x, never changes it).
                state=lambda x=evaluator.best_x, loss=evaluator.best: _state(x, loss, x0.shape),
                initial=evaluator.first,
            ))

    # One BLAS thread: L-BFGS-B's vector work is too small to share, and OpenBLAS's idle
    # threads spin on the cores the network computes on next (1.5x slower per evaluation on
    # 2 cores). TensorFlow and XLA compute with their own thread pools, not BLAS's.
    blas = threadpool_limits(1, user_api="blas")
    try:
        _, _, info = fmin_l_bfgs_b(
            evaluator,
            x0.astype(np.float64).ravel(),
            bounds=[(0.0, 255.0)] * x0.size,  # bounds, not clipping: the optimiser knows them
            m=history,
            maxiter=remaining,
            maxfun=max(15000, 50 * remaining),  # let iterations, not evaluations, end the run
            factr=ftol / np.finfo(np.float64).eps,
            pgtol=gtol,
            callback=callback,
        )
        # Branch on warnflag, not on scipy's message text; but warnflag 2 covers both a
        # stop that still has a best image (ABNORMAL: a failed line search) and an input
        # scipy refuses (FACTR < 0, M <= 0), told apart only by the status word that starts
        # `task`. A refused input ran nothing: that run has failed, not completed.
        message = str(info.get("task", ""))
        if message.startswith("ERROR"):
            raise ValueError(f"scipy's L-BFGS-B refused its input: {message}")
        reason = {0: CONVERGED, 1: COMPLETED}.get(info["warnflag"], ABNORMAL)
    except _Halt as halt:
        reason, message = halt.reason, halt.message
    finally:
        blas.restore_original_limits()
    return Result(
        image=_image(evaluator, x0),
        reason=reason,
        message=message,
        iterations=iteration,
        evaluations=done_evaluations + evaluator.evaluations,
        seconds=done_seconds + time.perf_counter() - start,
        initial=evaluator.first,
        final=evaluator.best,
    )


def _image(evaluator: Evaluator, x0: np.ndarray) -> np.ndarray:
    """The best image evaluated (x0 when there is none), float32 in x0's shape."""
    best = x0 if evaluator.best_x is None else evaluator.best_x
    return np.reshape(best, x0.shape).astype(np.float32)


def _state(best_x: np.ndarray, best: dict, shape) -> dict:
    """What a checkpoint keeps of a scipy run: its best image and that image's loss (total,
    then the terms in the objective's order), so that a resumed stage, or the stage after
    it, goes on from the best image as an uninterrupted run does."""
    return {"best_x": np.reshape(best_x, shape).astype(np.float32),
            "best": np.array(list(best.values()), np.float64)}
