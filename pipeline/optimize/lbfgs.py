"""L-BFGS on the device, in keras.ops: the inverse Hessian from the last `history` (s, y)
pairs, a step, and projection onto 0..255, all inside the compiled loop of optimize.device.

The direction -H g comes from the compact representation of Byrd, Nocedal and Schnabel
(1994, Theorem 2.2), the form scipy's L-BFGS-B uses, not from the two-loop recursion
(Nocedal and Wright, Algorithm 7.4) that gives the same vector: the two-loop recursion is
2 * history dependent steps, each a few tiny kernels (about 0.2 ms of loop overhead per step
measured on a CPU with TensorFlow), where the compact form is four matrix-vector products
over the history and two triangular solves of history x history. At 128 px, history 100
cost the two-loop recursion 1.26x the seconds per iteration of history 10, the compact form
1.10x. So a long history costs little, and a long history is what makes each iteration count:
at 128 px the loss after 300 iterations with history 30 or 100 was 1.4% lower than with 10
(README, "Optimisers"). S^T Y and Y^T Y are kept up to date one row and column per pair.

The step is fixed, as in jcjohnson/neural-style and torch.optim.LBFGS's default: the first
iteration moves min(1, 1 / |g|_1) along -g, every later one takes the quasi-Newton step
whole (learning rate 1), one evaluation per iteration. Only the first iteration, counted in
the state (a resume goes on counting): while curvature pairs are rejected (where the loss is
linear or concave) the direction is -g, and torch's rule takes it whole; a short step at
every such iteration moved 0.33 in 20 iterations on a linear loss, where torch's moves 19.

A backtracking (Armijo) line search, halving the step until the loss falls enough, is here
too (`line_search=True`), because we measured both (README, "Optimisers";
benchmarks/bench_methods.py --line-search). On the CPU at 128 px, after the same 20 s, the
fixed step's loss was 2.4 times lower: the search rejected the whole step on most iterations
(2.9 evaluations per iteration), each halving a full network pass, and with the halved steps
the pairs it stored made poorer curvature estimates (it stalled); the fixed step overshoots
now and then (the best image is kept) but recovers within a few iterations.

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


def _dots(rows, v):
    """rows @ v as a multiply and a sum, not a matmul: GPUs run float32 matmuls in TF32 by
    default on both backends (10-bit mantissas), and s.y can be a small difference of large
    products. XLA fuses the two into one pass over the rows."""
    return ops.sum(rows * v[None, :], axis=1)


def _combine(c, rows):
    """c @ rows (a sum of rows), for the same reason as _dots."""
    return ops.sum(c[:, None] * rows, axis=0)


class LBFGS:
    def __init__(self, history: int = 10, line_search: bool = False):
        self.history, self.line_search = history, line_search

    def init(self, x0: np.ndarray) -> dict:
        """The pairs live in ring buffers: pair number p in slot p mod history. `sy` holds
        s_i.y_j for slots i, j and `yy` y_i.y_j; `iterations` counts the steps taken."""
        m, n = self.history, x0.size
        return {"s": np.zeros((m, n), np.float32), "y": np.zeros((m, n), np.float32),
                "sy": np.zeros((m, m), np.float32), "yy": np.zeros((m, m), np.float32),
                "pairs": np.int32(0), "iterations": np.int32(0)}

    def remember(self, state, s, y, keep):
        """The ring buffers with the pair (s, y) written over the oldest, where `keep`."""
        m = self.history
        k = state["pairs"] % m
        index = ops.reshape(k, (1, 1))
        # One row written in place (a copy of the whole buffer would cost as much as the
        # direction), the old row written back when the pair is not kept.
        new_s = ops.scatter_update(
            state["s"], index, ops.where(keep, s, ops.take(state["s"], k, axis=0))[None])
        new_y = ops.scatter_update(
            state["y"], index, ops.where(keep, y, ops.take(state["y"], k, axis=0))[None])
        slot = ops.logical_and(ops.arange(m) == k, keep)
        row, column = slot[:, None], slot[None, :]
        sy = ops.where(column, _dots(new_s, y)[:, None], state["sy"])  # s_i . y
        sy = ops.where(row, _dots(new_y, s)[None, :], sy)  # s . y_j
        y_y = _dots(new_y, y)
        yy = ops.where(row, y_y[None, :], ops.where(column, y_y[:, None], state["yy"]))
        return {"s": new_s, "y": new_y, "sy": sy, "yy": yy,
                "pairs": state["pairs"] + ops.cast(keep, "int32")}

    def direction(self, g, state):
        """-H g, H = gamma I + [S  gamma Y] M [S^T; gamma Y^T] with
        M = [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]], R the upper triangle of S^T Y
        with pairs oldest first, D its diagonal, gamma = s.y / y.y of the newest pair (1
        before any). Slots never written are zeros: their rows of R are set to the identity's,
        so they solve to 0 and change nothing."""
        m, pairs = self.history, state["pairs"]
        s_all, y_all = state["s"], state["y"]
        age = (pairs + ops.arange(m)) % m  # slot of the j-th oldest; unwritten slots first
        written = ops.take(ops.arange(m) < pairs, age)
        sy = ops.take(ops.take(state["sy"], age, axis=0), age, axis=1)
        yy = ops.take(ops.take(state["yy"], age, axis=0), age, axis=1)
        diagonal = ops.diagonal(sy)  # s_i.y_i, oldest first: the newest pair is last
        gamma = ops.where(pairs > 0,
                          diagonal[-1] / ops.maximum(ops.diagonal(yy)[-1], 1e-30), 1.0)
        r = ops.triu(sy) + ops.diag(ops.where(written, 0.0, 1.0))
        a = ops.take(_dots(s_all, g), age)  # S^T g
        b = gamma * ops.take(_dots(y_all, g), age)  # gamma Y^T g
        p = ops.solve_triangular(r, a[:, None], lower=False)  # R^-1 S^T g
        inner = diagonal[:, None] * p + gamma * _dots(yy, p[:, 0])[:, None] - b[:, None]
        w = ops.solve_triangular(ops.transpose(r), inner, lower=True)
        back = (ops.arange(m) - pairs + m) % m  # each slot's position in age order
        w, p = ops.take(w[:, 0], back), ops.take(p[:, 0], back)
        return -(gamma * g + _combine(w, s_all) - gamma * _combine(p, y_all))

    def step(self, vg, state):
        x, g = state["x"], state["grad"]
        flat_g = ops.reshape(g, (-1,))
        d = ops.reshape(self.direction(flat_g, state), ops.shape(x))
        # torch.optim.LBFGS's first step: at most 1 along -g, less when the gradient is large.
        first = ops.minimum(1.0, 1.0 / ops.sum(ops.abs(flat_g)))
        t = ops.where(state["iterations"] > 0, 1.0, first)

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
        keep = ops.sum(s * y) > CURVATURE_EPS
        return ({"x": x_new, "loss": total, "grad": g_new, **self.remember(state, s, y, keep),
                 "iterations": state["iterations"] + 1}, total, terms, evaluations)
