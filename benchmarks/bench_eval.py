"""Seconds per evaluation: this pipeline against the seed recipe, side by side in one process.

The seed recipe (the Keras 2 example this project grew from) stacks the content, style and
generated images into one VGG19 batch at every evaluation. The pipeline computes content
features and style Gram matrices once and passes only the generated image. Both are fed to
scipy's fmin_l_bfgs_b through the same driver and compiled by the same adapter, and they
alternate (pipeline, seed, pipeline, seed, ...) so that drift in the machine hits both alike.

    python benchmarks/bench_eval.py [--size 128] [--iterations 20] [--repeats 3]
    KERAS_BACKEND=jax python benchmarks/bench_eval.py --size 512   # on a GPU machine

Reports medians over repeats of: seconds per evaluation (optimisation wall time divided by
evaluations), the share of that time spent outside the value-and-gradient call (scipy and the
float64 boundary), and the ratio pipeline / seed.
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
from keras import ops  # noqa: E402

from pipeline import autodiff, images, model, optimize  # noqa: E402
from pipeline.losses import (  # noqa: E402
    Objective,
    content_loss,
    gram,
    normalised,
    style_loss,
    total_variation,
)


class SeedObjective:
    """The same loss, computed the seed recipe's way: all three images through VGG19 at every
    evaluation (the style image resized to the content's shape so that they stack)."""

    def __init__(self, extractor, names, cfg, content, style):
        self.extractor, self.index, self.cfg = extractor, {n: i for i, n in enumerate(names)}, cfg
        self.content = ops.convert_to_tensor(content[None])
        self.style = ops.convert_to_tensor(images.resize_to(style, content.shape[:2])[None])
        m = cfg.model
        self.cw = list(zip(m.content_layers, normalised(None, len(m.content_layers))))
        self.sw = list(zip(m.style_layers, normalised(None, len(m.style_layers))))

    def __call__(self, x):
        batch = ops.concatenate([self.content, self.style, x[None]], axis=0)
        maps = self.extractor(model.preprocess(batch))
        content = sum(w * content_loss(maps[self.index[n]][2:3], maps[self.index[n]][0:1])
                      for n, w in self.cw)
        style = sum(w * style_loss(gram(maps[self.index[n]][2:3]), gram(maps[self.index[n]][1:2]))
                    for n, w in self.sw)
        tv = total_variation(x)
        loss = self.cfg.loss
        total = loss.content_weight * content + loss.style_weight * style + loss.tv_weight * tv
        return total, {"content": content, "style": style, "tv": tv}


def timed(vg):
    """Wrap a value-and-grad so that the time spent inside it is summed."""
    spent = [0.0]

    def call(x):
        start = time.perf_counter()
        out = vg(x)
        spent[0] += time.perf_counter() - start
        return out

    return call, spent


def measure(vg, x0, iterations):
    call, spent = timed(vg)
    call(x0)  # compile and warm up outside the clock
    spent[0] = 0.0
    start = time.perf_counter()
    result = optimize.minimize(call, x0, iterations)
    wall = time.perf_counter() - start
    return {"per_eval": wall / result.evaluations, "outside_share": 1 - spent[0] / wall,
            "evaluations": result.evaluations, "wall": wall}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    cfg, content, styles, extractor, names = demo_inputs(args.size)
    contenders = {
        "pipeline": Objective(extractor, names, cfg, content, styles),
        "seed": SeedObjective(extractor, names, cfg, content, styles[0]),
    }
    vgs = {k: autodiff.value_and_grad(obj, extractor.variables) for k, obj in contenders.items()}
    runs = {k: [] for k in vgs}
    for _ in range(args.repeats):
        for name, vg in vgs.items():
            runs[name].append(measure(vg, content.copy(), args.iterations))

    env = autodiff.environment()
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": env["device"], "backend": env["backend"], "size": list(content.shape[:2]),
        "iterations": args.iterations, "repeats": args.repeats,
    }
    print(f"# {summary['machine']}; {env['backend']} on {env['device']}; "
          f"{content.shape[1]}x{content.shape[0]} px; {args.iterations} iterations x "
          f"{args.repeats} repeats, medians")
    print(f"{'recipe':10} {'s/evaluation':>13} {'outside vg':>11} {'evaluations':>12}")
    for name, rows in runs.items():
        per_eval = statistics.median(r["per_eval"] for r in rows)
        share = statistics.median(r["outside_share"] for r in rows)
        evals = statistics.median(r["evaluations"] for r in rows)
        summary[name] = {"seconds_per_evaluation": per_eval, "outside_vg_share": share}
        print(f"{name:10} {per_eval:13.4f} {share:10.1%} {evals:12.0f}")
    per_eval = {name: summary[name]["seconds_per_evaluation"] for name in runs}
    ratio = per_eval["pipeline"] / per_eval["seed"]
    summary["ratio"] = ratio
    print(f"pipeline / seed: {ratio:.2f}x")
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
