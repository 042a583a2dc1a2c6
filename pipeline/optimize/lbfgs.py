"""L-BFGS on the device, in keras.ops: the two-loop recursion over the last `history`
(s, y) pairs (Nocedal and Wright, Algorithm 7.4), a step, and projection onto 0..255, all
inside the compiled loop of optimize.device.

The step is fixed, as in jcjohnson/neural-style and torch.optim.LBFGS's default: the first
iteration moves min(1, 1 / |g|_1) along -g, every later one takes the quasi-Newton step
whole (learning rate 1), one evaluation per iteration. A backtracking (Armijo) line search,
halving the step until the loss falls enough, is here too (`line_search=True`), because we
measured both (README, "Optimisers"; benchmarks/bench_methods.py --line-search). On the CPU
at 128 px, after the same 20 s, the fixed step's loss was 2.4 times lower: the search
rejected the whole step on most iterations (2.9 evaluations per iteration), each halving a
full network pass, and with the halved steps the pairs it stored made poorer curvature
estimates (it stalled); the fixed step overshoots now and then (the best image is kept)
but recovers within a few iterations.

Departures from textbook L-BFGS: bounds by projection (x is clipped to 0..255 after the
step; s is the step actually taken), and a pair is kept only when s.y > 1e-10, so the
inverse Hessian approximation stays positive definite (as torch.optim.LBFGS does).
"""

from __future__ import annotations

import numpy as np
from keras import ops

CURVATURE_EPS = 1e-10  # s.y below this: the pair is skipped
ARMIJO_C1 = 1e-4  # sufficient decrease: f(x + t d) <= f(x) + c1 g.(x_new - x)
MAX_HALVINGS = 10  # the line search gives up after this many and takes the last trial


class LBFGS:
    def __init__(self, history: int = 10, line_search: bool = False):
        self.history, self.line_search = history, line_search

    def init(self, x0: np.ndarray) -> dict:
        m, n = self.history, x0.size
        return {"s": np.zeros((m, n), np.float32), "y": np.zeros((m, n), np.float32),
                "rho": np.zeros((m,), np.float32), "pairs": np.int32(0)}

    def direction(self, g, s_all, y_all, rho, pairs):
        """-H g by the two-loop recursion; pair j (newest first) lives in slot
        (pairs - 1 - j) mod m of the ring buffers. Slots never written have rho 0, so they
        change nothing and need no mask."""
        m = self.history
        marks = ops.arange(m)

        def slot(j):
            return (pairs - 1 - j + m) % m

        def newest_first(j, carry):
            q, alphas = carry
            k = slot(j)
            a = ops.take(rho, k) * ops.sum(ops.take(s_all, k, axis=0) * q)
            return q - a * ops.take(y_all, k, axis=0), ops.where(marks == j, a, alphas)

        q, alphas = ops.fori_loop(0, m, newest_first, (g, ops.zeros((m,))))
        # Initial Hessian gamma I with gamma = s.y / y.y of the newest pair (1 before any).
        s_new, y_new = ops.take(s_all, slot(0), axis=0), ops.take(y_all, slot(0), axis=0)
        yy = ops.sum(y_new * y_new)
        gamma = ops.where(pairs > 0, ops.sum(s_new * y_new) / ops.maximum(yy, 1e-30), 1.0)

        def oldest_first(i, r):
            j = m - 1 - i
            k = slot(j)
            b = ops.take(rho, k) * ops.sum(ops.take(y_all, k, axis=0) * r)
            return r + ops.take(s_all, k, axis=0) * (ops.take(alphas, j) - b)

        return -ops.fori_loop(0, m, oldest_first, gamma * q)

    def step(self, vg, state):
        x, g = state["x"], state["grad"]
        flat_g = ops.reshape(g, (-1,))
        d = ops.reshape(self.direction(flat_g, state["s"], state["y"], state["rho"],
                                       state["pairs"]), ops.shape(x))
        # torch.optim.LBFGS's first step: at most 1 along -g, less when the gradient is large.
        first = ops.minimum(1.0, 1.0 / ops.sum(ops.abs(flat_g)))
        t = ops.where(state["pairs"] > 0, 1.0, first)

        def trial(t):
            x_new = ops.clip(x + t * d, 0.0, 255.0)
            total, terms, g_new = vg(x_new)
            return x_new, total, terms, g_new

        x_new, total, terms, g_new = trial(t)
        evaluations = ops.ones(())
        if self.line_search:
            def enough(x_try, f_try):
                return f_try <= state["loss"] + ARMIJO_C1 * ops.sum(g * (x_try - x))

            def cond(t, k, x_new, total, terms, g_new):
                return ops.logical_and(k < MAX_HALVINGS, ops.logical_not(enough(x_new, total)))

            def body(t, k, *_):
                t = 0.5 * t
                return (t, k + 1, *trial(t))

            _, halvings, x_new, total, terms, g_new = ops.while_loop(
                cond, body, (t, ops.zeros((), "int32"), x_new, total, terms, g_new))
            evaluations = evaluations + ops.cast(halvings, "float32")

        s = ops.reshape(x_new - x, (-1,))
        y = ops.reshape(g_new, (-1,)) - flat_g
        sy = ops.sum(s * y)
        keep = sy > CURVATURE_EPS
        k = state["pairs"] % self.history
        old_s, old_y = ops.take(state["s"], k, axis=0), ops.take(state["y"], k, axis=0)
        index = ops.reshape(k, (1, 1))
        new = {
            "x": x_new,
            "loss": total,
            "grad": g_new,
            "s": ops.scatter_update(state["s"], index, ops.where(keep, s, old_s)[None]),
            "y": ops.scatter_update(state["y"], index, ops.where(keep, y, old_y)[None]),
            "rho": ops.scatter_update(
                state["rho"], index,
                ops.where(keep, 1.0 / ops.where(keep, sy, 1.0), ops.take(state["rho"], k))[None]),
            "pairs": state["pairs"] + ops.cast(keep, "int32"),
        }
        return new, total, terms, evaluations
