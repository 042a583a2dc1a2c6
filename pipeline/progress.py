"""Watching a run: a tqdm bar with the loss on a terminal, plain log lines every N iterations
otherwise (a log file fills up with carriage returns)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("pipeline")


class Progress:
    """Called with each optimize.Step of one run; `close()` when the run ends."""

    def __init__(self, run_id: str, iterations: int, every: int, bar: bool | None = None):
        self.run_id, self.iterations, self.every = run_id, iterations, every
        self.bar = None
        if sys.stderr.isatty() if bar is None else bar:
            from tqdm import tqdm

            self.bar = tqdm(total=iterations, desc=run_id, unit="it", dynamic_ncols=True,
                            leave=False)

    def __call__(self, step) -> None:
        if self.bar is not None:
            self.bar.update(step.iteration - self.bar.n)
            self.bar.set_postfix_str(f"loss {step.total:.4g}", refresh=False)
        elif step.iteration % self.every == 0 or step.iteration == self.iterations:
            terms = " ".join(f"{k} {v:.4g}" for k, v in step.terms.items())
            log.info("%s: iteration %d/%d  loss %.4g (%s)  %.1fs", self.run_id, step.iteration,
                     self.iterations, step.total, terms, step.seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
