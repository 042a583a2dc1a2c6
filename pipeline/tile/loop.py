"""The device optimisers (optimizer.method lbfgs, adam) with a tiled objective.

optimize.device.minimize drives a `Compiled`: the method, the objective's value-and-gradient
(for the start image) and run(state, n), which runs n iterations in one compiled call with
the objective traced inside. A tiled evaluation cannot be traced inside one program: it is
two calls per tile with host work between (the Grams are summed, dL/dG formed). So here
run(state, n) is a host loop of n iterations, each the method's own step (keras.ops, run
eagerly) handed the tiled value-and-gradient as a function of tensors. Everything else,
Step records, checkpoints and their state, resume, the best image and the stop at a NaN, is
device.minimize's, unchanged, so a tiled run resumes from a whole run's checkpoint and back.

What it costs: the step's own arithmetic runs op by op instead of fused (at 512 px, L-BFGS
with history 30 spends a few ms per iteration more; see benchmarks/bench_tiles.py), against a
tiled evaluation of seconds. Limits: a step whose evaluations sit inside ops.while_loop
(LBFGS(line_search=True)) runs on TensorFlow, whose eager while_loop is a Python loop, and not
on JAX, which traces the loop's body.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

from pipeline.optimize import device


def compile_method(method, vg, terms: tuple[str, ...]) -> device.Compiled:
    """`method` (optimize.device_method) driven by the host-side `vg` (a ValueAndGrad, such
    as TiledValueAndGrad) one iteration at a time, for device.minimize."""

    def tensors(x):
        total, values, grad = vg(ops.convert_to_numpy(x))
        return (ops.convert_to_tensor(np.float32(total)),
                {k: ops.convert_to_tensor(np.float32(v)) for k, v in values.items()},
                ops.convert_to_tensor(grad))

    def run(state, n):
        # As device._program's loop body: a non-finite step ends the call uncounted, and the
        # best image moves only on a finite, lower loss.
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

    return device.Compiled(method, tuple(terms), vg, run)
