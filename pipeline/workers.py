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
import signal
import threading
import time

from pipeline import framework, hardware

log = logging.getLogger("pipeline")
_worker: dict = {}  # this worker's settings, filled by _init
_busy = threading.Lock()  # held while this worker runs a run


def visible_gpus() -> list[str]:
    """The GPU ids a worker may be pinned to, without importing a framework."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() not in ("", "-1")]
    return [str(i) for i in range(len(hardware.driver_gpus()))]


def _init(slots, stop, parent_pid: int, gpus: list[str], threads: int, log_file: str | None):
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    os.environ.update(hardware.thread_caps(threads, os.environ))
    framework.quiet_logs()
    memory = hardware.share_gpu_memory()  # workers on one GPU must not each take all of it
    # Ctrl-C reaches every process of the terminal's group: the parent decides, through
    # `stop`. A SIGTERM sent to this worker alone (by a user, or by the pool when another
    # worker died) stops its run the same gentle way, and then the worker exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: _worker.update(terminated=True))
    handlers = [logging.StreamHandler()]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format=f"%(asctime)s [worker {slot}] %(message)s", datefmt="%H:%M:%S")
    _worker.update(stop=stop, parent=parent_pid, slot=slot)
    log.info("GPU %s, %d CPU thread(s), %s", gpus[slot % len(gpus)] if gpus else "none",
             threads, " ".join(f"{k}={v}" for k, v in memory.items()))
    threading.Thread(target=_exit_when_told_or_orphaned, daemon=True).start()


def _exit_when_told_or_orphaned() -> None:
    """A pool worker would otherwise wait for work forever after a SIGTERM or its parent's
    death (it holds its own job queue open; the pool, joining it, would hang too). It lets a
    run in progress stop and save (see _should_stop), then exits, so that nothing is left
    holding the GPU or the run's lock."""
    while os.getppid() == _worker["parent"] and not _worker.get("terminated"):
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
    # Imported here, not at the top: numpy's BLAS reads its thread count when it loads, and a
    # worker imports this module before _init has capped it.
    from pipeline import jobs
    from pipeline.progress import Progress

    with _busy:
        if _should_stop():  # queued before the stop; not started, so nothing to save
            return None
        progress = Progress(job.run_id, jobs.total_iterations(job), job.cfg.log_every,
                            bar=False)
        return jobs.run_one(job, progress, _should_stop)


def run_pool(planned, workers: int, stop, log_file: str | None = None):
    """Yield each job's Outcome as it finishes. Once `stop` (a threading.Event, set by a
    signal handler) is set, runs not started are not started, and running ones stop at their
    next evaluation: the loop below passes it on to the workers through a process-shared
    Event (which a signal handler must not set itself: it takes a lock).

    A worker killed outright (the kernel's out-of-memory killer, most often) breaks a
    ProcessPoolExecutor for good: every pending future fails and the other workers are sent
    SIGTERM, which stops and saves their runs. Only the run that was under way in the dead
    worker is failed; the others go to a fresh pool, the interrupted ones resuming."""
    from pipeline import jobs

    context = multiprocessing.get_context("spawn")
    shared_stop = context.Event()
    gpus = visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("%d workers, %s, %d CPU thread(s) each", workers,
             f"GPUs {','.join(gpus)}" if gpus else "no GPU", threads)
    todo = list(planned)
    for _ in range(len(planned)):  # each broken pool fails at least one run, or no more pools
        slots = context.Queue()
        for slot in range(workers):
            slots.put(slot)
        broken, started = [], time.time()
        # The executor does not say which worker died, nor how: its processes are kept here
        # (by pid) so that their exit codes can be read once the pool is down.
        processes: dict = {}
        with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init,
                                         initargs=(slots, shared_stop, os.getpid(), gpus,
                                                   threads, log_file)) as pool:
            pending = {pool.submit(_work, job): job for job in todo}
            while pending:
                processes.update(pool._processes or {})
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
                    except futures.process.BrokenProcessPool:
                        broken.append(job)  # judged once the other workers have saved
                        continue
                    except Exception as e:  # run_one records its own failures; not this one
                        outcome = jobs.Outcome(job.run_id, "failed", jobs.folder_of(job),
                                                f"{type(e).__name__}: {e}")
                    if outcome is not None:
                        yield outcome
        # Leaving the `with` joined every worker: the survivors' runs are saved by now.
        again = []
        for job in broken:
            outcome = _after_broken_pool(job, stop, started, processes)
            if outcome is None:
                again.append(job)
            else:
                yield outcome
        if not again or stop.is_set():
            return
        log.info("a worker died; starting a new pool for the %d run(s) left", len(again))
        todo = again


def _after_broken_pool(job, stop, pool_started: float, processes: dict):
    """The outcome of a job whose pool broke, read from its folder, or None to run it again."""
    from pipeline import jobs, life

    folder = jobs.folder_of(job)
    metrics = folder.read_metrics() or {}
    status = metrics.get("status")
    if status == "completed":
        return jobs.Outcome(job.run_id, "completed", folder, "")
    # Under way in the worker that died without a word (not left `running` by a kill before
    # this pool started: that one resumes).
    if status == "running" and folder.metrics.stat().st_mtime >= pool_started:
        error = death_of(_holder_pid(folder), processes, job.cfg)
        life.mark_failed(folder, error)
        return jobs.Outcome(job.run_id, "failed", folder, error)
    if status == "interrupted" and stop.is_set():
        return jobs.Outcome(job.run_id, "interrupted", folder, "")
    return None  # not started, or stopped by the pool's SIGTERM: a fresh pool runs it


def _holder_pid(folder) -> int | None:
    """The pid that last held the run's lock: its holder wrote "pid N on host since ..."."""
    try:
        words = folder.lock.read_text().split()
        return int(words[1]) if words[:1] == ["pid"] else None
    except (OSError, ValueError, IndexError):
        return None


def death_of(pid: int | None, processes: dict, cfg) -> str:
    """What is known of a worker's sudden death, in one line: its signal or exit code. A
    SIGKILL is most often the kernel's out-of-memory killer, so that one names the size."""
    from pipeline import life

    process = processes.get(pid)
    code = process.exitcode if process is not None else None
    who = f"its worker process (pid {pid})" if pid else "its worker process"
    if code is None:
        return f"{who} died without a word (exit status unknown)"
    if code >= 0:
        return f"{who} exited with code {code}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    if -code == signal.SIGKILL:
        return (f"{who} was killed by SIGKILL; the out-of-memory killer is the usual cause: "
                f"if so, try a smaller size than {cfg.size}, e.g. --set "
                f"size={life.smaller_size(cfg)}")
    crash = " (a crash in native code)" if -code in (signal.SIGSEGV, signal.SIGBUS,
                                                      signal.SIGABRT, signal.SIGILL) else ""
    return f"{who} died of {name}{crash}"
