"""Colour preservation, after Gatys, Bethge, Hertzmann and Shechtman, "Preserving Color in
Neural Artistic Style Transfer" (2016): luminance-only transfer and colour histogram
matching. Pure numpy on (H, W, 3) RGB arrays in 0..255; nothing here clips, callers do.
"""

from __future__ import annotations

import numpy as np

# YIQ (NTSC), the space the paper uses. Its I and Q rows sum to zero, so the inverse's first
# column is exactly (1, 1, 1): a change of Y alone adds the same amount to R, G and B. YUV and
# YCbCr share this Y (BT.601 luma) and that property, so they would give the same pixels.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                       [0.596, -0.274, -0.322],
                       [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


def rgb_to_yiq(img: np.ndarray) -> np.ndarray:
    return np.asarray(img, np.float64) @ RGB_TO_YIQ.T


def yiq_to_rgb(img: np.ndarray) -> np.ndarray:
    return np.asarray(img, np.float64) @ YIQ_TO_RGB.T


def luminance(img: np.ndarray) -> np.ndarray:
    """Y of an RGB image, (H, W)."""
    return rgb_to_yiq(img)[..., 0]


def match_luminance(style_y: np.ndarray, content_y: np.ndarray) -> np.ndarray:
    """The paper's luminance matching: the style's luminance shifted and scaled to the mean
    and standard deviation of the content's, so the style brings texture, not a brightness."""
    spread = style_y.std()
    scale = content_y.std() / spread if spread > 0 else 1.0  # a flat style stays flat
    return (style_y - style_y.mean()) * scale + content_y.mean()


def grey(y: np.ndarray) -> np.ndarray:
    """A luminance (H, W) as an RGB image (Y, Y, Y): how VGG sees a luminance channel."""
    return np.repeat(np.asarray(y)[..., None], 3, axis=-1)


def luminance_inputs(content: np.ndarray, styles: list[np.ndarray]):
    """Content and styles for luminance-only transfer: the content's luminance, and each
    style's luminance matched to it, as grey RGB images."""
    content_y = luminance(content)
    return grey(content_y), [grey(match_luminance(luminance(s), content_y)) for s in styles]


def restore_colors(result: np.ndarray, content: np.ndarray) -> np.ndarray:
    """The result's luminance with the content's I and Q channels: the content's colours."""
    yiq = rgb_to_yiq(content)
    yiq[..., 0] = luminance(result)
    return yiq_to_rgb(yiq)


def _sym_power(cov: np.ndarray, power: float, floor: float) -> np.ndarray:
    """cov^power for a symmetric positive semi-definite matrix, by eigendecomposition;
    eigenvalues are floored so that a flat channel does not divide by zero."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.maximum(values, floor) ** power) @ vectors.T


def match_colors(source: np.ndarray, target: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """`source`'s colours moved so that their mean and covariance equal `target`'s.

    The paper's linear transform x -> A (x - mu_s) + mu_t with A Sigma_s A^T = Sigma_t. Of the
    two A it gives, this is the Image Analogies one, A = Sigma_t^(1/2) Sigma_s^(-1/2) with
    symmetric square roots from the eigendecomposition (the other takes Cholesky factors).
    Colour directions in which the source does not vary at all (variance under `floor`, in
    squared 0..255 units: a grey painting) cannot take the target's spread and stay flat.
    """
    src = np.asarray(source, np.float64).reshape(-1, 3)
    tgt = np.asarray(target, np.float64).reshape(-1, 3)
    mu_s, mu_t = src.mean(axis=0), tgt.mean(axis=0)
    cov_s = np.cov(src, rowvar=False, bias=True)
    cov_t = np.cov(tgt, rowvar=False, bias=True)
    a = _sym_power(cov_t, 0.5, 0.0) @ _sym_power(cov_s, -0.5, floor)
    return ((src - mu_s) @ a.T + mu_t).reshape(np.shape(source))
