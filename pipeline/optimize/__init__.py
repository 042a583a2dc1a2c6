"""Optimisers over the pixels, one Step/Result contract (records.py):

- `scipy` (scipy.py): scipy's L-BFGS-B on the host, fed by an Evaluator. The default.
- `lbfgs` (lbfgs.py) and `adam` (adam.py): written in keras.ops and run on the device many
  iterations per compiled call by device.py, the host touched only between calls.

`solve` runs one of them by the name a run's config gives (optimizer.method).

Nothing here knows about files or terminals: each iteration becomes a Step record for
whoever is watching.
"""

from pipeline.optimize.records import (
    ABNORMAL,
    COMPLETED,
    CONVERGED,
    INTERRUPTED,
    NON_FINITE,
    Result,
    Step,
)
from pipeline.optimize.scipy import Evaluator, minimize
from pipeline.optimize.solve import device_method, solve

__all__ = ["ABNORMAL", "COMPLETED", "CONVERGED", "INTERRUPTED", "NON_FINITE",
           "Evaluator", "Result", "Step", "minimize", "device_method", "solve"]
