"""Optimisers and precisions side by side in one process: seconds per iteration, and the loss
each reaches after the same wall time.

Every contender (optimizer.method x model.precision) is compiled and warmed up first, then
they take turns (scipy, lbfgs, adam, scipy, ...) so that drift in the machine hits all
alike. Each turn runs the optimiser from the content image for `--seconds` of wall time and
reads its Step records: the loss reached is the lowest total of the iterations finished
within that time; seconds per iteration are the turn's time over its iterations.

    python benchmarks/bench_methods.py [--size 128] [--seconds 10] [--repeats 3]
                                       [--methods scipy lbfgs adam] [--precisions float32 bfloat16]
    python benchmarks/bench_methods.py --line-search   # adds L-BFGS with an Armijo search
    python benchmarks/bench_methods.py --reach 300     # time for each method to reach the
                                                       # loss scipy reaches in 300 iterations
    KERAS_BACKEND=jax python benchmarks/bench_methods.py --gpu          # make bench-gpu
    python benchmarks/bench_methods.py --gpu --tiny    # the same, tiny, to check it on a CPU

`--gpu` is the GPU table: at 512 and 1024 px, seconds for 500 iterations per method and
precision, the share of that time spent outside the compiled step (host work: scipy, the
transfers, Step records), and peak device memory, each measured in a fresh process (peaks
cannot be reset in JAX); then runs per hour for `--workers 1 2 4 8 16` with scipy
(bench_workers.py). Random weights, the demo images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import demo_inputs, write_json  # noqa: E402
from keras import ops  # noqa: E402

from pipeline import autodiff, config, optimize  # noqa: E402
from pipeline.losses import Objective  # noqa: E402
from pipeline.optimize import device  # noqa: E402
from pipeline.optimize.lbfgs import LBFGS  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


class Contender:
    """One optimiser at one precision, compiled for the demo images at one size."""

    def __init__(self, method: str, precision: str, size: int, history: int | None = None):
        self.method, self.precision = method, precision
        self.name = f"{method}/{precision}"
        kind = "lbfgs" if method.startswith("lbfgs") else method
        # None: each method's own default (config.DEFAULT_HISTORY), as a run would use.
        history = history or config.history(config.OptimizerConfig(method=kind))
        self.history = history
        cfg, content, styles, extractor, names = demo_inputs(
            size, f"model.precision={precision}", f"optimizer.history={history}")
        objective = Objective(extractor, names, cfg, content, styles)
        self.x0 = content
        self.inside = [0.0]  # seconds spent in the compiled step (vg, or a device call)
        if method == "scipy":
            self.vg = self._timed(autodiff.value_and_grad(objective, extractor.variables))
        else:
            opt = LBFGS(history, line_search=True) if method == "lbfgs+armijo" else \
                optimize.device_method(kind, history)
            self.compiled = device.compile_method(opt, objective, extractor.variables)
            run = self.compiled.run

            def timed_run(state, n):
                start = time.perf_counter()
                out = run(state, n)
                ops.convert_to_numpy(out[0])  # waits for the call (JAX dispatches async)
                self.inside[0] += time.perf_counter() - start
                return out

            self.compiled.run = timed_run

    def _timed(self, vg):
        def call(x):
            start = time.perf_counter()
            out = vg(x)
            self.inside[0] += time.perf_counter() - start
            return out
        return call

    def run(self, iterations: int, seconds: float = float("inf"), target: float | None = None):
        """Steps of one run from the content image: until `iterations`, `seconds` of wall
        time, or the loss falling to `target`, whichever comes first."""
        steps: list[optimize.Step] = []
        start = time.perf_counter()
        self.inside[0] = 0.0

        def stop():
            late = time.perf_counter() - start > seconds
            return late or (target is not None and steps and steps[-1].total <= target)

        if self.method == "scipy":
            result = optimize.minimize(self.vg, self.x0, iterations, self.history,
                                       on_step=steps.append, should_stop=stop)
        else:
            result = device.minimize(self.compiled, self.x0, iterations, on_step=steps.append,
                                     should_stop=stop)
        wall = time.perf_counter() - start
        return steps, result, wall, self.inside[0]


def best_within(steps, seconds: float) -> float:
    return min((s.total for s in steps if s.seconds <= seconds), default=float("nan"))


def cpu_table(args, contenders):
    per_iteration = {c.name: [] for c in contenders}
    loss = {c.name: [] for c in contenders}
    evals = {c.name: [] for c in contenders}
    for repeat in range(args.repeats):
        for c in contenders:
            steps, result, _, _ = c.run(100_000, seconds=args.seconds)
            last = [s for s in steps if s.seconds <= args.seconds][-1]
            per_iteration[c.name].append(last.seconds / last.iteration)
            evals[c.name].append(last.evaluations / last.iteration)
            loss[c.name].append(best_within(steps, args.seconds))
            print(f"  repeat {repeat + 1}: {c.name}: {last.iteration} iterations, "
                  f"loss {loss[c.name][-1]:.5g}", file=sys.stderr)
    print(f"{'method/precision':20} {'s/iteration':>12} {'evals/iter':>11} "
          f"{'loss at ' + str(args.seconds) + ' s':>16} {'vs first':>9}")
    rows = {}
    first = None
    for c in contenders:
        row = {"seconds_per_iteration": statistics.median(per_iteration[c.name]),
               "evaluations_per_iteration": statistics.median(evals[c.name]),
               "loss": statistics.median(loss[c.name])}
        first = first or row["loss"]
        rows[c.name] = row
        print(f"{c.name:20} {row['seconds_per_iteration']:12.4f} "
              f"{row['evaluations_per_iteration']:11.2f} {row['loss']:16.5g} "
              f"{row['loss'] / first:8.3f}x")
    return rows


def reach_table(args, contenders):
    """Wall time for each contender to reach the loss scipy reaches in --reach iterations."""
    scipy_ = [c for c in contenders if c.method == "scipy"]
    if not scipy_:
        sys.exit("--reach needs scipy among the methods")
    times = {c.name: [] for c in contenders}
    targets = []
    for repeat in range(args.repeats):
        steps, _, _, _ = scipy_[0].run(args.reach)
        target = min(s.total for s in steps)
        targets.append(target)
        steps_seconds = steps[-1].seconds
        times[scipy_[0].name].append(steps_seconds)
        for c in contenders:
            if c is scipy_[0]:
                continue
            # Given up at 3x scipy's time: "not reached" is the answer then.
            steps, _, _, _ = c.run(20 * args.reach, seconds=3 * steps_seconds, target=target)
            hit = [s.seconds for s in steps if s.total <= target]
            times[c.name].append(hit[0] if hit else float("inf"))
        print(f"  repeat {repeat + 1}: target {target:.5g}: " + ", ".join(
            f"{k} {v[-1]:.1f} s" for k, v in times.items()), file=sys.stderr)
    base = statistics.median(times[scipy_[0].name])
    print(f"# time to reach the loss {scipy_[0].name} reaches in {args.reach} iterations "
          f"(median target {statistics.median(targets):.5g})")
    print(f"{'method/precision':20} {'seconds':>9} {'vs scipy':>9}")
    rows = {}
    for name, values in times.items():
        median = statistics.median(values)
        rows[name] = median
        print(f"{name:20} {median:9.2f} {median / base:8.2f}x")
    return rows


def gpu_one(method: str, precision: str, size: int, iterations: int, repeats: int) -> dict:
    """One line of the GPU table, in this (fresh) process."""
    import keras

    c = Contender(method, precision, size)
    c.run(3)  # compile and warm up
    walls, shares = [], []
    for _ in range(repeats):
        steps, result, wall, inside = c.run(iterations)
        walls.append(wall)
        shares.append(1 - inside / wall)
    peak = None
    if keras.backend.backend() == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
    else:
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    return {"seconds": statistics.median(walls), "outside_share": statistics.median(shares),
            "peak_bytes": peak, "iterations": result.iterations,
            "device": autodiff.environment()["device"]}


def gpu_table(args):
    sizes = [32, 48] if args.tiny else args.sizes
    iterations = 5 if args.tiny else args.iterations
    repeats = 1 if args.tiny else args.repeats
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = {}
    print(f"# {machine()}; {os.environ.get('KERAS_BACKEND', 'tensorflow')}; "
          f"{iterations} iterations, medians of {repeats}; each line a fresh process")
    print(f"{'size':>5} {'method/precision':20} {'seconds':>9} {'outside step':>13} "
          f"{'peak memory':>12}  device")
    for size in sizes:
        for method in args.methods:
            for precision in args.precisions:
                command = [sys.executable, __file__, "--one", method, precision, str(size),
                           str(iterations), str(repeats)]
                proc = subprocess.run(command, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{size:>5} {method}/{precision}: failed: "
                          f"{proc.stderr.strip().splitlines()[-1:]}")
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows[f"{size}/{method}/{precision}"] = row
                peak = row["peak_bytes"]
                peak = "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"
                print(f"{size:>5} {method + '/' + precision:20} {row['seconds']:9.2f} "
                      f"{row['outside_share']:12.1%} {peak:>12}  {row['device']}", flush=True)
    # Runs per hour with scipy and workers sharing the device.
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_workers

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # workers share one GPU
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    workers = ["1", "2"] if args.tiny else [str(n) for n in args.workers]
    bench_workers.main(["--workers", *workers, "--size", str(sizes[0]),
                        "--iterations", str(iterations), "--runs", workers[-1],
                        "--repeats", "1"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="wall time of each turn: the loss is compared at this time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--history", type=int, default=None,
                        help="L-BFGS memory for every method (default: each method's own)")
    parser.add_argument("--methods", nargs="+", default=list(config.METHODS),
                        choices=[*config.METHODS, "lbfgs+armijo"])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        choices=config.PRECISIONS)
    parser.add_argument("--line-search", action="store_true",
                        help="add lbfgs+armijo: L-BFGS with a backtracking line search")
    parser.add_argument("--reach", type=int, metavar="N",
                        help="instead: time to reach the loss scipy reaches in N iterations")
    parser.add_argument("--gpu", action="store_true", help="the GPU table (make bench-gpu)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --gpu: tiny sizes and counts, to check it runs on a CPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    if args.one:
        method, precision, size, iterations, repeats = args.one
        print(json.dumps(gpu_one(method, precision, int(size), int(iterations), int(repeats))))
        return
    if args.gpu:
        rows = gpu_table(args)
    else:
        methods = args.methods + (["lbfgs+armijo"] if args.line_search else [])
        contenders = [Contender(m, p, args.size, args.history)
                      for p in args.precisions for m in methods]
        for c in contenders:
            c.run(3)  # compile and warm up outside the clock
        env = autodiff.environment()
        shape = contenders[0].x0.shape
        print(f"# {machine()}; {env['backend']} on {env['device']}; {shape[1]}x{shape[0]} px; "
              "history " + ", ".join(sorted({f"{c.method.split('+')[0]} {c.history}"
                                             for c in contenders}))
              + f"; {args.repeats} repeats, medians")
        rows = reach_table(args, contenders) if args.reach else cpu_table(args, contenders)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
