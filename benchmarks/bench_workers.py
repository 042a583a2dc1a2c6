"""Runs per hour for `--workers N` (and `--executor ray`): the same small sweep run as a user
runs it, through `python -m pipeline run` in a subprocess, once per setting, the settings
alternating (1, 2, ray, 1, 2, ray, ...) so that drift in the machine hits all alike. Wall time
includes what a user waits for: Python and TensorFlow starting (and Ray: a local instance
started, or connected to, and its workers), the model built, every run's files written.

    python benchmarks/bench_workers.py [--workers 1 2] [--runs 4] [--size 64]
                                       [--iterations 100] [--repeats 3]
    python benchmarks/bench_workers.py --workers 2 --executor local ray  # vs a local Ray
    KERAS_BACKEND=jax python benchmarks/bench_workers.py --workers 1 2 4 8 --size 512  # GPU

Each repeat writes into a fresh output folder (a completed run would be skipped otherwise).
Reports the median runs per hour for each setting and its ratio to the first one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_json


def settings(args) -> dict[str, list[str]]:
    """The command-line arguments of each setting measured, by its name in the table."""
    found = {}
    if "local" in args.executor:
        found.update({f"workers {n}": ["--workers", str(n)] for n in args.workers})
    if "ray" in args.executor:
        found["ray"] = ["--executor", "ray", *(["--address", args.address] if args.address
                                                else [])]
    return found


def batch(out: Path, name: str, options: list[str], args) -> float:
    """Seconds of wall time for the whole sweep, which must complete."""
    weights = [10.0 ** (k - 2) for k in range(args.runs)]  # one run per tv_weight
    command = [sys.executable, "-m", "pipeline", "run", str(ROOT / "configs" / "demo.yaml"),
               *options, "--set", f"output_dir={out}",
               "--set", "name=bench-workers", "--set", f"size={args.size}",
               "--set", f"optimizer.iterations={args.iterations}",
               "--set", "model.weights=random", "--set", f"checkpoint_every={args.iterations}",
               "--set", f"sweep={{loss.tv_weight: {weights}}}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or f"{args.runs} completed" not in proc.stderr:
        sys.exit(f"the batch with {name} did not complete:\n{proc.stderr[-3000:]}")
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--executor", nargs="+", choices=("local", "ray"), default=["local"],
                        help="local: one setting per --workers count; ray: --executor ray")
    parser.add_argument("--address", help="the Ray cluster (default: a new local instance)")
    parser.add_argument("--runs", type=int, default=4, help="runs in the sweep")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    measured = settings(args)
    seconds: dict[str, list[float]] = {name: [] for name in measured}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        for repeat in range(args.repeats):
            for i, (name, options) in enumerate(measured.items()):
                seconds[name].append(batch(Path(tmp) / f"{i}-{repeat}", name, options, args))
                print(f"  repeat {repeat + 1}: {name}: {seconds[name][-1]:.1f} s",
                      file=sys.stderr)

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"# {machine}; {backend}; {args.runs} runs of {args.iterations} iterations at "
          f"{args.size} px per batch; {args.repeats} repeats, medians")
    first = next(iter(measured))
    print(f"{'setting':>10} {'batch s':>9} {'runs/hour':>10} {'vs ' + first:>12}")
    summary = {"machine": machine, "backend": backend, "runs": args.runs, "size": args.size,
               "iterations": args.iterations, "repeats": args.repeats, "settings": {}}
    base = None
    for name in measured:
        wall = statistics.median(seconds[name])
        per_hour = args.runs * 3600 / wall
        base = base or per_hour
        summary["settings"][name] = {"batch_seconds": wall, "runs_per_hour": per_hour}
        print(f"{name:>10} {wall:>9.1f} {per_hour:>10.0f} {per_hour / base:>11.2f}x")
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
