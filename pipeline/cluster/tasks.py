"""What runs on a node: one run, as the local executors run it (jobs.run_one), watching the
driver's stop flag."""

from __future__ import annotations

import logging
import socket
import sys

from pipeline import jobs

log = logging.getLogger("pipeline")


def run_task(job: jobs.Planned, flag, lock: bool) -> jobs.Outcome | None:
    """One run in a Ray worker. Returns None when the driver said stop before it began."""
    from pipeline.progress import Progress

    if not log.handlers:  # a Ray worker: log lines go to its stderr, which Ray forwards
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    # Futures, not ray.get: see claim.StopFlag. The answer to `wait` comes when the driver says
    # stop, or as an error when the driver is gone: either way the run stops and saves.
    if flag.is_set.remote().future().result(timeout=60):
        return None
    stopped = flag.wait.remote().future()
    folder = jobs.folder_of(job)
    if not folder.path.parent.is_dir():  # a node that joined after the probe
        return jobs.Outcome(job.run_id, "failed", folder, f"{folder.path.parent} is not "
                            f"visible on node {socket.gethostname()}: output_dir must be shared")
    # Iterations are numbered across the stages of coarse to fine (scales.py), or a clip's
    # frames: the total is theirs, as in the local executors' progress.
    progress = Progress(job.run_id, jobs.total_iterations(job), job.cfg.log_every, bar=False)
    return jobs.run_one(job, progress, stopped.done, lock=lock)
