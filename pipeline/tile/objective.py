"""losses.Objective's objective and gradient, computed tile by tile in bounded memory (the
package's docstring says why it is exact): a ValueAndGrad like autodiff.value_and_grad's, and
the network run on one window at a time, which also gives the targets, since at print sizes
the content and style images do not fit through the network whole either."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from pipeline import autodiff
from pipeline.config import normalised
from pipeline.losses import downsample_mask, temporal_loss, total_variation, weighted_layers
from pipeline.model import preprocess
from pipeline.tile.geometry import (
    KERNEL,
    POOL,
    Frame,
    Tile,
    core_range,
    halo,
    keep_range,
    receptive_fields,
    tiling,
)


def _stop(stop, start):
    return None if stop is None else stop - start


def _crop(y, r0, r1, c0, c1):
    """y[:, r0:r1, c0:c1, :] (None: to the end) as a slice of static size, whose gradient is
    a pad (TensorFlow's strided slice has a slower gradient of its own)."""
    _, rows, cols, channels = y.shape
    r1, c1 = min(rows, rows if r1 is None else r1), min(cols, cols if c1 is None else c1)
    if (r0, r1, c0, c1) == (0, rows, 0, cols):
        return y
    return ops.slice(y, (0, r0, c0, 0), (y.shape[0], r1 - r0, c1 - c0, channels))


def _raw_gram(features):
    """F^T F summed over the positions of (1, h, w, C) features: a tile's share of a Gram
    matrix before the whole image's normalisation."""
    return ops.einsum("bhwc,bhwd->cd", features, features)


class TileNetwork:
    """The extractor's layers (model.feature_extractor) run on one window at a time.

    Each convolution's output is cropped to what the deeper layers still need of it
    (geometry.keep_range), so the work shrinks towards the core layer by layer instead of
    running the whole window through every layer; features are handed out cropped to the
    tile's core. Compiled functions are made once per window frame (a handful per image).
    """

    def __init__(self, extractor, network: str):
        self.layers = [la for la in extractor.layers
                       if not isinstance(la, keras.layers.InputLayer)]
        self.variables = extractor.variables
        self.fields = receptive_fields(network)
        for layer in self.layers:  # the architecture geometry.py computes fields for
            conv = isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (
                KERNEL, KERNEL) and layer.strides == (1, 1) and layer.padding == "same"
            pool = isinstance(layer, (keras.layers.AveragePooling2D, keras.layers.MaxPooling2D)
                              ) and layer.pool_size == (POOL, POOL) and layer.strides == (
                POOL, POOL) and layer.padding == "valid"
            if not (conv and layer.name in self.fields or pool):
                raise ValueError(f"layer {layer.name} is not one of {network}'s {KERNEL}x{KERNEL}"
                                 f" 'same' convolutions or {POOL}x{POOL} poolings")
        convs = [la.name for la in self.layers if la.name in self.fields]
        self.halo = halo(network, convs)
        self.deepest = self.fields[convs[-1]]
        self._compiled: dict = {}

    # ---------------------------------------------------------------- in keras.ops, traced

    def features(self, x, frames: tuple[Frame, Frame], outputs) -> list:
        """The core's float32 features at the conv layers `outputs`, in that order, for the
        window's pixels x (h, w, 3) in 0..255: each (1, core rows, core columns, C)."""
        rows, cols = frames
        y = preprocess(x[None])
        at = (0, 0)  # y's first row and column, relative to the window, at y's stride
        found = {}
        for layer in self.layers:
            y = layer(y)
            field = self.fields.get(layer.name)
            if field is None:  # a pooling: pairs of positions, from `at` (even) on
                at = (at[0] // POOL, at[1] // POOL)
                continue
            (r0, r1), (c0, c1) = keep_range(rows, field, self.deepest), keep_range(
                cols, field, self.deepest)
            y = _crop(y, r0 - at[0], _stop(r1, at[0]), c0 - at[1], _stop(c1, at[1]))
            at = (r0, c0)
            if layer.name in outputs:
                (a0, a1), (b0, b1) = core_range(rows, field), core_range(cols, field)
                found[layer.name] = ops.cast(
                    _crop(y, a0 - r0, _stop(a1, r0), b0 - c0, _stop(b1, c0)), "float32")
        return [found[n] for n in outputs]

    # ---------------------------------------------------------------- on the host

    def tiles(self, shape, core: int) -> list[tuple[Tile, tuple[Frame, Frame]]]:
        """The tiles of an image of `shape` (H, W), each with its frames (what its compiled
        functions depend on). Raises ValueError for a core that is not a positive multiple of
        the deepest layer's stride."""
        return [(t, (Frame.of(t.rows, shape[0]), Frame.of(t.cols, shape[1])))
                for t in tiling(tuple(shape[:2]), core, self.halo)]

    def cached(self, key, build):
        """A compiled function, made by build() the first time `key` is asked for."""
        if key not in self._compiled:
            autodiff.many_functions()  # one per window frame, each traced once: by design
            self._compiled[key] = build()
        return self._compiled[key]

    def layer_shape(self, shape, name: str) -> tuple[int, int]:
        """A layer's (rows, columns) for a whole image of `shape`: each pooling floors."""
        stride = self.fields[name].stride
        return shape[0] // stride, shape[1] // stride

    def targets(self, image: np.ndarray, core: int, features=(), grams=()):
        """The whole image's features at the conv layers `features`, (rows, columns, C)
        float32 each, assembled from the tiles' cores, and its Gram matrices
        F^T F / (H_l W_l) at the layers `grams`, float64, summed from the cores' shares: what
        the network gives for the whole image. Two dicts by layer name."""
        features, grams = tuple(features), tuple(grams)
        maps, sums = {}, {n: 0.0 for n in grams}
        for tile, frames in self.tiles(image.shape, core):
            run = self.cached(("targets", frames, features, grams), lambda frames=frames: (
                autodiff.once(lambda x: self._targets(x, frames, features, grams),
                              self.variables)))
            parts, shares = run(ops.convert_to_tensor(window(image, tile)))
            for name, part in zip(features, parts):
                part = ops.convert_to_numpy(part)[0]
                if name not in maps:
                    maps[name] = np.zeros((*self.layer_shape(image.shape, name), part.shape[-1]),
                                          np.float32)
                maps[name][core_slices(tile, self.fields[name].stride)] = part
            for name, share in zip(grams, shares):
                sums[name] = sums[name] + ops.convert_to_numpy(share).astype(np.float64)
        return maps, {n: sums[n] / np.prod(self.layer_shape(image.shape, n)) for n in grams}

    def _targets(self, x, frames, features, grams):
        found = dict(zip(features + grams, self.features(x, frames, features + grams)))
        return [found[n] for n in features], [_raw_gram(found[n]) for n in grams]


def window(image: np.ndarray, tile: Tile) -> np.ndarray:
    """A tile's window of an (H, W, ...) array."""
    return image[tile.rows.start:tile.rows.stop, tile.cols.start:tile.cols.stop]


def core_slices(tile: Tile, stride: int) -> tuple[slice, slice]:
    """A tile's core in the whole feature map of a layer with `stride` (floored at the end,
    as the network floors)."""
    return (slice(tile.rows.core_start // stride, tile.rows.core_stop // stride),
            slice(tile.cols.core_start // stride, tile.cols.core_stop // stride))


class TiledValueAndGrad:
    """An autodiff.ValueAndGrad of losses.Objective's objective for the same arguments,
    computed tile by tile with cores of `core` px a side: (pixels (H, W, 3) float32) ->
    (total, {term: value}, gradient (H, W, 3) float32).

    Each evaluation makes two passes over the tiles. Pass 1, forward only: every tile adds its
    core's share to each style layer's Gram matrices (F^T F, and (F m)^T (F m) for a masked
    style) and to each content layer's sum of squared differences; the Grams are then whole,
    so the loss is known, and so is dL/dG = 2 (G - A) / C^2 (times the weights) for each.
    Pass 2, forward and backward: every tile's share, <F^T F, dL/dG / N> summed over its
    Grams plus its content sums, has the whole objective's gradient through that tile's core
    features, since the loss depends on them only through those sums; its pixel gradient is
    added into the window's place (overlapping halos add up). TV (and a video frame's temporal
    term) needs no network: it is computed on the whole image.
    """

    terms = ("content", "style", "tv")  # and "temporal" for a video frame, as Objective's
    on_host = True  # a value-and-gradient already, not a keras.ops objective to compile

    def __init__(self, extractor, layer_names, cfg, content, styles, core: int,
                 style_masks=None, content_mask=None, temporal=None):
        """As losses.Objective, plus `core`: the side of a tile's core in pixels."""
        self.net = TileNetwork(extractor, cfg.model.network)
        self.shape = tuple(content.shape[:2])
        self.core = core
        self.tiles = self.net.tiles(self.shape, core)
        self.content_layers, self.style_layers = weighted_layers(cfg)
        loss = cfg.loss
        self.weights = (loss.content_weight, loss.style_weight, loss.tv_weight)
        self.names = [n for n in layer_names
                      if n in {*(n for n, _ in self.content_layers),
                               *(n for n, _ in self.style_layers)}]
        # The targets, tile by tile like everything else.
        content_names = [n for n, _ in self.content_layers]
        style_names = [n for n, _ in self.style_layers]
        targets, _ = self.net.targets(np.asarray(content, np.float32), core, content_names)
        grams = [self.net.targets(np.asarray(s, np.float32), core, grams=style_names)[1]
                 for s in styles]
        blend = normalised(cfg.style_blend, len(styles))

        # Per style layer, the weightings of its Gram matrices (None: plain; else a mask at
        # the layer's resolution), their normalisers, and the groups (weighting, blend
        # weight, target) compared: one for the blended objective, one per style with masks.
        self.weightings, self.norms, self.groups = {}, {}, {}
        for name in style_names:
            rows, cols = self.net.layer_shape(self.shape, name)
            if style_masks is None:
                weightings = [None]
                groups = [(0, 1.0, sum(b * g[name] for b, g in zip(blend, grams)))]
            else:
                weightings, groups, plain = [], [], None
                for b, g, mask in zip(blend, grams, style_masks):
                    if mask is None:
                        if plain is None:  # the plain Gram, once for all unmasked styles
                            plain = len(weightings)
                            weightings.append(None)
                        groups.append((plain, b, g[name]))
                    else:
                        weightings.append(downsample_mask(mask, (rows, cols)))
                        groups.append((len(weightings) - 1, b, g[name]))
            self.weightings[name], self.groups[name] = weightings, groups
            self.norms[name] = [rows * cols if w is None else max(float(np.sum(
                np.square(w, dtype=np.float64))), 1e-12) for w in weightings]
        # Per content layer: its target, mask (None: everywhere) and the mean's denominator.
        self.contents = []
        for name in content_names:
            target = targets[name]
            mask = None if content_mask is None else downsample_mask(content_mask,
                                                                       target.shape[:2])
            count = target.shape[0] * target.shape[1] if mask is None else max(
                float(np.sum(mask, dtype=np.float64)), 1e-12)
            self.contents.append((name, target, mask, count * target.shape[-1]))
        # Each tile's constants: its core's crops of the masks and content targets.
        self.constants = [self._constants(tile) for tile, _ in self.tiles]
        # The terms of the pixels alone, on the whole image.
        self.temporal = ()
        if temporal is not None:
            warped, weights, self.temporal_weight = temporal
            self.temporal = (np.asarray(warped, np.float32), np.asarray(weights, np.float32))
            self.terms = (*TiledValueAndGrad.terms, "temporal")
        self._pixel_terms = autodiff.gradient(self._on_pixels, [])

    def _constants(self, tile: Tile):
        def crop(a, name):
            return a[core_slices(tile, self.net.fields[name].stride)]

        masks = [crop(w, name) for name in self.weightings for w in self.weightings[name]
                 if w is not None]
        targets = [crop(t, name) for name, t, _, _ in self.contents]
        content_masks = [crop(m, name) for name, _, m, _ in self.contents if m is not None]
        return masks, targets, content_masks

    # ---------------------------------------------------------------- in keras.ops, traced

    def _on_pixels(self, x, *temporal):
        """TV (and the temporal term, given the warped frames and their weights), weighted,
        and each unweighted: the terms that need no network."""
        terms = {"tv": total_variation(x)}
        value = self.weights[2] * terms["tv"]
        if temporal:
            terms["temporal"] = temporal_loss(x, *temporal)
            value = value + self.temporal_weight * terms["temporal"]
        return value, terms

    def _sums(self, x, frames, masks, targets, content_masks):
        """A tile's shares: its raw Gram matrices, in the order of self.weightings, and its
        content sums sum(m (F - P)^2), in the order of self.contents."""
        maps = dict(zip(self.names, self.net.features(x, frames, self.names)))
        grams, k = [], 0
        for name, weightings in self.weightings.items():
            for w in weightings:
                f = maps[name]
                if w is not None:
                    f = f * masks[k][None, :, :, None]
                    k += 1
                grams.append(_raw_gram(f))
        sums = []
        for i, (name, _, mask, _) in enumerate(self.contents):
            square = ops.square(maps[name] - targets[i][None])
            if mask is not None:
                square = square * content_masks[i][None, :, :, None]
            sums.append(ops.sum(square))
        return grams, sums

    def _share(self, x, frames, masks, targets, content_masks, slopes, coefficients):
        """The tile's share of the objective, whose gradient is the whole objective's through
        this tile's core features: the Grams' shares against dL/dG (constants here), the
        content sums against their weights."""
        grams, sums = self._sums(x, frames, masks, targets, content_masks)
        value = sum(ops.sum(g * s) for g, s in zip(grams, slopes))
        value = value + sum(s * coefficients[i] for i, s in enumerate(sums))
        return value, ()

    # ---------------------------------------------------------------- on the host

    def _compiled(self, kind: str, frames):
        if kind == "sums":
            return self.net.cached(("sums", frames), lambda: autodiff.function(
                lambda x, *c: self._sums(x, frames, *c), self.net.variables))
        return self.net.cached(("share", frames), lambda: autodiff.gradient(
            lambda x, *c: self._share(x, frames, *c), self.net.variables))

    def __call__(self, x: np.ndarray) -> tuple[float, dict, np.ndarray]:
        x = np.asarray(x, np.float32)
        cw, sw, _ = self.weights
        # Pass 1: the Grams and content sums of the whole image, as sums of the cores' shares.
        grams, sums = None, None
        for (tile, frames), constants in zip(self.tiles, self.constants):
            g, s = self._compiled("sums", frames)(window(x, tile), *constants)
            g = [ops.convert_to_numpy(a).astype(np.float64) for a in g]
            s = [float(ops.convert_to_numpy(a)) for a in s]
            grams = g if grams is None else [a + b for a, b in zip(grams, g)]
            sums = s if sums is None else [a + b for a, b in zip(sums, s)]
        # The loss, and its slopes: dL/dG / N for each Gram's raw sum, per content sum.
        style, slopes, k = 0.0, [], 0
        for name, weight in self.style_layers:
            count = len(self.weightings[name])
            layer_grams = [grams[k + i] / self.norms[name][i] for i in range(count)]
            k += count
            channels = layer_grams[0].shape[0]
            layer_slopes = [np.zeros_like(g) for g in layer_grams]
            for i, blend, target in self.groups[name]:
                diff = layer_grams[i] - target
                style += weight * blend * np.mean(np.square(diff))
                layer_slopes[i] += sw * weight * blend * 2 * diff / channels ** 2
            slopes += [s / n for s, n in zip(layer_slopes, self.norms[name])]
        weights = dict(self.content_layers)
        content = sum(weights[name] * s / d for (name, _, _, d), s in zip(self.contents, sums))
        coefficients = np.array([cw * weights[name] / d for name, _, _, d in self.contents],
                                np.float32)
        pixels, on_pixels, grad = self._pixel_terms(x, *self.temporal)
        terms = {"content": float(content), "style": float(style),
                 **{k: float(v) for k, v in on_pixels.items()}}
        total = cw * terms["content"] + sw * terms["style"] + float(pixels)
        # Pass 2: each tile's share differentiated, added into its window.
        grad = np.array(ops.convert_to_numpy(grad), np.float32)
        slopes = [s.astype(np.float32) for s in slopes]
        for (tile, frames), constants in zip(self.tiles, self.constants):
            _, _, g = self._compiled("share", frames)(window(x, tile), *constants, slopes,
                                                      coefficients)
            window(grad, tile)[...] += ops.convert_to_numpy(g)
        return float(total), terms, grad
