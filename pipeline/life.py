"""A run's life in its folder: started or resumed, each step recorded, finished with the
best result of all its parts, or failed. A RunLife is the only writer of a run's folder while
the run runs; whoever runs the optimisation (jobs.run_one for an image, a clip for each of its
frames) hands it the Step records and the Result, and it decides what is written where:

- start: config.yaml, the trace cut back to the checkpoint resumed from, metrics `running`;
- record: a trace row per iteration; at checkpoint iterations a PNG and state.npz (the
  iterate, the stage, the optimiser's state, the run's first loss) and metrics.json;
- finish: result.png, replaced only by an image with a lower loss than any earlier part's,
  its loss in its PNG text; the final metrics; state.npz removed unless the run can resume;
- fail: metrics `failed` with a one-line error.

Light on purpose: no deep-learning framework, so the parent of a worker pool and a Ray driver
may use `mark_failed` and `describe_error` for runs whose process died.
"""

from __future__ import annotations

import json
import logging
import traceback

from pipeline import __version__, config, images, optimize, runs, scales

log = logging.getLogger("pipeline")

# How an optimiser's end maps onto the run's status.
STATUS = {
    optimize.COMPLETED: "completed",
    optimize.CONVERGED: "completed",
    optimize.ABNORMAL: "completed",
    optimize.INTERRUPTED: "interrupted",
    optimize.NON_FINITE: "failed",
}


class RunLife:
    def __init__(self, folder: runs.RunFolder, run_id: str, label: dict, cfg: config.Config,
                 stages: list[scales.Stage] | None = None):
        """`stages`: the run's, by default from cfg; a clip's frame has its own budget (and
        its folder is a view of the clip's: video/clip.py)."""
        self.folder, self.run_id, self.label, self.cfg = folder, run_id, label, cfg
        self.stages = stages or scales.stages(cfg)
        self.digest = config.config_hash(cfg)
        # Written into every PNG of the run: what made it.
        self.text = {"run_id": run_id, "config_hash": self.digest,
                     "software": f"pipeline {__version__}"}
        self.metrics: dict = {}
        self.last_step: optimize.Step | None = None
        self.previous_best: dict | None = None

    def completed(self) -> bool:
        return (self.folder.read_metrics() or {}).get("status") == "completed"

    def names(self) -> dict:
        """What names the run at the head of its metrics.json (a clip's too), while it runs."""
        return {"status": "running", "run_id": self.run_id, "config_hash": self.digest,
                "swept": self.label}

    def start(self, environment: dict) -> scales.Start:
        """Create or take over the folder; returns where the run starts (from the beginning,
        or where its checkpoint says). `environment` goes into config.yaml's provenance."""
        folder, cfg = self.folder, self.cfg
        previous = folder.read_metrics() or {}
        # "running" here means a process died without a word (SIGKILL, power): resume it too.
        unfinished = previous.get("status") in ("interrupted", "running")
        resume = folder.load_state() if unfinished else None
        if unfinished and resume is None:
            log.warning("%s: no readable checkpoint (%s): starting again from the beginning",
                        self.run_id, folder.state)
        start = scales.start_of(self.stages, resume)
        done = start.done
        self.metrics = {
            **self.names(),
            "iterations": done[0],
            "evaluations": done[1],
            "seconds": round(done[2], 3),
            "initial_loss": previous.get("initial_loss") if resume else None,
            "loss": previous.get("loss") if resume else None,
            "resumed_from": done[0] if resume else None,
            "stages": [{"stage": st.index, "size": st.size, "iterations": [st.first, st.last]}
                       for st in self.stages],
            # The tile core of the stage under way (pipeline/tile; null: whole) and its
            # tiles, as its steps report them.
            "tile": previous.get("tile") if resume else None,
            "tiles": previous.get("tiles", 1) if resume else 1,
        }
        # result.png holds the lowest loss seen by any part of the run (its loss is in its
        # text); a resumed part replaces it only with something better.
        self.previous_best = self._result_loss() if resume else None
        folder.start(config.to_dict(cfg), {"run_id": self.run_id, "config_hash": self.digest,
                                           **environment}, done[0])
        folder.write_metrics(self.metrics)
        return start

    def record(self, step: optimize.Step) -> None:
        """One finished iteration: its trace row, and at checkpoint iterations the
        checkpoint and metrics.json."""
        self.folder.append_trace(runs.trace_row(step))
        self.last_step = step
        self.metrics.update(tile=step.tile, tiles=step.tiles)
        # The run's first loss: from its first evaluation, or kept by the checkpoint resumed.
        self.metrics["initial_loss"] = step.initial or self.metrics["initial_loss"]
        every = self.cfg.checkpoint_every
        if every and step.iteration % every == 0:
            self.metrics.update(iterations=step.iteration, evaluations=step.evaluations,
                                seconds=round(step.seconds, 3),
                                loss={"total": step.total, **step.terms})
            save_checkpoint(self.folder, step, self.text, len(self.stages) > 1, self.metrics)

    def finish(self, result: optimize.Result, weights: str) -> str:
        """The optimiser's Result written as the run's end; returns the run's status."""
        folder, metrics = self.folder, self.metrics
        status = STATUS[result.reason]
        best, previous_best = result.final, self.previous_best
        if previous_best and self._result_shape() != result.image.shape[:2]:
            previous_best = None  # an earlier stage's image, smaller: the later stage's wins
        if previous_best and (best is None or previous_best["total"] <= best["total"]):
            best = previous_best  # an earlier part's image is better: keep it
        else:
            best = best or metrics["loss"]  # no evaluation: the checkpoint image, as it was
            folder.save_result(result.image, {**self.text, "loss": json.dumps(best)})
        if status == "interrupted" and self.last_step:
            save_checkpoint(folder, self.last_step, self.text, len(self.stages) > 1)
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
        return status

    def fail(self, error: BaseException) -> str:
        """Record a failure, whatever it was (one run's failure must not end a batch);
        returns its one-line description."""
        message = describe_error(error, self.cfg)
        self.metrics.update(status="failed", error=message, traceback=traceback.format_exc())
        try:
            if self.folder.path.exists():
                self.folder.write_metrics(self.metrics)
                self.folder.remove_state()  # a failed run starts again from the beginning
        except OSError as again:  # the disk that failed the run may refuse this too
            log.error("%s: cannot record its failure in %s: %s", self.run_id,
                      self.folder.metrics, again)
        return message

    def refuse(self, message: str) -> bool:
        """A run that cannot fit in memory, marked failed without starting; its folder holds
        only metrics.json, saying why. An interrupted run keeps its state (with memory
        freed, it resumes) and a completed one is left alone: False then."""
        if self.folder.read_metrics() is not None:
            return False
        with runs.Lock(self.folder.lock, f"run {self.run_id}"):
            self.folder.path.mkdir(parents=True, exist_ok=True)
            self.folder.write_metrics({"status": "failed", "run_id": self.run_id,
                                       "swept": self.label, "iterations": 0, "error": message})
        return True

    def _result_loss(self) -> dict | None:
        """The loss recorded in the run's result.png by an earlier part of the run, if any."""
        try:
            loss = json.loads(images.read_png_text(self.folder.result)["loss"])
        except (images.ImageError, KeyError, ValueError):
            return None
        return loss if isinstance(loss, dict) and "total" in loss else None

    def _result_shape(self) -> tuple[int, int] | None:
        """(height, width) of the run's result.png, from its header."""
        try:
            width, height = images.read_size(self.folder.result)
        except images.ImageError:
            return None
        return height, width


def save_checkpoint(folder: runs.RunFolder, step: optimize.Step, text: dict,
                    staged: bool, metrics: dict | None = None) -> None:
    """A checkpoint of `step`. The stage goes into the state (a resume continues it) and, in
    a run of several stages (`staged`), into the PNG's name: `stage2_iter_000150.png`. So does
    the run's first loss (`initial.<term>`): metrics.json's initial_loss after a kill and a
    resume. Then `metrics`, if given, as metrics.json."""
    label = f"stage{step.stage}_" if staged else ""
    # The optimiser's state too: a device optimiser's (lbfgs, adam) makes its resume exact;
    # scipy's is its best image, which the next stage starts from.
    saved = step.state() if step.state is not None else {}
    extra = {"stage": step.stage, **{scales.STATE_PREFIX + k: v for k, v in saved.items()},
             **{scales.INITIAL_PREFIX + k: v for k, v in (step.initial or {}).items()}}
    folder.save_checkpoint(step.image, (step.iteration, step.evaluations, step.seconds), text,
                           extra, label, metrics)


def mark_failed(folder: runs.RunFolder, message: str) -> None:
    """A run whose process died (a worker killed outright, a Ray task lost) marked failed by
    whoever saw it die; the run's own life could not."""
    metrics = folder.read_metrics()
    if metrics:
        folder.write_metrics({**metrics, "status": "failed", "error": message})


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
