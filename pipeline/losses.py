"""The objective of Gatys et al., as pinned in DESIGN.md, in keras.ops only.

Where it departs from the paper: every term is a mean, not a sum, so weights mean the same
at every image size; the Gram matrix is divided by the number of positions; several style
images blend by a weighted sum of their Gram matrices. Style layers weigh 1 / C_l^2 each
unless set (config.style_weights): neural-style's Gram normalisation by C*H*W.

Masks (spatial control, after Gatys et al. 2017, "Controlling Perceptual Factors in Neural
Style Transfer"): a style with a mask matches its own Gram matrix on the masked region of
the generated image only. The mask is average-pooled 2x2 as the network pools, so it has
each layer's resolution, and multiplies the features before the Gram matrix, as the paper's
guidance channels do. Departures: the guided Gram is divided by sum(m^2), the weighted count
of the region's positions (for a 0/1 mask, its number of positions), so it is the region's
mean and compares with the whole style image's Gram at any region size; the paper keeps the
ordinary normalisation and takes its target from a matching region of the style image, here
it is the whole style image. Masked styles are not blended: each matches its own region, and
the blend weights weigh the styles' terms.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from pipeline.config import normalised, style_weights
from pipeline.model import preprocess


def gram(features):
    """G = F^T F / (H W) for a batch of feature maps (B, H, W, C) -> (B, C, C)."""
    _, h, w, _ = features.shape
    return ops.einsum("bhwc,bhwd->bcd", features, features) / (h * w)


def masked_gram(features, mask):
    """(F m)^T (F m) / sum(m^2) for features (B, H, W, C) and a mask (H, W) at their
    resolution: the Gram matrix of the masked region (see the module's note)."""
    fm = features * mask[None, :, :, None]
    return ops.einsum("bhwc,bhwd->bcd", fm, fm) / ops.maximum(ops.sum(mask * mask), 1e-12)


def content_loss(features, target):
    return ops.mean(ops.square(features - target))


def masked_content_loss(features, target, mask):
    """The content term on the masked region: sum(m (F - P)^2) / (sum(m) C), a weighted mean
    that equals content_loss when m is 1 everywhere."""
    channels = features.shape[-1]
    weighted = ops.sum(ops.square(features - target) * mask[None, :, :, None])
    return weighted / (ops.maximum(ops.sum(mask), 1e-12) * channels)


def downsample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (H, W) mask average-pooled 2x2 (stride 2, odd edges dropped, as VGG's pooling does)
    until it has `shape`, a layer's resolution."""
    m = np.asarray(mask, dtype=np.float32)
    while m.shape != tuple(shape):
        h, w = m.shape
        if h // 2 < shape[0] or w // 2 < shape[1]:
            raise ValueError(f"a {w}x{h} mask cannot be pooled to {shape[1]}x{shape[0]}")
        m = m[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return m


def style_loss(gram_x, target_gram):
    return ops.mean(ops.square(gram_x - target_gram))


def total_variation(x):
    """Mean squared difference of vertical and of horizontal neighbours, (H, W, 3) pixels."""
    return ops.mean(ops.square(x[1:, :, :] - x[:-1, :, :])) + ops.mean(
        ops.square(x[:, 1:, :] - x[:, :-1, :])
    )


def temporal_loss(x, warped, weights):
    """Ruder et al.'s temporal term: sum over pixels of c (x - w)^2 / D, for the generated image
    x (H, W, 3), previous stylised frames warped onto it w (H, W, 3) or (K, H, W, 3), their
    consistency weights c (H, W) or (K, H, W), and D = H W 3 the number of values (a mean, as
    his MSE is). The weights are per pixel, broadcast over the channels, and multiply each
    squared difference before the sum. (cysmith/neural-style-tf's video mode calls
    tf.nn.l2_loss(x - w), which sums to one number first, so its mask scales the whole term.)
    With K frames (long-term constraints) their terms add up, as Ruder's one loss per frame."""
    d = ops.square(x - warped) * weights[..., None]
    return ops.sum(d) / (x.shape[0] * x.shape[1] * x.shape[2])


def weighted_layers(cfg) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The content and the style layers, each with its normalised weight."""
    m = cfg.model
    return (list(zip(m.content_layers, normalised(m.content_layer_weights,
                                                  len(m.content_layers)))),
            list(zip(m.style_layers, normalised(style_weights(m), len(m.style_layers)))))


class Objective:
    """The loss of a generated image against targets computed once, at construction.

    Calling it runs VGG19 on the generated image alone: the content features and style
    Gram matrices are constants of the run, so they are not recomputed per evaluation.
    Returns (total, terms), the terms unweighted: content, style and tv (and temporal, for a
    video frame).
    """

    terms = ("content", "style", "tv")  # the keys of the terms, in this order

    def __init__(self, extractor, layer_names, cfg, content, styles, style_masks=None,
                 content_mask=None, temporal=None):
        """content (H, W, 3) and styles [(h, w, 3), ...] are RGB arrays in 0..255; masks are
        (H, W) arrays in 0..1 at the content's shape: one per style (None: everywhere), or
        style_masks None for the blended objective. temporal, for a frame of a video: (warped,
        weights, temporal_weight) as temporal_loss takes them, at the content's shape; it adds
        the term `temporal` (None: the objective is an image's, unchanged)."""
        self.extractor = extractor
        self.index = {name: i for i, name in enumerate(layer_names)}
        loss = cfg.loss
        self.content_layers, self.style_layers = weighted_layers(cfg)
        self.weights = (loss.content_weight, loss.style_weight, loss.tv_weight)
        # The targets: a handful of VGG19 passes, each image once (images of one shape together).
        content_features, *style_features = self._features([content, *styles])
        self.content_targets = {n: content_features[self.index[n]] for n, _ in self.content_layers}
        blend = normalised(cfg.style_blend, len(styles))
        self.style_targets = {
            name: sum(b * gram(f[self.index[name]]) for b, f in zip(blend, style_features))
            for name, _ in self.style_layers
        }
        # Masks at each layer's resolution, constants like the targets.
        shapes = {n: tuple(content_features[i].shape[1:3]) for n, i in self.index.items()}

        def pooled(mask, names):
            return {n: ops.convert_to_tensor(downsample_mask(mask, shapes[n])) for n in names}

        self.content_masks = None
        if content_mask is not None:
            self.content_masks = pooled(content_mask, [n for n, _ in self.content_layers])
        self.regions = None  # with style masks: [(blend weight, {layer: (mask, target)})]
        if style_masks is not None:
            style_names = [n for n, _ in self.style_layers]
            self.regions = []
            for b, f, m in zip(blend, style_features, style_masks):
                masks = {} if m is None else pooled(m, style_names)
                self.regions.append((b, {n: (masks.get(n), gram(f[self.index[n]]))
                                         for n in style_names}))
        self.temporal = None
        if temporal is not None:
            warped, weights, temporal_weight = temporal
            self.temporal = (ops.convert_to_tensor(np.asarray(warped, "float32")),
                             ops.convert_to_tensor(np.asarray(weights, "float32")),
                             float(temporal_weight))
            self.terms = (*Objective.terms, "temporal")

    def _features(self, images):
        """Per image, the list of its feature maps (each (1, h, w, c)), batching equal shapes."""
        out = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            batch = np.stack([images[i] for i in indices]).astype("float32")
            maps = self._maps(ops.convert_to_tensor(batch))
            for j, i in enumerate(indices):
                out[i] = [ops.convert_to_tensor(f[j : j + 1]) for f in maps]
        return out

    def _maps(self, batch):
        """The feature maps of a batch of pixel images, in float32 whatever precision the
        network computes in (model.precision): Gram matrices and losses stay float32."""
        return [ops.cast(f, "float32") for f in self.extractor(preprocess(batch))]

    @property
    def inputs(self) -> dict:
        """The targets as arrays, as __call__ takes them: what differs between two objectives
        of one run's settings, network and shapes (a clip's frames: their content and
        temporal targets; the style ones, which histogram colours change per frame). A
        function compiled with them as arguments serves every such objective (autodiff.Shared)."""
        out = {"content": dict(self.content_targets), "style": dict(self.style_targets)}
        if self.regions is not None:
            out["regions"] = [{n: target for n, (_, target) in layers.items()}
                              for _, layers in self.regions]
        if self.temporal is not None:
            out["temporal"] = list(self.temporal[:2])
        return out

    def __call__(self, x, inputs=None):
        """x: the generated image, (H, W, 3) pixels in 0..255, a backend tensor. `inputs`:
        the targets to use (another objective's `inputs`, of the same structure and shapes);
        None: this objective's own, constants."""
        inputs = self.inputs if inputs is None else inputs
        maps = self._maps(x[None])
        content = sum(w * self._content(maps[self.index[n]], n, inputs["content"][n])
                      for n, w in self.content_layers)
        style = sum(w * self._style(maps[self.index[n]], n, inputs)
                    for n, w in self.style_layers)
        tv = total_variation(x)
        cw, sw, tw = self.weights
        total = cw * content + sw * style + tw * tv
        terms = {"content": content, "style": style, "tv": tv}
        if self.temporal is not None:
            warped, weights = inputs["temporal"]
            terms["temporal"] = temporal_loss(x, warped, weights)
            total = total + self.temporal[2] * terms["temporal"]
        return total, terms

    def _content(self, features, name, target):
        if self.content_masks is None:
            return content_loss(features, target)
        return masked_content_loss(features, target, self.content_masks[name])

    def _style(self, features, name, inputs):
        if self.regions is None:
            return style_loss(gram(features), inputs["style"][name])
        whole = None  # the ordinary Gram, computed once for all unmasked styles
        loss = 0.0
        for (b, layers), targets in zip(self.regions, inputs["regions"]):
            mask, target = layers[name][0], targets[name]
            if mask is None:
                whole = gram(features) if whole is None else whole
                loss = loss + b * style_loss(whole, target)
            else:
                loss = loss + b * style_loss(masked_gram(features, mask), target)
        return loss
