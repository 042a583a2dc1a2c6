"""Optical flows cached per experiment, in `<experiment>/flows/`: every run of a sweep over the
same clip at the same size (style weights, styles, optimisers) needs the same flows, so they
are computed once and read by the others, and a resumed clip reads them back instead of
computing them again.

An entry is the backward flow from frame i to an earlier frame j and its consistency weights
(Ruder's forward-backward check), for one pair of content frames as the run sees them (scaled
to its size). Its key is a hash of both frames' pixels (so their bytes and their size), the
flow method and VERSION; a file is written atomically, so a kill or a second worker writing
the same entry leaves a whole one. An entry that cannot be read is computed again.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from pipeline import images
from pipeline.video import consistency, flow

VERSION = 1  # raised when the flow or the check changes what an entry holds


def frame_key(frame: np.ndarray) -> str:
    """A content frame by its pixels and shape (the frame as the run uses it, scaled)."""
    digest = hashlib.sha256(str(frame.shape).encode())
    digest.update(np.ascontiguousarray(frame, np.float32).tobytes())
    return digest.hexdigest()


class FlowCache:
    """Flows between content frames, read from `folder` or computed and written there."""

    def __init__(self, folder, method: str):
        self.folder, self.method = Path(folder), method
        self.computed = 0  # entries this object computed (the others were read)

    def path(self, key_i: str, key_j: str) -> Path:
        name = hashlib.sha256(f"{VERSION} {self.method} {key_i} {key_j}".encode()).hexdigest()
        return self.folder / f"{name[:32]}.npz"

    def get(self, frame: np.ndarray, previous: np.ndarray, key_i: str | None = None,
            key_j: str | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
        """(backward flow from `frame` to `previous` (H, W, 2), its consistency weights (H, W),
        whether they were read from the cache)."""
        path = self.path(key_i or frame_key(frame), key_j or frame_key(previous))
        entry = _read(path, frame.shape[:2])
        if entry is not None:
            return *entry, True
        backward, forward = flow.flows(frame, previous, self.method)
        reliable = consistency.reliable(backward, forward)
        self.folder.mkdir(parents=True, exist_ok=True)
        with images.atomic_open(path) as f:
            np.savez(f, backward=backward, reliable=reliable)
        self.computed += 1
        return backward, reliable, False


def _read(path: Path, shape: tuple[int, int]):
    try:
        with np.load(path) as saved:
            backward, reliable = saved["backward"], saved["reliable"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # not there yet, or torn: computed again
    if backward.shape != (*shape, 2) or reliable.shape != shape:
        return None
    return backward.astype(np.float32), reliable.astype(np.float32)

