"""Optimisers over the pixels, one Step/Result contract (records.py):

- `scipy` (scipy.py): scipy's L-BFGS-B on the host, fed by an Evaluator. The default.
- `lbfgs` (lbfgs.py) and `adam` (adam.py): written in keras.ops and run on the device many
  iterations per compiled call by device.py, the host touched only between calls.

Nothing here knows about files or terminals: each iteration becomes a Step record for
whoever is watching.
"""

from pipeline.optimize.records import (
    ABNORMAL,
    COMPLETED,
    CONVERGED,
    INTERRUPTED,
    NON_FINITE,
    STATE_PREFIX,
    Result,
    Step,
)
from pipeline.optimize.scipy import Evaluator, minimize

__all__ = ["ABNORMAL", "COMPLETED", "CONVERGED", "INTERRUPTED", "NON_FINITE", "STATE_PREFIX",
           "Evaluator", "Result", "Step", "minimize", "device_method"]


def device_method(name: str, history: int = 10):
    """The device optimiser called `name` (optimizer.method), for device.minimize."""
    if name == "lbfgs":
        from pipeline.optimize.lbfgs import LBFGS

        return LBFGS(history)
    if name == "adam":
        from pipeline.optimize.adam import Adam

        return Adam()
    raise ValueError(f"no device optimiser '{name}'")
