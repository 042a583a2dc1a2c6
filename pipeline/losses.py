"""The objective of Gatys et al., as pinned in DESIGN.md, in keras.ops only.

Where it departs from the paper: every term is a mean, not a sum, so weights mean the same
at every image size; the Gram matrix is divided by the number of positions; several style
images blend by a weighted sum of their Gram matrices.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from pipeline.model import preprocess


def gram(features):
    """G = F^T F / (H W) for a batch of feature maps (B, H, W, C) -> (B, C, C)."""
    _, h, w, _ = features.shape
    return ops.einsum("bhwc,bhwd->bcd", features, features) / (h * w)


def content_loss(features, target):
    return ops.mean(ops.square(features - target))


def style_loss(gram_x, target_gram):
    return ops.mean(ops.square(gram_x - target_gram))


def total_variation(x):
    """Mean squared difference of vertical and of horizontal neighbours, (H, W, 3) pixels."""
    return ops.mean(ops.square(x[1:, :, :] - x[:-1, :, :])) + ops.mean(
        ops.square(x[:, 1:, :] - x[:, :-1, :])
    )


def normalised(weights, count: int) -> list[float]:
    """Layer or blend weights scaled to sum to 1 (equal when None)."""
    w = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
    return list(w / w.sum())


class Objective:
    """The loss of a generated image against targets computed once, at construction.

    Calling it runs VGG19 on the generated image alone: the content features and style
    Gram matrices are constants of the run, so they are not recomputed per evaluation.
    Returns (total, terms), the terms unweighted: content, style and tv.
    """

    def __init__(self, extractor, layer_names, cfg, content, styles):
        """content (H, W, 3) and styles [(h, w, 3), ...] are RGB arrays in 0..255."""
        self.extractor = extractor
        self.index = {name: i for i, name in enumerate(layer_names)}
        m, loss = cfg.model, cfg.loss
        self.content_layers = list(zip(m.content_layers,
                                       normalised(m.content_layer_weights, len(m.content_layers))))
        self.style_layers = list(zip(m.style_layers,
                                     normalised(m.style_layer_weights, len(m.style_layers))))
        self.weights = (loss.content_weight, loss.style_weight, loss.tv_weight)
        # The targets: a handful of VGG19 passes, each image once (images of one shape together).
        content_features, *style_features = self._features([content, *styles])
        self.content_targets = {n: content_features[self.index[n]] for n, _ in self.content_layers}
        blend = normalised(cfg.style_blend, len(styles))
        self.style_targets = {
            name: sum(b * gram(f[self.index[name]]) for b, f in zip(blend, style_features))
            for name, _ in self.style_layers
        }

    def _features(self, images):
        """Per image, the list of its feature maps (each (1, h, w, c)), batching equal shapes."""
        out = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            batch = np.stack([images[i] for i in indices]).astype("float32")
            maps = self.extractor(preprocess(ops.convert_to_tensor(batch)))
            for j, i in enumerate(indices):
                out[i] = [ops.convert_to_tensor(f[j : j + 1]) for f in maps]
        return out

    def __call__(self, x):
        """x: the generated image, (H, W, 3) pixels in 0..255, a backend tensor."""
        maps = self.extractor(preprocess(x[None]))
        content = sum(w * content_loss(maps[self.index[n]], self.content_targets[n])
                      for n, w in self.content_layers)
        style = sum(w * style_loss(gram(maps[self.index[n]]), self.style_targets[n])
                    for n, w in self.style_layers)
        tv = total_variation(x)
        cw, sw, tw = self.weights
        total = cw * content + sw * style + tw * tv
        return total, {"content": content, "style": style, "tv": tv}
