"""Video: seconds per frame split into optical flow and stylisation, and the flicker the
temporal term removes, on a slow pan over a photo generated here (nothing is read from or
written to disk but the photo).

Each frame after the first is stylised twice from the same content frame, at equal
iterations: independently (from the content frame, as an image run starts), and as Ruder et
al. do (from the previous stylised frame warped onto it, its holes filled from the content,
with the temporal term towards that warped frame where the flow is consistent). Both arms
share the first frame. Flicker is the warping error of each arm's frame t against its own
frame t-1 (temporal.warping_error: grey levels over consistent pixels, flow from the content
frames); the ratio is temporal / independent, and Ruder's method should bring it to <= 0.3.

    python benchmarks/bench_video.py [--size 256] [--frames 4] [--iterations 100]
                                     [--temporal-weight W] [--flow dis] [--photo PATH]

Random weights (no art, the same arithmetic), the demo's photo and style, scipy's L-BFGS-B
unless --set optimizer.method=lbfgs. The stylisation here is stylize.stylize's single-stage
path written out (Objective, value_and_grad, optimize.minimize): stylize() does not take a
temporal term yet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import demo_inputs, write_json  # noqa: E402

from pipeline import autodiff, config, images, optimize  # noqa: E402
from pipeline.losses import Objective  # noqa: E402
from pipeline.optimize import device  # noqa: E402
from pipeline.video import consistency, flow, temporal  # noqa: E402


def pan_clip(photo, size: int, count: int, step: float = 4.0):
    """`count` frames of a window moving `step` photo pixels right and step/3 down per frame
    across `photo`, each frame `size` on its long side (4:3): a camera panning slowly, with
    sub-pixel motion at the frame's scale."""
    ph, pw = photo.shape[:2]
    span = step * (count - 1)
    wh, ww = int((pw - span) * 3 / 4), int(pw - span)  # the window, in photo pixels
    if wh + span / 3 > ph:
        wh = int(ph - span / 3)
        ww = int(wh * 4 / 3)
    out = []
    for t in range(count):
        x0, y0 = round(t * step), round(t * step / 3)
        out.append(images.resize_to(photo[y0:y0 + wh, x0:x0 + ww], (size * 3 // 4, size)))
    return out


def stylise(cfg, extractor, names, content, styles, x0, temporal_args=None):
    """One frame: (image, seconds to build the objective and compile it, seconds to optimise)."""
    start = time.perf_counter()
    objective = Objective(extractor, names, cfg, content, styles, temporal=temporal_args)
    opt = cfg.optimizer
    if opt.method == "scipy":
        vg = autodiff.value_and_grad(objective, extractor.variables)
        vg(x0)  # compiled here, so that the optimisation's seconds are the iterations'
        built = time.perf_counter() - start
        result = optimize.minimize(vg, x0, opt.iterations, config.history(opt))
    else:
        method = optimize.device_method(opt.method, config.history(opt))
        compiled = device.compile_method(method, objective, extractor.variables)
        built = time.perf_counter() - start
        result = device.minimize(compiled, x0, opt.iterations, None, lambda: False,
                                 (0, 0, 0.0), None, 0)
    return result.image, built, time.perf_counter() - start - built


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=100, help="per frame, each arm")
    parser.add_argument("--temporal-weight", type=float, default=temporal.RUDER_TEMPORAL_WEIGHT)
    parser.add_argument("--flow", choices=flow.METHODS, default="dis")
    parser.add_argument("--step", type=float, default=4.0, help="pan, photo pixels per frame")
    parser.add_argument("--photo", type=Path, help="default: the demo's content photo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    cfg, _, styles, extractor, names = demo_inputs(
        args.size, f"optimizer.iterations={args.iterations}", *args.set)
    photo = images.load_image(args.photo or cfg.content)
    clip = pan_clip(photo, args.size, args.frames, args.step)
    print(f"{args.frames} frames of {clip[0].shape[1]}x{clip[0].shape[0]}, pan {args.step} photo "
          f"px/frame; {cfg.optimizer.method}, {args.iterations} iterations per frame; "
          f"temporal_weight {args.temporal_weight:g}; flow {args.flow}; load "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    first, built, took = stylise(cfg, extractor, names, clip[0], styles, clip[0])
    print(f"frame 1: {built:.1f} s build + {took:.1f} s optimise", flush=True)
    independent, ruder = [first], [first]
    rows = []
    for t in range(1, args.frames):
        content = clip[t]
        start = time.perf_counter()
        backward, forward = flow.flows(content, clip[t - 1], args.flow)
        weights = consistency.reliable(backward, forward)
        flow_s = time.perf_counter() - start

        x_ind, _, ind_s = stylise(cfg, extractor, names, content, styles, content)
        start = time.perf_counter()
        x0 = flow.prev_warped(ruder[-1], backward, content)
        warped, c = temporal.targets([ruder[-1]], [backward], [weights])
        prep_s = time.perf_counter() - start
        x_rud, built_s, rud_s = stylise(cfg, extractor, names, content, styles, x0,
                                        (warped, c, args.temporal_weight))
        independent.append(x_ind)
        ruder.append(x_rud)
        row = {
            "frame": t + 1,
            "flow_s": flow_s,
            "warp_s": prep_s,
            "build_s": built_s,
            "stylise_s": rud_s,
            "stylise_independent_s": ind_s,
            "consistent": float(weights.mean()),
            "flicker_independent": temporal.warping_error(x_ind, independent[-2], backward,
                                                          weights),
            "flicker_temporal": temporal.warping_error(x_rud, ruder[-2], backward, weights),
            "flicker_content": temporal.warping_error(content, clip[t - 1], backward, weights),
            # How far stylisation moved the pixels: flicker is only meaningful beside it.
            "change_independent": float(abs(x_ind - content).mean()),
            "change_temporal": float(abs(x_rud - content).mean()),
        }
        row["ratio"] = row["flicker_temporal"] / row["flicker_independent"]
        frame_s = flow_s + prep_s + built_s + rud_s
        row["flow_share"] = flow_s / frame_s
        rows.append(row)
        print(f"frame {t + 1}: flow {flow_s * 1000:.0f} ms ({row['flow_share']:.2%} of the "
              f"frame), build {built_s:.1f} s, optimise {rud_s:.1f} s (independent "
              f"{ind_s:.1f} s); consistent {row['consistent']:.0%}; flicker independent "
              f"{row['flicker_independent']:.2f}, temporal {row['flicker_temporal']:.2f} "
              f"(ratio {row['ratio']:.2f}), content's own {row['flicker_content']:.2f}; "
              f"change from the content {row['change_independent']:.1f} / "
              f"{row['change_temporal']:.1f}", flush=True)

    ind = statistics.mean(r["flicker_independent"] for r in rows)
    rud = statistics.mean(r["flicker_temporal"] for r in rows)
    flow_s = statistics.median(r["flow_s"] for r in rows)
    frame_s = statistics.median(r["flow_s"] + r["warp_s"] + r["build_s"] + r["stylise_s"]
                                for r in rows)
    print(f"\nflicker (mean warping error, grey levels): independent {ind:.2f}, temporal "
          f"{rud:.2f}: ratio {rud / ind:.3f}")
    print(f"per frame (median): {frame_s:.1f} s, of which flow {flow_s * 1000:.0f} ms "
          f"({flow_s / frame_s:.2%})")
    write_json(args.json, {"size": args.size, "iterations": args.iterations,
                           "temporal_weight": args.temporal_weight, "flow": args.flow,
                           "method": cfg.optimizer.method, "frames": rows,
                           "flicker_ratio": rud / ind, "seconds_per_frame": frame_s,
                           "flow_seconds": flow_s})


if __name__ == "__main__":
    main()
