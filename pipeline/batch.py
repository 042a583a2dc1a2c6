"""From a config to finished run folders: each run is a function of its resolved config and
its folder. A completed run is skipped, an interrupted one resumes from its last checkpoint,
a failed one starts again; one run's failure is recorded and never ends the others."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

from pipeline import __version__, autodiff, config, images, optimize, runs
from pipeline.stylize import stylize

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


@dataclass
class Outcome:
    run_id: str
    status: str  # completed | failed | interrupted | skipped
    folder: runs.RunFolder
    message: str = ""


def plan(cfg: config.Config) -> list[Planned]:
    return [Planned(config.run_id(c, label), label, c) for label, c in config.expand(cfg)]


def run_one(
    job: Planned,
    on_step: Callable[[optimize.Step], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    cfg, folder = job.cfg, runs.RunFolder.for_config(job.cfg, job.run_id)
    previous = folder.read_metrics() or {}
    if previous.get("status") == "completed":
        return Outcome(job.run_id, "skipped", folder, "already completed")
    # "running" here means a process died without a word (SIGKILL, power): resume it too.
    resume = folder.load_state() if previous.get("status") in ("interrupted", "running") else None
    done = resume[1] if resume else (0, 0, 0.0)
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
    }
    last_step: list[optimize.Step] = []

    def record(step: optimize.Step):
        folder.append_trace(runs.trace_row(step))
        last_step[:] = [step]
        if cfg.checkpoint_every and step.iteration % cfg.checkpoint_every == 0:
            folder.save_checkpoint(step.image, _done(step), text)
            metrics.update(iterations=step.iteration, evaluations=step.evaluations,
                           seconds=round(step.seconds, 3), loss={"total": step.total, **step.terms})
            folder.write_metrics(metrics)
        if on_step is not None:
            on_step(step)

    try:
        folder.start(config.to_dict(cfg), {"run_id": job.run_id, "config_hash": digest,
                                           **autodiff.environment()}, done[0])
        folder.write_metrics(metrics)
        content = images.load_image(cfg.content, tuple(cfg.background))
        styles = [images.load_image(p, tuple(cfg.background)) for p in cfg.style]
        init = images.load_image(cfg.init, tuple(cfg.background)) if _is_file(cfg.init) else None
        result, weights = stylize(cfg, content, styles, init, record, should_stop, resume)
    except Exception as e:  # one run's failure, whatever it is, must not end a batch
        metrics.update(status="failed", error=_one_line(e), traceback=traceback.format_exc())
        if folder.path.exists():
            folder.write_metrics(metrics)
        return Outcome(job.run_id, "failed", folder, _one_line(e))

    status = _STATUS[result.reason]
    folder.save_result(result.image, text)
    if status == "interrupted" and last_step:
        folder.save_checkpoint(last_step[0].image, _done(last_step[0]), text)
    metrics.update(
        status=status,
        stop_reason=result.reason,
        message=result.message,
        weights=weights,
        iterations=result.iterations,
        evaluations=result.evaluations,
        seconds=round(result.seconds, 3),
        initial_loss=metrics["initial_loss"] or result.initial,
        loss=result.final or metrics["loss"],
        result=str(folder.result),
    )
    if status == "failed":
        metrics["error"] = result.message
    folder.write_metrics(metrics)
    return Outcome(job.run_id, status, folder, result.message)


def _done(step: optimize.Step) -> tuple[int, int, float]:
    return step.iteration, step.evaluations, step.seconds


def _is_file(init: str) -> bool:
    return init not in config.INIT_KINDS


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if text else type(e).__name__
