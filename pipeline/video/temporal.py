"""What a frame's temporal term needs, the flicker metric, and Ruder's temporal weight.

Ruder's weights, converted into this tool's objective (DESIGN.md: means, Gram / (H W), layer
weights normalised), from artistic_video.lua and artistic_video_core.lua (their defaults):
- content: 5 on nn.MSECriterion of relu4_2 features, a mean as here: content_weight 5.
- style: 1e2 per layer (relu1_1 .. relu5_1) on the MSE of Gram matrices divided by C*H*W,
  ours divided by H*W: jcjohnson/neural-style's, which his code is; converted as the default
  objective is (config.LossConfig): layer weights 1 / C_l^2 (64:16:4:1:1) and style_weight
  1e2 * (1/64^2 + 1/128^2 + 1/256^2 + 2/512^2) = 1e2 * 86 / 512^2 ~ 0.0328.
- temporal: 1e3 on nn.MSECriterion(sqrt(c) x, sqrt(c) w) (WeightedContentLoss, at the
  network's input, before any layer), a mean over the 3 H W values of c (x - w)^2: the same
  D as here. His x and w are preprocessed pixels, 0..1 images times 256 minus the mean
  colour; the mean cancels in x - w, the scale does not: 256/255 of ours. So his term is
  (256/255)^2 of ours, and temporal_weight = 1e3 * (256/255)^2 ~ 1007.86. Exact: a term of
  pixels alone has nothing for VGG's biases to break (content and style carry the 0..256
  scale over only approximately; the neural-style recipe says so).
- long-term frames (Ruder's -flow_relative_indices 1,2,4) each add their own term with the
  same weight: temporal_loss sums over them.
- tv: 1e-3, neural-style's TVLoss: as in configs/recipes/neural-style.yaml (395.532 at a square
  512 x 512 frame; its sum grows with the pixel count).
- his iterations: 2000 for the first frame, 1000 for each later one (L-BFGS, stopping early
  when the loss changes by less than 1e-4 relative over 50 iterations); init: random noise
  for the first frame, prevWarped for later ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.video.consistency import closest_first
from pipeline.video.flow import warp

RUDER_TEMPORAL_WEIGHT = 1e3 * (256 / 255) ** 2


def targets(previous: Sequence[np.ndarray], backward: Sequence[np.ndarray],
            reliable: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The temporal term's (warped, weights) for frame i, from its previous stylised frames
    (closest first: i-1, then i-2, ... as long_term lists them), the backward flows from i to
    each, and each flow's consistency weights: the frames warped onto i, stacked (K, H, W, 3),
    and closest-first weights (K, H, W) (consistency.closest_first)."""
    warped = np.stack([warp(p, f)[0] for p, f in zip(previous, backward)]).astype(np.float32)
    return warped, np.stack(closest_first(reliable)).astype(np.float32)


def warping_error(frame: np.ndarray, previous: np.ndarray, backward: np.ndarray,
                  weights: np.ndarray) -> float:
    """Flicker: mean |x_t - warp(x_{t-1})| over consistent pixels, in grey levels (0..255): a
    weighted mean over pixels and channels, each pixel weighing its consistency weight. The
    flow and weights come from the content frames, so a stylisation that follows the motion
    scores low and one that changes where nothing moved scores high."""
    warped, _ = warp(previous, backward)
    c = np.asarray(weights, np.float64)[..., None]
    total = c.sum() * frame.shape[-1]
    if total <= 0:
        return float("nan")  # no pixel can be compared: a cut, or the flow failed everywhere
    return float((c * np.abs(frame.astype(np.float64) - warped)).sum() / total)
