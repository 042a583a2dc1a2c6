"""What every optimiser hands back: a Step record per iteration while it runs, a Result at
the end, and the reason it ended. The scipy driver and the device optimisers share them, so
progress, traces, checkpoints and statuses do not care which one ran."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# Why a run ended: the optimiser's own ends, then ours.
COMPLETED = "completed"  # the requested iterations ran (scipy warnflag 1)
CONVERGED = "converged"  # scipy found no further progress (warnflag 0)
ABNORMAL = "abnormal"  # scipy stopped otherwise, e.g. a failed line search (warnflag 2)
INTERRUPTED = "interrupted"  # should_stop() said so
NON_FINITE = "non_finite"  # a NaN or Inf in the loss or gradient


@dataclass(frozen=True)
class Step:
    """One finished iteration (counts include any earlier, resumed part of the run).

    `image` is the iterate. The device optimisers run many iterations per call and hand back
    pixels only at the end of each call, so inside a call it is None; calls end on every
    checkpoint iteration (`checkpoint_every`) and at the last iteration, so a caller saving
    checkpoints always has it. `state`, where not None, fetches the optimiser's own state
    (a dict of named arrays, numpy's or the backend's) for a checkpoint: resuming from it
    continues the run exactly (scipy's: the best image so far, to continue from it).
    `initial` is the total and terms at the first evaluation: an optimiser gives its own
    call's, and stylize the run's (kept in checkpoints, so that a resumed run still knows it).
    """

    iteration: int
    evaluations: int
    seconds: float
    total: float
    terms: dict
    # The iterate, (H, W, 3) float32: (H, W, 1) from an optimiser of a grey image, which
    # stylize hands on as grey RGB.
    image: np.ndarray | None = field(repr=False)
    stage: int = 1  # the coarse-to-fine stage (see scales.py); set by the caller
    size: int = 0  # the long side of the image being optimised, in pixels
    state: Callable[[], dict] | None = field(default=None, repr=False, compare=False)
    initial: dict | None = None
    # The stage's tile core in pixels (pipeline/tile), None where it runs whole, and how many
    # tiles cut it; set by the caller, as `stage` is.
    tile: int | None = None
    tiles: int = 1


@dataclass
class Result:
    image: np.ndarray  # the lowest-loss image evaluated
    reason: str
    message: str
    iterations: int
    evaluations: int
    seconds: float
    initial: dict | None  # total and terms at the first evaluation of this call
    final: dict | None  # total and terms of `image`
