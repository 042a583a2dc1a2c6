"""One job: a planned run (Planned), how it ended (Outcome), and running it in its folder.

`run_one` is what every executor calls, in this process, in a worker or in a Ray task: it
skips a completed run, takes the run's lock, loads the images, and runs stylize with the run's
life (life.RunLife) recording every step. Each run is a function of its resolved config and its
folder: an interrupted one resumes from its last checkpoint, a failed one starts again, and one
run's failure is recorded and never ends the others.

TensorFlow is imported only when a run starts (framework.load), so that planning, the parent
of a worker pool, `status` and `report` stay light.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pipeline import config, images, life, optimize, runs, scales

log = logging.getLogger("pipeline")


@dataclass
class Planned:
    run_id: str
    label: dict  # the values that set this run apart from its siblings
    cfg: config.Config
    estimate: str = ""  # the memory and time estimate, logged when the run starts
    clip: object = None  # a clip's video.plan.Clip, checked when planned; None for an image


@dataclass
class Outcome:
    run_id: str
    status: str  # completed | failed | interrupted | skipped
    folder: runs.RunFolder
    message: str = ""


def plan(cfg: config.Config) -> list[Planned]:
    """The runs a config describes; each clip is checked here (ConfigError naming its file)."""
    from pipeline.video import plan as clips

    return [Planned(config.run_id(c, label), label, c, clip=clips.check(c) if c.video else None)
            for label, c in config.expand(cfg)]


def total_iterations(job: Planned) -> int:
    """The iterations of the whole run: every stage's, or every frame's of a clip."""
    if job.clip is not None:
        from pipeline.video import plan as clips

        return clips.total_iterations(job.cfg, job.clip.count)
    return scales.total_iterations(job.cfg)


def folder_of(job: Planned) -> runs.RunFolder:
    return runs.RunFolder.for_config(job.cfg, job.run_id)


def run_one(
    job: Planned,
    on_step: Callable[[optimize.Step], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    lock: bool = True,
) -> Outcome:
    """Run, resume or skip one run in its folder, holding the run's lock while it works.
    A completed run is left untouched: not a file in its folder is written again.
    `lock=False`: the caller alone owns the run (a cluster whose file system has no flock)."""
    run = life.RunLife(folder_of(job), job.run_id, job.label, job.cfg)
    if run.completed():
        if job.clip is not None:  # video.fps is no part of the id: a new one re-times it
            from pipeline.video import clip as clips

            clips.retime(run, job.clip)
        return Outcome(job.run_id, "skipped", run.folder, "already completed")
    if job.estimate:
        log.info("%s: %s", job.run_id, job.estimate)
    if not lock:
        return _run(run, on_step, should_stop, job.clip)
    try:
        # Waits for a run still held by a dying process (an orphaned worker saving its state).
        with runs.Lock(run.folder.lock, f"run {job.run_id}", wait=120):
            return _run(run, on_step, should_stop, job.clip)
    except runs.Locked as e:
        return Outcome(job.run_id, "failed", run.folder, str(e))


def _run(run: life.RunLife, on_step, should_stop, clip=None) -> Outcome:
    from pipeline import framework

    framework.load()  # TensorFlow's start-up lines filtered, in whichever process runs this
    from pipeline.stylize import stylize

    if run.completed():  # finished while we waited for the lock
        return Outcome(run.run_id, "skipped", run.folder, "already completed")
    if run.cfg.video is not None:  # a clip: its frames in order, each a life of its own
        from pipeline.video import clip as clips

        status, message = clips.run(run, clip, on_step, should_stop, _environment, _inputs)
        return Outcome(run.run_id, status, run.folder, message)

    def record(step: optimize.Step) -> None:
        run.record(step)
        if on_step is not None:
            on_step(step)

    try:  # everything up to the last write: a full disk fails this run, not the batch
        start = run.start(_environment())
        inputs = _inputs(run.cfg)
        result, weights = stylize(run.cfg, **inputs, on_step=record, should_stop=should_stop,
                                  start=start)
        status = run.finish(result, weights)
    except Exception as e:  # one run's failure, whatever it is, must not end a batch
        return Outcome(run.run_id, "failed", run.folder, run.fail(e))
    return Outcome(run.run_id, status, run.folder, result.message)


def _inputs(cfg: config.Config) -> dict:
    """The run's images as stylize takes them: content, styles, an init image, masks."""
    background = tuple(cfg.background)
    return {
        # A clip's frames are read one by one as it runs (video/clip.py).
        "content": None if cfg.video else images.load_image(cfg.content, background),
        "styles": [images.load_image(p, background) for p in cfg.style],
        "init_image": (None if cfg.init in config.INIT_KINDS
                       else images.load_image(cfg.init, background)),
        "style_masks": None if cfg.style_masks is None else [
            None if p is None else images.load_mask(p) for p in cfg.style_masks],
        "content_mask": images.load_mask(cfg.content_mask) if cfg.content_mask else None,
    }


def _environment() -> dict:
    """Versions, device and GPU memory settings for the run's provenance; says once per
    process when a GPU sits unused."""
    from pipeline import autodiff, hardware

    env = autodiff.environment()
    hardware.warn_if_gpu_unused(env["backend"], env["device"])
    return {**env, "gpu_memory": hardware.gpu_memory_settings()}


def refuse(job: Planned, message: str) -> Outcome:
    """A run that cannot fit in memory, marked failed without starting (a completed one is
    left alone, an interrupted one keeps its state)."""
    run = life.RunLife(folder_of(job), job.run_id, job.label, job.cfg)
    if run.completed():
        return Outcome(job.run_id, "skipped", run.folder, "already completed")
    run.refuse(message)
    return Outcome(job.run_id, "failed", run.folder, message)
