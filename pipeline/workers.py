"""Runs in worker processes (`--workers N`). Each worker is a fresh, spawned Python, so
TensorFlow starts clean in it; with several GPUs each worker is pinned to one through
CUDA_VISIBLE_DEVICES, and the CPU thread pools are capped so that N workers share the cores
instead of each assuming it has them all. This module imports nothing heavy: it runs in the
worker before TensorFlow is loaded, which is the only time those settings take effect."""

from __future__ import annotations

import concurrent.futures as futures
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time

log = logging.getLogger("pipeline")
_worker: dict = {}  # this worker's settings, filled by _init
_busy = threading.Lock()  # held while this worker runs a run


def visible_gpus() -> list[str]:
    """The GPU ids a worker may be pinned to, without importing a framework."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
    return []


def _init(slots, stop, parent_pid: int, gpus: list[str], threads: int, log_file: str | None):
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               f"{'true' if threads > 1 else 'false'}").strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Ctrl-C reaches every process of the terminal's group: the parent decides, through
    # `stop`. A SIGTERM sent to this worker alone stops its run the same gentle way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: _worker.update(terminated=True))
    handlers = [logging.StreamHandler()]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format=f"%(asctime)s [worker {slot}] %(message)s", datefmt="%H:%M:%S")
    _worker.update(stop=stop, parent=parent_pid, slot=slot)
    threading.Thread(target=_exit_when_orphaned, daemon=True).start()


def _exit_when_orphaned() -> None:
    """A pool worker whose parent died would wait for work forever (it holds its own job
    queue open). Once orphaned, it lets a run in progress stop and save (see _should_stop),
    then exits, so that nothing is left holding the GPU or the run's lock."""
    while os.getppid() == _worker["parent"]:
        time.sleep(0.5)
    with _busy:
        logging.shutdown()
        os._exit(0)


def _should_stop() -> bool:
    # A parent that died (SIGKILL) cannot say stop: its workers notice that they have been
    # orphaned and stop too, saving their runs, so that a restarted batch is alone.
    return (_worker["stop"].is_set() or os.getppid() != _worker["parent"]
            or _worker.get("terminated", False))


def _work(job):
    from pipeline import batch
    from pipeline.progress import Progress

    with _busy:
        if _should_stop():  # queued before the stop; not started, so nothing to save
            return None
        progress = Progress(job.run_id, job.cfg.optimizer.iterations, job.cfg.log_every,
                            bar=False)
        return batch.run_one(job, progress, _should_stop)


def run_pool(jobs, workers: int, stop, log_file: str | None = None):
    """Yield each job's Outcome as it finishes. Once `stop` (a threading.Event, set by a
    signal handler) is set, runs not started are not started, and running ones stop at their
    next evaluation: the loop below passes it on to the workers through a process-shared
    Event (which a signal handler must not set itself: it takes a lock)."""
    from pipeline import batch

    context = multiprocessing.get_context("spawn")
    shared_stop = context.Event()
    slots = context.Queue()
    for slot in range(workers):
        slots.put(slot)
    gpus = visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("%d workers, %s, %d CPU thread(s) each", workers,
             f"GPUs {','.join(gpus)}" if gpus else "no GPU", threads)
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init,
                                     initargs=(slots, shared_stop, os.getpid(), gpus, threads,
                                               log_file)) as pool:
        pending = {pool.submit(_work, job): job for job in jobs}
        while pending:
            done, _ = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_COMPLETED)
            if stop.is_set():
                shared_stop.set()
                for future in list(pending):
                    if future.cancel():
                        del pending[future]
            for future in done:
                job = pending.pop(future)
                try:
                    outcome = future.result()
                    if outcome is not None:
                        yield outcome
                except futures.process.BrokenProcessPool:  # killed: the OOM killer, ...
                    yield batch.Outcome(job.run_id, "failed", batch.folder_of(job),
                                        "its worker process died (out of memory?)")
                except Exception as e:  # run_one records its own failures; this is not one
                    yield batch.Outcome(job.run_id, "failed", batch.folder_of(job),
                                        f"{type(e).__name__}: {e}")
