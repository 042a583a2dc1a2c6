"""Video: seconds per frame split into optical flow and stylisation, what a frame's compile
costs, the flicker the temporal term removes, and how many iterations a frame needs; through
the real run path (batch.plan and run_one: the frames' lives, the flow cache, metrics.json).

The clip is the video demo's (scripts/make_demo_clip.py: a slow pan and zoom over the demo's
photo), made in a temporary folder at --size, and stylised twice at equal iterations, in one
experiment (so the second arm reads the first one's flows):
- ruder: the defaults (each frame from the previous one warped, with the temporal term);
- independent: every frame from its own content, no temporal term (video.init content,
  video.temporal_weight 0), as a folder of frames run one by one would be.
Flicker is each arm's warping error (metrics.json, per frame: grey levels over consistent
pixels); the ratio ruder / independent should be <= 0.3.

    python benchmarks/bench_video.py [--size 256] [--frames 4] [--iterations 100]
                                     [--arms ruder independent] [--set KEY=VALUE ...]

Random weights (no art, the same arithmetic), the demo's style, scipy's L-BFGS-B unless
--set optimizer.method=lbfgs. Every frame runs --iterations (the first frame too: equal
iterations). `converged` is the first iteration whose total is within 1% (and 0.1%) of the
frame's last: where more iterations stop paying. The compile is measured apart: a
value-and-gradient with a temporal term built and called twice (first call minus second); a
clip pays it once per kind of frame, not per frame (its frames share it: autodiff.Shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PIPELINE_SKIP_ESTIMATE", "1")  # nothing to calibrate: only runs
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, write_json  # noqa: E402

from pipeline import batch, config, framework  # noqa: E402

ARMS = {"ruder": [], "independent": ["video.init=content", "video.temporal_weight=0"]}


def converged(trace: list[dict], frame: int, within: float) -> int | None:
    """The first iteration of `frame` whose total is within `within` of its last one's."""
    rows = [r for r in trace if r["frame"] == frame]
    last = rows[-1]["total"]
    return next((r["iteration"] for r in rows if r["total"] <= last * (1 + within)), None)


def compile_seconds(cfg, clip_path: str) -> float:
    """A later frame's objective compiled as a run compiles it (stylize.stage_objective with a
    temporal term, autodiff.value_and_grad): its first call minus its second; twice, the
    second measure kept (the first also loads the framework's kernels)."""
    import numpy as np

    from pipeline import autodiff, images, model
    from pipeline.stylize import stage_objective
    from pipeline.video import frames

    info = frames.probe(clip_path)
    content = images.resize_long_side(next(frames.read_frames(info, range(1)))[1], cfg.size)
    styles = [images.load_image(s) for s in cfg.style]
    network = model.feature_extractor(cfg.model, cfg.seed)
    weights = np.ones(content.shape[:2], np.float32)
    took = []
    for _ in range(2):  # the second frame's: new targets, so a new compile, as in a run
        objective, *_ = stage_objective(cfg, network, content, styles, cfg.size,
                                        temporal=(content, weights, 1000.0))
        vg = autodiff.value_and_grad(objective, network[0].variables)
        start = time.perf_counter()
        vg(content)
        first = time.perf_counter() - start
        start = time.perf_counter()
        vg(content)
        took.append(first - (time.perf_counter() - start))
    return took[-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=100, help="per frame, each arm")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    framework.load()

    folder = Path(tempfile.mkdtemp(prefix="bench-video-"))
    clip = folder / "clip.mp4"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_clip.py"), str(clip),
                    "--frames", str(args.frames), "--size", str(args.size)], check=True,
                   stdout=subprocess.DEVNULL)
    common = [f"content={clip}", f"size={args.size}", "model.weights=random",
              f"optimizer.iterations={args.iterations}",
              f"video.first_iterations={args.iterations}", "checkpoint_every=0",
              f"output_dir={folder}", "name=bench", *args.set]
    print(f"{args.frames} frames of {args.size} px (the demo's pan and zoom), "
          f"{args.iterations} iterations each; load {os.getloadavg()[0]:.2f}", flush=True)
    summary: dict = {"size": args.size, "frames": args.frames, "iterations": args.iterations,
                     "arms": {}}
    for arm in args.arms:
        cfg = config.load(ROOT / "configs" / "video.yaml", [*common, *ARMS[arm]])
        (job,) = batch.plan(cfg)
        start = time.perf_counter()
        outcome = batch.run_one(job)
        wall = time.perf_counter() - start
        assert outcome.status == "completed", outcome.message
        metrics = outcome.folder.read_metrics()
        trace = outcome.folder.read_trace()
        later = metrics["frames"][1:]
        rows = []
        for entry in metrics["frames"]:
            n = entry["frame"]
            row = {k: entry.get(k) for k in ("frame", "wall_seconds", "seconds", "flow_seconds",
                                              "flows_cached", "warping_error")}
            row.update(converged_1pct=converged(trace, n, 0.01),
                       converged_01pct=converged(trace, n, 0.001))
            rows.append(row)
            print(f"  {arm} frame {n}: {entry['wall_seconds']:.1f} s (optimiser "
                  f"{entry['seconds']:.1f} s, flow {1000 * (entry.get('flow_seconds') or 0):.0f}"
                  f" ms{', cached' if entry.get('flows_cached') else ''}); warping error "
                  f"{entry.get('warping_error')}; within 1% of its last loss at iteration "
                  f"{row['converged_1pct']}, 0.1% at {row['converged_01pct']}", flush=True)
        frame_s = statistics.median(e["wall_seconds"] for e in later)
        flow_s = statistics.median(e["flow_seconds"] for e in later
                                   if not e["flows_cached"]) if not all(
            e["flows_cached"] for e in later) else None
        summary["arms"][arm] = {"wall_seconds": wall, "frame_seconds": frame_s,
                                "flow_seconds": flow_s, "warping_error": metrics["warping_error"],
                                "frames": rows}
        share = f", flow {1000 * flow_s:.0f} ms = {flow_s / frame_s:.2%}" if flow_s else ""
        print(f"{arm}: {wall:.0f} s for the clip; a later frame (median) {frame_s:.1f} s"
              f"{share}; warping error {metrics['warping_error']}", flush=True)
    if {"ruder", "independent"} <= summary["arms"].keys():
        ratio = (summary["arms"]["ruder"]["warping_error"]
                 / summary["arms"]["independent"]["warping_error"])
        summary["flicker_ratio"] = ratio
        print(f"flicker: ruder / independent = {ratio:.3f}")
    summary["compile_seconds"] = compile_seconds(job.cfg, str(clip))
    frame_s = summary["arms"][args.arms[0]]["frame_seconds"]
    print(f"a compile: {summary['compile_seconds']:.2f} s, once per clip "
          f"({summary['compile_seconds'] / frame_s:.1%} of a later frame); load "
          f"{os.getloadavg()[0]:.2f}")
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
