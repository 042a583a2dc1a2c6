"""What scipy's L-BFGS-B costs around the network: a run's seconds per evaluation against the
same compiled value-and-gradient called alone, with BLAS limited to one thread around
fmin_l_bfgs_b (as optimize.minimize does) and without the limit (as before), side by side in
one process, alternating so that drift in the machine hits all alike.

    python benchmarks/bench_blas.py [--size 128] [--iterations 20] [--repeats 5]
    KERAS_BACKEND=jax python benchmarks/bench_blas.py

Reports medians over repeats of:
  vg alone         seconds per value-and-gradient call in a plain loop (the floor)
  vg alone, 1 BLAS the same loop inside threadpool_limits(1, "blas"): the limit must not slow
                   the network (TensorFlow and XLA use their own thread pools)
  run, 1 BLAS      optimize.minimize's wall time / evaluations (what a run does now)
  run, BLAS free   the same with the limit switched off (what a run did before)
and the ratio run / vg alone for each run row (the target is at most 1.15x).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import demo_inputs, write_json  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from pipeline import autodiff, optimize  # noqa: E402
from pipeline.losses import Objective  # noqa: E402


class _NoLimit:
    """Stands in for threadpool_limits inside optimize: the code as it was before the limit."""

    def __init__(self, *args, **kwargs):
        pass

    def restore_original_limits(self):
        pass


def vg_alone(vg, x, calls: int, limit: bool) -> float:
    start = time.perf_counter()
    if limit:
        with threadpool_limits(1, user_api="blas"):
            for _ in range(calls):
                vg(x)
    else:
        for _ in range(calls):
            vg(x)
    return (time.perf_counter() - start) / calls


def run(vg, x0, iterations: int, limit: bool) -> tuple[float, int]:
    driver = sys.modules[optimize.minimize.__module__]  # the module that calls scipy
    driver.threadpool_limits = threadpool_limits if limit else _NoLimit
    try:
        start = time.perf_counter()
        result = optimize.minimize(vg, x0, iterations)
        return (time.perf_counter() - start) / result.evaluations, result.evaluations
    finally:
        driver.threadpool_limits = threadpool_limits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    cfg, content, styles, extractor, names = demo_inputs(args.size)
    vg = autodiff.value_and_grad(Objective(extractor, names, cfg, content, styles),
                                 extractor.variables)
    vg(content)  # compile and warm up outside the clock
    calls = args.iterations  # about as many calls as a run's evaluations
    rows = {"vg alone": [], "vg alone, 1 BLAS": [], "run, 1 BLAS": [], "run, BLAS free": []}
    evaluations = []
    for _ in range(args.repeats):
        rows["vg alone"].append(vg_alone(vg, content, calls, limit=False))
        rows["vg alone, 1 BLAS"].append(vg_alone(vg, content, calls, limit=True))
        per_eval, n = run(vg, content.copy(), args.iterations, limit=True)
        rows["run, 1 BLAS"].append(per_eval)
        evaluations.append(n)
        rows["run, BLAS free"].append(run(vg, content.copy(), args.iterations, limit=False)[0])

    env = autodiff.environment()
    pools = ", ".join(f"{p['internal_api']} {p['version']} ({p['num_threads']} threads)"
                      for p in threadpool_info())
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"# {machine}; {env['backend']} on {env['device']}; {content.shape[1]}x"
          f"{content.shape[0]} px; {args.iterations} iterations x {args.repeats} repeats, "
          f"medians; BLAS pools: {pools or 'none'}")
    floor = statistics.median(rows["vg alone"])
    summary = {"machine": machine, "backend": env["backend"], "device": env["device"],
               "size": list(content.shape[:2]), "iterations": args.iterations,
               "repeats": args.repeats, "evaluations": statistics.median(evaluations)}
    print(f"{'':18} {'s/evaluation':>13} {'/ vg alone':>11}")
    for name, values in rows.items():
        median = statistics.median(values)
        summary[name] = {"seconds_per_evaluation": median, "ratio_to_vg_alone": median / floor}
        print(f"{name:18} {median:13.4f} {median / floor:10.2f}x")
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
