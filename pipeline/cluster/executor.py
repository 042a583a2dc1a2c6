"""RayExecutor: `executor(jobs, stop)` for batch.run_batch on a Ray cluster. `start()`
connects, claims the experiment and probes the nodes; calling it dispatches the runs, no
more at once than the cluster holds, and passes a stop on through the claim's flag."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline import hardware, jobs, life
from pipeline.cluster import claim, connect, probe
from pipeline.cluster.tasks import run_task

log = logging.getLogger("pipeline")

TASK_RETRIES = 3  # Ray's re-executions of a run whose worker or node died
POLL_SECONDS = 0.5  # how often the driver looks at its tasks and at the stop signal
# What a task's process must see as the driver does, whatever its node was started with.
FORWARDED = ("KERAS_BACKEND", "PIPELINE_OFFLINE", "TF_CPP_MIN_LOG_LEVEL")


class RayExecutor:
    """Yields each run's Outcome as its task ends."""

    def __init__(self, address: str | None, gpus_per_run: float | None, cpus_per_run: float):
        self.ray = connect.import_ray()
        self.address, self.gpus, self.cpus = address, gpus_per_run, cpus_per_run
        self.capacity = 1  # runs that fit in the cluster at once (status's time left)
        self.lock_runs = True
        self.flag = None

    def start(self, exp: Path, planned: list[jobs.Planned]) -> str:
        """Connect to the cluster (no address: a new local instance), claim the experiment
        in it, and probe every node that can take a run. Returns a line for the log.
        Raises ConfigError (exit 2) for a cluster that cannot run these jobs, runs.Locked
        (exit 3) when another driver holds the experiment."""
        connect.connect(self.ray, self.address)
        if self.gpus is None:  # one GPU per run where there are GPUs, none on a CPU cluster
            self.gpus = 1.0 if connect.has_gpus(self.ray) else 0.0
        usable = connect.usable_nodes(self.ray, self.cpus, self.gpus)
        self.capacity = sum(connect.fits(n["Resources"], self.cpus, self.gpus) for n in usable)
        self.flag = claim.claim(self.ray, exp, self.address)
        self.lock_runs = probe.probe(self.ray, exp, planned, usable)
        where = self.address or "a new local instance"
        return (f"Ray cluster at {where}: {len(usable)} node(s) for runs of {self.cpus:g} CPU "
                f"and {self.gpus:g} GPU each, up to {self.capacity} at once")

    def close(self) -> None:
        """Give up the experiment's claim on the cluster (the driver's exit does it too)."""
        if self.flag is not None:
            self.ray.kill(self.flag)
            self.flag = None

    def __call__(self, planned: list[jobs.Planned], stop) -> Iterator[jobs.Outcome]:
        """Hand each job to a task, in order, and yield outcomes as they end. `stop` (set by
        a signal handler) is passed on to the tasks through the flag actor."""
        ray = self.ray
        env = {**hardware.thread_caps(max(1, int(self.cpus)), os.environ),
               **{k: os.environ[k] for k in FORWARDED if k in os.environ}}
        if 0 < self.gpus < 1:  # runs share a GPU: neither framework may take all of it
            env.update(TF_FORCE_GPU_ALLOW_GROWTH="true", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        task = ray.remote(run_task).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=TASK_RETRIES,
            retry_exceptions=False,  # run_one records a run's own errors; only deaths retry
            runtime_env={"env_vars": env})
        # No more in flight than the cluster has room for: runs start in the plan's order
        # (Ray's queue keeps none), and after a stop no queued task is left to drain.
        queue, pending, told = list(planned), {}, False
        while queue or pending:
            if stop.is_set() and not told:
                self.flag.set.remote()
                queue, told = [], True  # not started: the same command runs them
            while queue and len(pending) < self.capacity:
                job = queue.pop(0)
                pending[task.remote(job, self.flag, self.lock_runs)] = job
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as e:
                    outcome = self._lost(job, e)
                if outcome is not None:
                    yield outcome

    def _lost(self, job: jobs.Planned, error: Exception) -> jobs.Outcome:
        """A task that came back without an outcome: its worker died more often than Ray
        retries (the out-of-memory killer, most likely), or it could not start."""
        ray = self.ray
        folder = jobs.folder_of(job)
        if isinstance(error, ray.exceptions.OutOfMemoryError | ray.exceptions.WorkerCrashedError):
            message = life.describe_error(MemoryError(
                f"its Ray worker died {TASK_RETRIES + 1} times ({type(error).__name__}), "
                f"most likely killed for memory"), job.cfg)
        else:
            message = f"Ray could not run it: {connect.first_line(error)}"
        life.mark_failed(folder, message)
        return jobs.Outcome(job.run_id, "failed", folder, message)
