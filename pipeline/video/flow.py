"""Optical flow between two frames, and backward warping along a flow.

Ruder et al. use DeepFlow (external binaries); here OpenCV computes it in-process: `dis`
(Kroeger et al.'s Dense Inverse Search, preset medium: fast, with a variational refinement)
or `farneback` (polynomial expansion). Both work on grey 8-bit frames. See the package's note
for the direction of a flow: flow(a, b)[y, x] = (dx, dy) with a(x, y) ~ b(x + dx, y + dy).
"""

from __future__ import annotations

import numpy as np

METHODS = ("dis", "farneback")

# OpenCV's own example settings for Farneback (samples/python/opt_flow.py), with more pyramid
# levels so that motions of ~10 px at 512 px are still found.
_FARNEBACK = dict(pyr_scale=0.5, levels=5, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2,
                  flags=0)


def grey(frame: np.ndarray) -> np.ndarray:
    """An RGB frame (H, W, 3) in 0..255 as the 8-bit luma (ITU-R 601, as OpenCV's RGB2GRAY)
    the flow methods take."""
    luma = frame[..., 0] * 0.299 + frame[..., 1] * 0.587 + frame[..., 2] * 0.114
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def optical_flow(a: np.ndarray, b: np.ndarray, method: str = "dis") -> np.ndarray:
    """The flow from frame a to frame b, (H, W, 2) float32: for each pixel of a, where it moved
    to in b. Frames are RGB (H, W, 3) in 0..255, or already grey uint8 (H, W)."""
    import cv2

    a, b = (f if f.ndim == 2 and f.dtype == np.uint8 else grey(f) for f in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"frames of different shapes: {a.shape} and {b.shape}")
    if method not in METHODS:
        raise ValueError(f"no optical flow method '{method}': use one of {', '.join(METHODS)}")
    try:
        if method == "dis":
            dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
            flow = dis.calc(a, b, None)
        else:
            flow = cv2.calcOpticalFlowFarneback(a, b, None, **_FARNEBACK)
    except cv2.error as exc:  # e.g. DIS on frames smaller than its 8 px patches
        raise ValueError(f"optical flow ({method}) failed on {a.shape[1]}x{a.shape[0]} frames: "
                         f"{str(exc).strip().splitlines()[-1]}") from None
    return np.asarray(flow, dtype=np.float32)


def flows(frame: np.ndarray, previous: np.ndarray, method: str = "dis"):
    """(backward, forward) for frame i and an earlier frame j: the flow from i to j, which warps
    the stylised j onto i, and the flow from j to i, which checks it (consistency.reliable).
    Ruder's backward_i_j.flo and forward_j_i.flo (makeOptFlow.sh)."""
    a, b = grey(frame), grey(previous)
    return optical_flow(a, b, method), optical_flow(b, a, method)


def sample(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`image` (H, W) or (H, W, C) at the real positions (x, y), bilinear, float32. Positions
    outside are read at the nearest edge (callers decide what counts as outside)."""
    h, w = image.shape[:2]
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.intp), w - 2 if w > 1 else 0)
    y0 = np.minimum(np.floor(y).astype(np.intp), h - 2 if h > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = x - x0, y - y0
    if image.ndim == 3:
        ax, ay = ax[..., None], ay[..., None]
    img = image.astype(np.float32, copy=False)
    top = img[y0, x0] * (1 - ax) + img[y0, x1] * ax
    bottom = img[y1, x0] * (1 - ax) + img[y1, x1] * ax
    return (top * (1 - ay) + bottom * ay).astype(np.float32)


def warp(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backward warping: out[y, x] = image(x + dx, y + dy), bilinear, with `flow` the flow FROM
    the frame the result is aligned to, TO the frame `image` belongs to. Returns (warped,
    inside): inside is False where the flow points out of `image` (torch's image.warp, which
    Ruder uses, pads there; those pixels are edge values here: fill them, see prev_warped)."""
    h, w = flow.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = xs + flow[..., 0], ys + flow[..., 1]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return sample(image, x, y), inside


def prev_warped(previous: np.ndarray, backward: np.ndarray, content: np.ndarray) -> np.ndarray:
    """Ruder's `prevWarped` start for frame i: the stylised frame i-1 warped onto it, with the
    pixels the flow takes out of the frame filled from frame i's content (Ruder fills them
    with the ImageNet mean colour; the content starts them where a first frame starts)."""
    warped, inside = warp(previous, backward)
    return np.where(inside[..., None], warped, content).astype(np.float32)
