"""How good is the estimate? Real runs (random weights) at a few sizes, each in a fresh
process through `python -m pipeline run`, against the estimate from this machine's calibration:
peak memory (the kernel's peak RSS of the run's process, on the CPU) and seconds per iteration
(median of the trace's intervals, the first iteration left out).

    python benchmarks/bench_estimate.py [--sizes 192 384 512] [--iterations 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import batch, config, estimate  # noqa: E402

MEASURE = ("import resource, sys\nfrom pipeline.cli import main\nrc = main(sys.argv[1:])\n"
           "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 384, 512])
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    cal = estimate.calibration(print)
    print(f"calibration: {cal['device']}, memory {cal['memory'][0] / 1e9:.3f} GB + "
          f"{cal['memory'][1]:.0f} B/pixel, time {cal['seconds'][0]:.3f} s + "
          f"{cal['seconds'][1] * 1e6:.2f} us/pixel per iteration")
    print("| size | estimated peak GB | measured peak GB | error | estimated s/it "
          "| measured s/it |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        for name in ("content", "style"):
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(
                folder / f"{name}.png")
        for size in args.sizes:
            path = folder / f"s{size}.yaml"
            path.write_text(yaml.safe_dump({
                "name": f"s{size}", "output_dir": str(folder / "out"),
                "content": str(folder / "content.png"), "style": str(folder / "style.png"),
                "size": size, "model": {"weights": "random"},
                "optimizer": {"iterations": args.iterations}, "checkpoint_every": 0}))
            (job,) = batch.plan(config.load(path))
            guess = estimate.estimate(job.cfg, job.run_id, cal, float("inf"))
            proc = subprocess.run(
                [sys.executable, "-c", MEASURE, "run", str(path)], cwd=ROOT, text=True,
                capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                          estimate.ENV_SKIP: "1"})
            if proc.returncode != 0:
                sys.exit(proc.stderr)
            peak = int(proc.stdout.split("peak")[-1])
            trace = batch.folder_of(job).read_trace()
            seconds = [b["seconds"] - a["seconds"] for a, b in zip(trace, trace[1:])]
            measured_s = statistics.median(seconds)
            print(f"| {guess.width}x{guess.height} | {guess.peak_bytes / 1e9:.3f} | "
                  f"{peak / 1e9:.3f} | {100 * (guess.peak_bytes / peak - 1):+.1f}% | "
                  f"{guess.seconds_per_iteration:.3f} | {measured_s:.3f} |")
            sys.stdout.flush()
    print(json.dumps({"machine": cal["key"]}, sort_keys=True))


if __name__ == "__main__":
    main()
