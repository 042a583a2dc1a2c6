"""The objective tile by tile (pipeline/tile) against the whole image: seconds per evaluation
side by side, peak memory in fresh processes, and the largest size one evaluation completes at.

    python benchmarks/bench_tiles.py                      # 512 px core 256, 1024 px core 512
    python benchmarks/bench_tiles.py --speed 2048:1024    # the whole image needs ~14 GB here
    python benchmarks/bench_tiles.py --speed "" --memory  # peak memory at 512..1536 px
    python benchmarks/bench_tiles.py --speed "" --largest 4096 --largest-core 1024
    python benchmarks/bench_tiles.py --speed "" --eager-step 512

Speed: the demo's run (random weights, default layers: the halo is block5_conv1's) at each
size; whole (losses.Objective, autodiff.value_and_grad) and tiled evaluations alternate, so
that drift in the machine hits both alike; medians. "windows" is the area the tiles' windows
cover over the image's (each window's network is cropped layer by layer to what the deeper
layers need, so it does less than that), and "issue" the rule of thumb
(1 + 2 x 78 / core)^2 x 4/3 that the tiled time was expected to be within.

Memory: each case is one evaluation in a fresh process; VmHWM (the process's peak resident
memory: framework, weights, images, targets and the evaluation) is read after it. Whole runs at
two sizes give the fit a + b * pixels that the whole image would need at larger sizes; tiled
runs with a fixed core should grow only by the arrays the size of the image (pixels, gradient,
content and style images, content targets).

The eager step (--eager-step SIZE): what the device optimisers' step costs per iteration on a
cheap objective, compiled (device.py) and run eagerly one iteration per host call, as a tiled
run takes it (device.compile_host).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import demo_inputs, write_json  # noqa: E402

GB = 1e9


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def objectives(size: int, core: int | None):
    """(whole or None, tiled or None, x): the demo's value-and-gradients at `size`."""
    import numpy as np

    from pipeline import autodiff
    from pipeline.losses import Objective
    from pipeline.tile.objective import TiledValueAndGrad

    cfg, content, styles, extractor, names = demo_inputs(size)
    x = np.clip(content + np.random.default_rng(0).normal(0, 20, content.shape), 0, 255)
    x = x.astype(np.float32)
    whole = tiled = None
    if core is None:
        whole = autodiff.value_and_grad(Objective(extractor, names, cfg, content, styles),
                                        extractor.variables)
    else:
        tiled = TiledValueAndGrad(extractor, names, cfg, content, styles, core)
    return whole, tiled, x


def speed(size: int, core: int, repeats: int) -> dict:
    import numpy as np

    from pipeline.tile.objective import TiledValueAndGrad

    whole, _, x = objectives(size, None)
    _, tiled, _ = objectives(size, core)
    assert isinstance(tiled, TiledValueAndGrad)
    reference, got = whole(x), tiled(x)  # compiles both, outside the clock
    error = abs(got[0] - reference[0]) / abs(reference[0])
    gerror = float(np.abs(got[2] - reference[2]).max() / np.abs(reference[2]).max())
    times = {"whole": [], "tiled": []}
    for _ in range(repeats):
        for name, vg in (("whole", whole), ("tiled", tiled)):
            start = time.perf_counter()
            vg(x)
            times[name].append(time.perf_counter() - start)
    h, w = x.shape[:2]
    windows = sum((t.rows.stop - t.rows.start) * (t.cols.stop - t.cols.start)
                  for t, _ in tiled.tiles) / (h * w)
    whole_s, tiled_s = (statistics.median(times[k]) for k in ("whole", "tiled"))
    return {"size": size, "core": core, "tiles": len(tiled.tiles), "whole_s": whole_s,
            "tiled_s": tiled_s, "ratio": tiled_s / whole_s, "windows": windows,
            "issue": (1 + 2 * 78 / core) ** 2 * 4 / 3, "total_rel_error": error,
            "gradient_rel_error": gerror, "load": loadavg()}


class Bowl:
    """A cheap objective, sum((x - 128)^2 / 1e4), so that an iteration's time is the step's."""

    terms = ("bowl",)

    def __call__(self, x):
        from keras import ops

        total = ops.sum(ops.square(x - 128.0)) / 1e4
        return total, {"bowl": total}


def eager_step(size: int, iterations: int) -> dict:
    """Seconds per iteration of each device method's step at `size` px on a cheap objective:
    compiled, many iterations per call (device.py), against eager, one per host call (as
    tiled runs take it, device.compile_host)."""
    import numpy as np

    from pipeline import autodiff, optimize
    from pipeline.optimize import device

    x = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype(np.float32)
    host_vg = autodiff.value_and_grad(Bowl(), [])
    host_vg.terms = Bowl.terms  # compile_host reads them off the value-and-gradient
    out = {"size": size}
    for name, history in (("lbfgs", 30), ("adam", 0)):
        for how in ("compiled", "eager"):
            method = optimize.device_method(name, history)
            compiled = (device.compile_method(method, Bowl(), []) if how == "compiled" else
                        device.compile_host(method, host_vg))
            device.minimize(compiled, x, 3)  # compiles, outside the clock
            start = time.perf_counter()
            device.minimize(compiled, x, iterations)
            out[f"{name}_{how}_s"] = (time.perf_counter() - start) / iterations
    out["load"] = loadavg()
    return out


def child(mode: str, size: int, core: int) -> None:
    """One evaluation in this (fresh) process; prints its numbers as JSON."""
    start = time.perf_counter()
    whole, tiled, x = objectives(size, None if mode == "whole" else core)
    vg = whole or tiled
    setup = time.perf_counter() - start
    before = peak_rss()
    start = time.perf_counter()
    total, _, grad = vg(x)
    first = time.perf_counter() - start
    assert grad.shape == x.shape
    print("RESULT", json.dumps({"mode": mode, "size": size, "core": core, "setup_s": setup,
                                "first_evaluation_s": first, "peak_before_gb": before / GB,
                                "peak_gb": peak_rss() / GB, "device_peak_gb": device_peak(),
                                "total": total, "load": loadavg()}))


def device_peak() -> float | None:
    """The GPU's peak memory in use by this process (GB; JAX only), or None on a CPU."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    return stats["peak_bytes_in_use"] / GB if stats else None


def in_child(mode: str, size: int, core: int, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(size), str(core)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        return {"mode": mode, "size": size, "core": core,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1],
                "returncode": proc.returncode}
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def memory(whole_sizes, tiled_sizes, core: int) -> dict:
    rows = [in_child("whole", s, core, 1800) for s in whole_sizes]
    rows += [in_child("tiled", s, core, 3600) for s in tiled_sizes]
    ok = [r for r in rows if r["mode"] == "whole" and "error" not in r]
    fit = None
    if len(ok) >= 2:
        (s0, m0), (s1, m1) = ((r["size"] ** 2, r["peak_gb"]) for r in ok[:2])
        b = (m1 - m0) / (s1 - s0)
        fit = {"a_gb": m0 - b * s0, "b_bytes_per_px": b * GB}
    return {"rows": rows, "whole_fit": fit}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", default="512:256,1024:512",
                        help="size:core pairs, comma separated ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true",
                        help="peak memory, whole at --whole-sizes, tiled at --tiled-sizes")
    parser.add_argument("--whole-sizes", type=int, nargs="*", default=[512, 768])
    parser.add_argument("--tiled-sizes", type=int, nargs="*", default=[768, 1536])
    parser.add_argument("--memory-core", type=int, default=256)
    parser.add_argument("--eager-step", type=int, default=0, metavar="SIZE",
                        help="the device methods' eager step cost at SIZE px")
    parser.add_argument("--largest", type=int, nargs="*", default=[],
                        help="sizes to try one tiled evaluation at, in fresh processes")
    parser.add_argument("--largest-core", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, size, core = args.child
        return child(mode, int(size), int(core))

    from pipeline import autodiff

    env = autodiff.environment()
    summary = {"machine": f"{os.cpu_count()} cores", "backend": env["backend"],
               "device": env["device"]}
    print(f"# {summary['machine']}; {env['backend']} on {env['device']}; "
          f"load {loadavg()}")
    pairs = [tuple(map(int, p.split(":"))) for p in args.speed.split(",") if p]
    if pairs:
        print(f"{'size':>5} {'core':>5} {'tiles':>5} {'whole s':>8} {'tiled s':>8} "
              f"{'ratio':>6} {'windows':>8} {'issue':>6}  load")
        summary["speed"] = []
        for size, core in pairs:
            r = speed(size, core, args.repeats)
            summary["speed"].append(r)
            print(f"{size:5d} {core:5d} {r['tiles']:5d} {r['whole_s']:8.2f} {r['tiled_s']:8.2f} "
                  f"{r['ratio']:5.2f}x {r['windows']:7.2f}x {r['issue']:5.2f}x  {r['load']}"
                  f"   (rel. error: total {r['total_rel_error']:.1e}, gradient "
                  f"{r['gradient_rel_error']:.1e})")
    if args.eager_step:
        r = eager_step(args.eager_step, 20)
        summary["eager_step"] = r
        for name in ("lbfgs", "adam"):
            print(f"{name} step at {r['size']} px (cheap objective): compiled "
                  f"{1000 * r[name + '_compiled_s']:.0f} ms/iteration, eager "
                  f"{1000 * r[name + '_eager_s']:.0f} ms/iteration  (load {r['load']})")
    if args.memory:
        summary["memory"] = memory(args.whole_sizes, args.tiled_sizes, args.memory_core)
        print(f"{'mode':>6} {'size':>5} {'core':>5} {'peak GB':>8} {'before GB':>9} "
              f"{'1st eval s':>10}  load")
        for r in summary["memory"]["rows"]:
            if "error" in r:
                print(f"{r['mode']:>6} {r['size']:5d}: failed: {r['error']}")
                continue
            print(f"{r['mode']:>6} {r['size']:5d} {r['core'] if r['mode'] == 'tiled' else '':>5} "
                  f"{r['peak_gb']:8.2f} {r['peak_before_gb']:9.2f} "
                  f"{r['first_evaluation_s']:10.1f}  {r['load']}")
        fit = summary["memory"]["whole_fit"]
        if fit:
            print(f"whole fit: {fit['a_gb']:.2f} GB + {fit['b_bytes_per_px']:.0f} B/px; "
                  + ", ".join(f"{s} px: {(fit['a_gb'] + fit['b_bytes_per_px'] * s * s / GB):.1f}"
                              f" GB" for s in (*args.tiled_sizes, 4096)))
    for size in args.largest:
        r = in_child("tiled", size, args.largest_core, 7200)
        summary.setdefault("largest", []).append(r)
        if "error" in r:
            print(f"tiled {size} px core {args.largest_core}: failed: {r['error']}")
        else:
            print(f"tiled {size} px core {args.largest_core}: one evaluation in "
                  f"{r['first_evaluation_s']:.0f} s (set-up {r['setup_s']:.0f} s), peak "
                  f"{r['peak_gb']:.2f} GB" + (f" (GPU: {r['device_peak_gb']:.2f} GB)"
                                              if r.get("device_peak_gb") else "")
                  + f"  (load {r['load']})")
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
