"""From a config to finished run folders: each run is a function of its resolved config and
its folder. A completed run is skipped, an interrupted one resumes from its last checkpoint,
a failed one starts again; one run's failure is recorded and never ends the others.

TensorFlow is imported only when a run starts (in run_one, through framework.load), so that
planning, the parent of a worker pool, `status` and `report` stay light.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline import __version__, config, images, optimize, runs, scales

log = logging.getLogger("pipeline")

# How an optimiser's end maps onto the run's status.
_STATUS = {
    optimize.COMPLETED: "completed",
    optimize.CONVERGED: "completed",
    optimize.ABNORMAL: "completed",
    optimize.INTERRUPTED: "interrupted",
    optimize.NON_FINITE: "failed",
}


@dataclass
class Planned:
    run_id: str
    label: dict  # the values that set this run apart from its siblings
    cfg: config.Config
    estimate: str = ""  # the memory and time estimate, logged when the run starts


@dataclass
class Outcome:
    run_id: str
    status: str  # completed | failed | interrupted | skipped
    folder: runs.RunFolder
    message: str = ""


def plan(cfg: config.Config) -> list[Planned]:
    return [Planned(config.run_id(c, label), label, c) for label, c in config.expand(cfg)]


def folder_of(job: Planned) -> runs.RunFolder:
    return runs.RunFolder.for_config(job.cfg, job.run_id)


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
            from pipeline.workers import run_pool

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


def run_one(
    job: Planned,
    on_step: Callable[[optimize.Step], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    lock: bool = True,
) -> Outcome:
    """Run, resume or skip one run in its folder, holding the run's lock while it works.
    A completed run is left untouched: not a file in its folder is written again.
    `lock=False`: the caller alone owns the run (a cluster whose file system has no flock)."""
    folder = folder_of(job)
    if (folder.read_metrics() or {}).get("status") == "completed":
        return Outcome(job.run_id, "skipped", folder, "already completed")
    if job.estimate:
        log.info("%s: %s", job.run_id, job.estimate)
    if not lock:
        return _run_locked(job, folder, on_step, should_stop)
    try:
        # Waits for a run still held by a dying process (an orphaned worker saving its state).
        with runs.Lock(folder.lock, f"run {job.run_id}", wait=120):
            return _run_locked(job, folder, on_step, should_stop)
    except runs.Locked as e:
        return Outcome(job.run_id, "failed", folder, str(e))


def _run_locked(job, folder, on_step, should_stop) -> Outcome:
    from pipeline import framework

    framework.load()  # TensorFlow's start-up lines filtered, in whichever process runs this
    from pipeline.stylize import stylize

    cfg = job.cfg
    previous = folder.read_metrics() or {}
    if previous.get("status") == "completed":  # finished while we waited for the lock
        return Outcome(job.run_id, "skipped", folder, "already completed")
    # "running" here means a process died without a word (SIGKILL, power): resume it too.
    resume = folder.load_state() if previous.get("status") in ("interrupted", "running") else None
    if previous.get("status") in ("interrupted", "running") and resume is None:
        log.warning("%s: no readable checkpoint (%s): starting again from the beginning",
                    job.run_id, folder.state)
    done = (int(resume["iteration"]), int(resume["evaluations"]),
            float(resume["seconds"])) if resume else (0, 0, 0.0)
    plan = scales.stages(cfg)
    digest = config.config_hash(cfg)
    text = {"run_id": job.run_id, "config_hash": digest, "software": f"pipeline {__version__}"}
    metrics = {
        "status": "running",
        "run_id": job.run_id,
        "config_hash": digest,
        "swept": job.label,
        "iterations": done[0],
        "evaluations": done[1],
        "seconds": round(done[2], 3),
        "initial_loss": previous.get("initial_loss") if resume else None,
        "loss": previous.get("loss") if resume else None,
        "resumed_from": done[0] if resume else None,
        "stages": [{"stage": st.index, "size": st.size, "iterations": [st.first, st.last]}
                   for st in plan],
    }
    last_step: list[optimize.Step] = []
    # result.png holds the lowest loss seen by any part of the run (its loss is in its text);
    # a resumed part replaces it only with something better.
    previous_best = _result_loss(folder) if resume else None

    def record(step: optimize.Step):
        folder.append_trace(runs.trace_row(step))
        last_step[:] = [step]
        # The run's first loss: from its first evaluation, or kept by the checkpoint resumed.
        metrics["initial_loss"] = step.initial or metrics["initial_loss"]
        if cfg.checkpoint_every and step.iteration % cfg.checkpoint_every == 0:
            _checkpoint(folder, step, text, plan)
            metrics.update(iterations=step.iteration, evaluations=step.evaluations,
                           seconds=round(step.seconds, 3), loss={"total": step.total, **step.terms})
            folder.write_metrics(metrics)
        if on_step is not None:
            on_step(step)

    try:  # everything up to the last write: a full disk fails this run, not the batch
        folder.start(config.to_dict(cfg), {"run_id": job.run_id, "config_hash": digest,
                                           **_environment()}, done[0])
        folder.write_metrics(metrics)
        content = images.load_image(cfg.content, tuple(cfg.background))
        styles = [images.load_image(p, tuple(cfg.background)) for p in cfg.style]
        init = images.load_image(cfg.init, tuple(cfg.background)) if _is_file(cfg.init) else None
        masks = [None if p is None else images.load_mask(p) for p in cfg.style_masks or []]
        content_mask = images.load_mask(cfg.content_mask) if cfg.content_mask else None
        result, weights = stylize(cfg, content, styles, init, record, should_stop, resume,
                                  masks if cfg.style_masks is not None else None, content_mask)
        status = _STATUS[result.reason]
        best = result.final
        if previous_best and _result_shape(folder) != result.image.shape[:2]:
            previous_best = None  # an earlier stage's image, smaller: the later stage's wins
        if previous_best and (best is None or previous_best["total"] <= best["total"]):
            best = previous_best  # an earlier part's image is better: keep it
        else:
            best = best or metrics["loss"]  # no evaluation: the checkpoint image, as it was
            folder.save_result(result.image, {**text, "loss": json.dumps(best)})
        if status == "interrupted" and last_step:
            _checkpoint(folder, last_step[0], text, plan)
        metrics.update(
            status=status,
            stop_reason=result.reason,
            message=result.message,
            weights=weights,
            iterations=result.iterations,
            evaluations=result.evaluations,
            seconds=round(result.seconds, 3),
            initial_loss=result.initial or metrics["initial_loss"],
            loss=best,
            result=str(folder.result),
        )
        if status == "failed":
            metrics["error"] = result.message
        folder.write_metrics(metrics)
        if status != "interrupted":  # only an interrupted run resumes from its state
            folder.remove_state()
    except Exception as e:  # one run's failure, whatever it is, must not end a batch
        error = describe_error(e, cfg)
        metrics.update(status="failed", error=error, traceback=traceback.format_exc())
        try:
            if folder.path.exists():
                folder.write_metrics(metrics)
                folder.remove_state()  # a failed run starts again from the beginning
        except OSError as again:  # the disk that failed the run may refuse this too
            log.error("%s: cannot record its failure in %s: %s", job.run_id, folder.metrics,
                      again)
        return Outcome(job.run_id, "failed", folder, error)
    return Outcome(job.run_id, status, folder, result.message)


def _result_loss(folder: runs.RunFolder) -> dict | None:
    """The loss recorded in the run's result.png by an earlier part of the run, if any."""
    try:
        loss = json.loads(images.read_png_text(folder.result)["loss"])
    except (images.ImageError, KeyError, ValueError):
        return None
    return loss if isinstance(loss, dict) and "total" in loss else None


def _result_shape(folder: runs.RunFolder) -> tuple[int, int] | None:
    """(height, width) of the run's result.png, from its header."""
    from PIL import Image

    try:
        with Image.open(folder.result) as img:
            return img.height, img.width
    except OSError:
        return None


def _environment() -> dict:
    """Versions, device and GPU memory settings for the run's provenance; says once per
    process when a GPU sits unused."""
    from pipeline import autodiff, hardware

    env = autodiff.environment()
    hardware.warn_if_gpu_unused(env["backend"], env["device"])
    return {**env, "gpu_memory": hardware.gpu_memory_settings()}


def _done(step: optimize.Step) -> tuple[int, int, float]:
    return step.iteration, step.evaluations, step.seconds


def _checkpoint(folder, step: optimize.Step, text: dict, plan: list) -> None:
    """The stage goes into the state (a resume continues it) and, in a run of several
    stages, into the PNG's name: `stage2_iter_000150.png`. So does the run's first loss
    (`initial.<term>`): metrics.json's initial_loss after a kill and a resume."""
    label = f"stage{step.stage}_" if len(plan) > 1 else ""
    # The optimiser's state too: a device optimiser's (lbfgs, adam) makes its resume exact;
    # scipy's is its best image, which the next stage starts from.
    saved = step.state() if step.state is not None else {}
    extra = {"stage": step.stage, **{optimize.STATE_PREFIX + k: v for k, v in saved.items()},
             **{f"initial.{k}": v for k, v in (step.initial or {}).items()}}
    folder.save_checkpoint(step.image, _done(step), text, extra, label)


def _is_file(init: str) -> bool:
    return init not in config.INIT_KINDS


def refuse(job: Planned, message: str) -> Outcome:
    """A run that cannot fit in memory, marked failed without starting (a completed one is
    left alone). Its folder holds only metrics.json, saying why."""
    folder = folder_of(job)
    previous = folder.read_metrics()
    if (previous or {}).get("status") == "completed":
        return Outcome(job.run_id, "skipped", folder, "already completed")
    if previous is None:  # an interrupted run keeps its state: with memory freed, it resumes
        with runs.Lock(folder.lock, f"run {job.run_id}"):
            folder.path.mkdir(parents=True, exist_ok=True)
            folder.write_metrics({"status": "failed", "run_id": job.run_id, "swept": job.label,
                                  "iterations": 0, "error": message})
    return Outcome(job.run_id, "failed", folder, message)


def describe_error(e: BaseException, cfg: config.Config) -> str:
    """One line for metrics.json and the log; out-of-memory names the size and a smaller one."""
    text = " ".join(str(e).split()) or type(e).__name__
    oom_words = ("RESOURCE_EXHAUSTED", "OOM when allocating", "out of memory", "Out of memory")
    if isinstance(e, MemoryError) or any(word in text for word in oom_words):
        return (f"out of memory at size {cfg.size}: try a smaller one, e.g. --set "
                f"size={smaller_size(cfg)} ({type(e).__name__}: {text[:200]})")
    return text


def smaller_size(cfg: config.Config) -> int:
    """A size to suggest after running out of memory: three quarters, a multiple of 16."""
    return max(16, cfg.size * 3 // 4 // 16 * 16)
