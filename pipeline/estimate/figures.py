"""A calibration applied to one run: its figures (peak memory, seconds per iteration and in
all) stage by stage, whole or tile by tile at a core, as stylize will run it. predict.py
chooses among them and words the estimate.

A tiled run holds the network of one window at a time, so its peak is the whole model's at the
largest window's size, plus what grows with the image however it is tiled: the pixel arrays
(the iterate, its gradient, the content image, the TV term's arrays, the content targets),
the style images' pixels and the optimiser's vectors. Those last are measured constants per
pixel (below), not a calibration: they are arrays of known shapes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline import config, scales
from pipeline.estimate.calibration import CALIBRATION_HISTORY
from pipeline.tile import geometry

SCIPY_BYTES = 2 * 3 * 8  # per pixel and correction: s and y, float64, three channels

# What a tiled run holds for the whole image, per pixel of the generated image (bytes), beside
# the content targets (target_bytes) and the style images (STYLE_PIXEL_BYTES per style pixel).
# Measured on the CPU (TensorFlow 2.21): the growth of VmHWM between 512 and 1024 px with one
# core size, over the pixels added, in fresh processes; each method's total, at two histories
# for scipy and lbfgs, was split as below (tests/test_tile.py and tests/test_estimate.py check
# the totals at other sizes):
# - every method: the content image, the start image, the iterate and its gradient as the tiled
#   objective takes and gives them, TV's arrays on the whole image (12 bytes a float32 copy);
TILED_PIXEL_BYTES = 150.0
# - the optimiser, (bytes, bytes per correction): scipy's L-BFGS-B its bounds, work arrays and
#   the copies at its float64 boundary, and per correction s and y in float64 (exact: 48);
#   lbfgs (eager, one step per call) its iterate, gradient and best image, and per correction
#   s and y, their replacements and a product's temporary of the same shape; Adam its moments,
#   their replacements and the step's temporaries. Measured totals: scipy 716 + 48 history,
#   lbfgs 214 + 80 history, Adam 416.
OPTIMISER_BYTES = {"scipy": (566.0, SCIPY_BYTES), "lbfgs": (64.0, 80.0), "adam": (266.0, 0.0)}
STYLE_PIXEL_BYTES = 24  # each style image, float32, at its size and as read
# Each window frame (a window's length and its core's place in it, per side) is a compiled
# function of its own: two for the objective's passes and one for the content targets per
# frame of the content's tiling, one per frame of each style image's. Measured on the CPU
# (TensorFlow): 6-8 MB each for VGG19 to block5_conv1 (13 convolutions), less for fewer.
FUNCTION_BYTES_PER_CONV = 0.6e6
# Seconds: each window runs forward twice and backward once (a backward costs about two
# forwards), where the whole image runs forward and backward once: 4/3 of the whole model's
# time per window pixel. benchmarks/bench_tiles.py measures it.
TILED_WORK = 4 / 3


def optimiser_bytes(method: str, history: int) -> float:
    """Bytes per pixel of the generated image that `method` keeps with `history` corrections
    (None of them grows with tiling's windows)."""
    base, per_correction = OPTIMISER_BYTES[method]
    return base + (per_correction * history if method != "adam" else 0.0)


def target_bytes(model: config.ModelConfig) -> float:
    """Bytes per pixel of the content targets, float32 at each content layer's resolution: C_l
    channels per stride^2 pixels (block4_conv2: 512 / 64, 32 bytes)."""
    fields = geometry.receptive_fields(model.network)
    return sum(4.0 * config.layer_channels(n) / fields[n].stride ** 2
               for n in model.content_layers)


def scaled_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(height, width) of a width x height image (as headers give it) scaled to `size` on its
    long side, as images.resize_long_side scales it."""
    return config.long_side_shape(height, width, size)


@dataclass(frozen=True)
class Figures:
    peak_bytes: float  # the largest stage's (or an earlier, larger one's)
    seconds_per_iteration: float  # at the last stage
    seconds: float  # every stage's iterations
    tiles: int  # at the last stage; 1: whole
    optimiser_bytes: float  # at the last stage, tiled


class Model:
    """A calibration applied to one run: its stages, each whole or tile by tile at a core."""

    def __init__(self, cfg: config.Config, cal: dict, content, styles):
        self.cfg = cfg
        (self.a, self.b), self.c, (self.t, self.u) = cal["memory"], cal["style"], cal["seconds"]
        method, m = cfg.optimizer.method, config.history(cfg.optimizer)
        b, u = self.b, self.u
        if method == "lbfgs" and cal["history"]:
            # Measured: the calibration's own history is in b and u already; never less than it.
            longer = max(0, m - cal["history"]["at"][0])
            b, u = b + cal["history"]["memory"] * longer, u + cal["history"]["seconds"] * longer
        elif method == "scipy" and cal["device"].startswith("cpu"):
            # Exact: scipy's history is host memory (on a GPU, not the device's that is checked).
            b += SCIPY_BYTES * (m - CALIBRATION_HISTORY)
        self.b_run, self.u_run = b, u  # whole runs: per pixel, with the run's own history
        self.method, self.history = method, m
        # Tile by tile, per pixel of the whole image: what no window holds. On a GPU scipy's
        # vectors are the host's, not the device's that is checked.
        on_device = not cal["device"].startswith("cpu")
        self.optimiser = 0.0 if on_device and method == "scipy" else optimiser_bytes(method, m)
        self.pixel_bytes = TILED_PIXEL_BYTES + target_bytes(cfg.model) + self.optimiser
        self.halo = geometry.objective_halo(cfg)
        fields = geometry.receptive_fields(cfg.model.network)
        deepest = max((*cfg.model.content_layers, *cfg.model.style_layers),
                      key=list(fields).index)
        self.function_bytes = FUNCTION_BYTES_PER_CONV * (list(fields).index(deepest) + 1)
        self.stages = []
        for stage in scales.stages(cfg):
            shape = scaled_shape(*content, stage.size)
            style_shapes = [scaled_shape(*s, config.style_size(cfg, stage.size)) for s in styles]
            self.stages.append((stage, shape, style_shapes))

    def run(self, core: int | None) -> Figures:
        """The run's figures with `tile: core` (None: whole): each stage tiled where
        geometry.stage_core says, as stylize will run it."""
        cfg = dataclasses.replace(self.cfg, tile="off" if core is None else core)
        peak, seconds = 0.0, 0.0
        for stage, (h, w), style_shapes in self.stages:
            pixels, style_pixels = h * w, sum(math.prod(s) for s in style_shapes)
            tiled = geometry.stage_core(cfg, (h, w))
            if tiled is None:
                stage_peak = self.a + self.b_run * pixels + self.c * style_pixels
                per_iteration, tiles, optimiser = self.t + self.u_run * pixels, 1, 0.0
            else:
                rows, cols = (geometry.spans(n, tiled, self.halo) for n in (h, w))
                window = max(s.stop - s.start for s in rows) * max(s.stop - s.start for s in cols)
                area = sum(s.stop - s.start for s in rows) * sum(s.stop - s.start for s in cols)
                # The whole model at the largest window's size (its own arrays included: a
                # small overcount), and what grows with the image whatever its tiles.
                stage_peak = (self.a + self.b * window + self.pixel_bytes * pixels
                              + STYLE_PIXEL_BYTES * style_pixels)
                per_iteration = (self.t + self.u * TILED_WORK * area
                                 + (self.u_run - self.u) * pixels)  # lbfgs's longer history
                tiles, optimiser = len(rows) * len(cols), self.optimiser * pixels
                functions = 3 * self.frames((h, w), tiled) + sum(
                    self.frames(s, tiled) for s in style_shapes)
                stage_peak += self.function_bytes * functions
            peak = max(peak, stage_peak)
            seconds += (stage.last - stage.first + 1) * per_iteration
        return Figures(peak, per_iteration, seconds, tiles, optimiser)

    def frames(self, shape: tuple[int, int], core: int) -> int:
        """How many distinct window frames cut an image of `shape`: one compiled function each."""
        rows, cols = ({geometry.Frame.of(s, n) for s in geometry.spans(n, core, self.halo)}
                      for n in shape)
        return len(rows) * len(cols)

    def shape(self) -> tuple[int, int]:
        return self.stages[-1][1]

    def largest_core(self, limit: float) -> int | None:
        """The largest core that cuts the last stage into tiles and fits `limit`."""
        shape, stride = self.shape(), self.halo.stride
        cfg = dataclasses.replace(self.cfg)
        for core in range(geometry.round_up(max(shape), stride), 0, -stride):
            cfg.tile = core
            if geometry.stage_core(cfg, shape) and self.run(core).peak_bytes <= limit:
                return core
        return None

    def splits(self, core: int) -> bool:
        return geometry.stage_core(dataclasses.replace(self.cfg, tile=core), self.shape()) \
            is not None
