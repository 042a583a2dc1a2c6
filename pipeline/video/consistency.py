"""Where a flow can be trusted: Ruder et al.'s forward-backward check, and their closest-first
weights for long-term constraints. A port of manuelruder/artistic-videos'
consistencyChecker/consistencyChecker.cpp and of processFlowWeights in artistic_video.lua.

For frame i and an earlier frame j, the backward flow w^ (from i to j) is checked against the
forward flow w~ (from j to i) sampled where w^ lands, as makeOptFlow.sh runs the checker
(`consistencyChecker backward_i_j.flo forward_j_i.flo reliable_i_j.pgm`). At a pixel x of i:
- outside: x + w^(x) falls outside frame j (its bilinear cell must lie inside) -> 0;
- disoccluded: |w^(x) + w~(x + w^(x))|^2 >= 0.01 (|w^|^2 + |w~|^2) + 0.5: going to j and back
  does not return to x, so x was hidden in j -> -1 (negative so that the smoothing below
  spreads it outwards);
- motion boundary: |grad u|^2 + |grad v|^2 > 0.01 |w^|^2 + 0.002, with (u, v) = w^ and the
  gradients central differences [-1/2, 0, 1/2] (edges mirrored) -> 0;
- otherwise 1.
The first rule that holds wins, in that order. Then, as Ruder's checker does, the map is
smoothed by a Gaussian of sigma 0.8 (5 taps, edges mirrored) and clipped to 0..1, so weights
fall off softly around the excluded regions; smooth=0 keeps the hard {0, 1} weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.video.flow import sample

SMOOTH_SIGMA = 0.8  # SMOOTH_STRENGH in consistencyChecker.cpp; its filter reaches 2 sigma


def marks(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """The check before smoothing, (H, W) float32: 1 reliable, 0 outside or motion boundary,
    -1 disoccluded (see the module's note)."""
    h, w = backward.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = backward[..., 0], backward[..., 1]
    bx, by = xs + u, ys + v
    x1, y1 = np.floor(bx), np.floor(by)
    inside = (x1 >= 0) & (x1 + 1 < w) & (y1 >= 0) & (y1 + 1 < h)
    back = sample(forward, bx, by)  # w~ where w^ lands
    fu, fv = back[..., 0], back[..., 1]
    round_trip = (u + fu) ** 2 + (v + fv) ** 2
    disoccluded = round_trip >= 0.01 * (u * u + v * v + fu * fu + fv * fv) + 0.5
    boundary = _gradient_energy(backward) > 0.01 * (u * u + v * v) + 0.002
    out = np.ones((h, w), np.float32)
    out[boundary] = 0.0
    out[disoccluded] = -1.0
    out[~inside] = 0.0
    return out


def reliable(backward: np.ndarray, forward: np.ndarray, smooth: float = SMOOTH_SIGMA):
    """Ruder's consistency weights for frame i, (H, W) float32 in 0..1 (his reliable_i_j.pgm
    over 255): where the stylised frame j warped by `backward` may be held to."""
    weights = marks(backward, forward)
    if smooth > 0:
        weights = _smooth(weights, smooth)
    return np.clip(weights, 0.0, 1.0).astype(np.float32)


def closest_first(weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Long-term weights, `weights` ordered from the closest previous frame (i-1) to the
    farthest: each frame counts only where the closer ones leave room, c_k = max(0, w_k -
    sum of the c of closer frames) (Ruder's closestFirst: it subtracts the already reduced
    weights of every closer frame, then clips at 0)."""
    out: list[np.ndarray] = []
    for w in weights:
        w = np.asarray(w, np.float32)
        out.append(np.maximum(w - sum(out), 0.0).astype(np.float32) if out else w)
    return out


def _gradient_energy(flow: np.ndarray) -> np.ndarray:
    """|grad u|^2 + |grad v|^2 by central differences, edges mirrored (Brox's CDerivative(3)
    through NFilter::filter)."""
    padded = np.pad(flow, ((1, 1), (1, 1), (0, 0)), mode="symmetric")
    dx = (padded[1:-1, 2:] - padded[1:-1, :-2]) / 2
    dy = (padded[2:, 1:-1] - padded[:-2, 1:-1]) / 2
    return (dx * dx + dy * dy).sum(axis=-1)


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Brox's CSmooth(sigma, 2): a normalised Gaussian of radius ceil(2 sigma), applied along x
    then y, edges mirrored."""
    radius = int(np.ceil(2.0 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma * sigma))
    taps /= taps.sum()
    out = image.astype(np.float64)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(t * np.take(padded, np.arange(k, k + n), axis=axis) for k, t in enumerate(taps))
    return out.astype(np.float32)
