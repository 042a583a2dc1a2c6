"""How good is the estimate? Real runs (random weights) at a few sizes, each in a fresh
process through `python -m pipeline run`, against the estimate from this machine's calibration:
peak memory (the kernel's peak RSS of the run's process, VmHWM, on the CPU) and seconds per
iteration (median of the trace's intervals, the first iteration left out).

    python benchmarks/bench_estimate.py [--sizes 192 384 512] [--iterations 4]
        [--method lbfgs --history 100] [--style-scale 4] [--checkpoints]
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

MEASURE = ("import sys\nfrom pipeline.cli import main\nrc = main(sys.argv[1:])\n"
           "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
           "print('peak', int(hwm.split()[1]) * 1024)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 384, 512])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--method", default="scipy", choices=("scipy", "lbfgs", "adam"))
    parser.add_argument("--history", type=int, help="optimizer.history (default: the method's)")
    parser.add_argument("--style-scale", type=float, default=1.0)
    parser.add_argument("--checkpoints", action="store_true",
                        help="a checkpoint at the last iteration, as a run takes them")
    args = parser.parse_args()
    cal = estimate.calibration(print, {"method": args.method})
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
                "size": size, "model": {"weights": "random"}, "style_scale": args.style_scale,
                "optimizer": {"iterations": args.iterations, "method": args.method,
                              "history": args.history},
                "checkpoint_every": args.iterations if args.checkpoints else 0}))
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
