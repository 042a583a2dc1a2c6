"""From planned jobs to finished run folders: the jobs run one after another in this process,
in a pool of worker processes (workers.py), or as tasks of a Ray cluster (cluster/), and the
failed ones are re-run up to `retries` times. Planning and running one job are jobs.py's;
this module only schedules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

# The names users and tests know from here: planning and running one job live in jobs.py.
from pipeline.jobs import Outcome, Planned, folder_of, plan, refuse, run_one  # noqa: F401
from pipeline.life import describe_error, smaller_size  # noqa: F401
from pipeline.workers import run_pool

log = logging.getLogger("pipeline")


def run_batch(
    jobs: list[Planned],
    workers: int = 1,
    retries: int = 0,
    stop=None,
    progress: Callable[[Planned], Callable] | None = None,
    on_outcome: Callable[[Outcome], None] = lambda outcome: None,
    log_file: str | None = None,
    executor: Callable | None = None,
) -> list[Outcome]:
    """Run every job (one after another, or in `workers` processes), then re-run the failed
    ones up to `retries` times. `stop` is a threading.Event that a signal handler may set
    (None: never stopped); `progress(job)` gives the step callback of a run executed in this
    process. `executor(jobs, stop)`, when given, yields the outcomes instead
    (cluster.RayExecutor). Returns the last outcome of each job."""
    stop = stop if stop is not None else threading.Event()
    outcomes: dict[str, Outcome] = {}
    todo = list(jobs)
    for attempt in range(retries + 1):
        if attempt:
            log.info("retrying %d failed run(s), attempt %d of %d", len(todo), attempt, retries)
        if executor is not None:
            finished = executor(todo, stop)
        elif workers > 1:
            finished = run_pool(todo, workers, stop, log_file)
        else:
            finished = _in_process(todo, stop, progress)
        for outcome in finished:
            outcomes[outcome.run_id] = outcome
            on_outcome(outcome)
        todo = [job for job in todo if outcomes.get(job.run_id) and
                outcomes[job.run_id].status == "failed"]
        if not todo or stop.is_set():
            break
    return [outcomes[job.run_id] for job in jobs if job.run_id in outcomes]


def _in_process(jobs, stop, progress) -> Iterator[Outcome]:
    for job in jobs:
        if stop.is_set():
            return
        watcher = progress(job) if progress else None
        try:
            yield run_one(job, watcher, stop.is_set)
        finally:
            if watcher is not None:
                watcher.close()
