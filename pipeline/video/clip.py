"""A clip run: its frames stylised one after another in the run's folder, each with a life of
its own (life.RunLife over a FrameFolder), then assembled into result.mp4.

    <run>/frames/000001.png ...   each frame's result (the lowest loss of its parts)
    <run>/result.mp4              assembled once the last frame is done (H.264, yuv420p)
    <run>/trace.jsonl             one row per iteration of every frame, with a `frame` column
    <run>/metrics.json            the clip's totals, and `frames`: one entry per frame
    <run>/checkpoints/            frame000003_iter_000050.png, ...; state.npz with `frame`

Frame 1 is stylised as an image is (from `init`, for video.first_iterations). Each later frame
i starts from the previous stylised frame warped onto it along the optical flow (video.init)
and adds the temporal term towards it (and towards frames i-2, i-4, ... with long_term),
weighed per pixel by Ruder's consistency check. Flows come from the experiment's cache
(cache.py): a sweep computes them once.

The previous frames are always read back from their saved PNGs, never kept from memory: a clip
resumed after a kill then sees exactly the pixels an uninterrupted one saw, so with lbfgs or
adam the two are bit for bit the same. A completed frame is never run again; an interrupted
one resumes from its checkpoint; a failed one starts again, the frames before it kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline import color, config, images, life, runs, scales
from pipeline.video import cache, flow, frames, plan, temporal

log = logging.getLogger("pipeline")

# A frame's entry in metrics.json keeps these of its life's metrics (the rest is the clip's).
_FRAME_KEYS = ("status", "iterations", "evaluations", "seconds", "initial_loss", "loss",
               "resumed_from", "stop_reason", "message", "error")


# --------------------------------------------------------------------------- metrics


class ClipRecord:
    """The clip's metrics.json: one entry per frame started, the totals over them, and the
    clip's status. Frame lives write their metrics through it (FrameFolder.write_metrics)."""

    def __init__(self, run: life.RunLife, clip: plan.Clip):
        self.folder, self.clip = run.folder, clip
        previous = run.folder.read_metrics() or {}
        kept = previous.get("frames") if previous.get("frames_total") == clip.count else None
        self.entries: dict[int, dict] = {e["frame"]: e for e in kept or []}
        info = clip.info
        self.metrics = {
            **run.names(),
            "frames_done": 0,
            "frames_total": clip.count,
            "clip": {"source": info.source, "source_frames": info.count,
                     "shape": list(info.shape), "fps": clip.fps,
                     "indices": [clip.indices.start, clip.indices.stop, clip.indices.step]},
        }

    def done(self) -> int:
        """Frames done, from the first: completed, with their PNG. A frame after one that is
        not done depends on it, so it is done again."""
        count = 0
        while (self.entries.get(count + 1, {}).get("status") == "completed"
               and self.folder.frame(count + 1).is_file()):
            count += 1
        return count

    def frame_metrics(self, position: int) -> dict | None:
        return self.entries.get(position)

    def set_frame(self, position: int, metrics: dict, **extra) -> None:
        """A frame's metrics (its life's, or extra values of the clip's), written at once."""
        entry = self.entries.setdefault(position, {"frame": position,
                                                   "source": self._source(position)})
        if metrics.get("status") not in (None, "failed"):
            entry.pop("error", None)  # a frame failed before, started again
        entry.update({k: metrics[k] for k in _FRAME_KEYS if k in metrics}, **extra)
        status = entry["status"]
        if status in ("failed", "interrupted", "running"):
            self.metrics["status"] = status
        if status == "failed":
            self.metrics["error"] = f"frame {position}: {metrics.get('error', '')}"
            if "traceback" in metrics:
                self.metrics["traceback"] = metrics["traceback"]
        elif status == "running":
            self.metrics.pop("error", None)
            self.metrics.pop("traceback", None)
        if "weights" in metrics:
            self.metrics["weights"] = metrics["weights"]
        self.write()

    def _source(self, position: int):
        """Which source frame this is: a video's frame index (0-based), a sequence's file."""
        index = self.clip.indices[position - 1]
        files = self.clip.info.files
        return index if files is None else os.path.basename(files[index])

    def write(self, **changes) -> None:
        self.metrics.update(changes)
        entries = [self.entries[k] for k in sorted(self.entries)]
        done = [e for e in entries if e["status"] == "completed"]
        totals = {key: sum(e.get(key) or 0 for e in entries)
                  for key in ("iterations", "evaluations", "seconds")}
        totals["seconds"] = round(totals["seconds"], 3)
        first = self.entries.get(1, {})
        flicker = [e["warping_error"] for e in done if e.get("warping_error") is not None]
        self.metrics.update(
            frames_done=len(done), **totals,
            initial_loss=first.get("initial_loss"),
            # Each term's mean over the frames done: a clip's loss, comparable across sweeps.
            loss=_mean_terms([e["loss"] for e in done if e.get("loss")]),
            warping_error=round(float(np.mean(flicker)), 4) if flicker else None,
            frames=entries)
        self.folder.write_metrics(self.metrics)


def _mean_terms(losses: list[dict]) -> dict | None:
    if not losses:
        return None
    terms = dict.fromkeys(k for loss in losses for k in loss)
    return {k: float(np.mean([loss[k] for loss in losses if k in loss])) for k in terms}


class FrameFolder(runs.RunFolder):
    """One frame's view of the clip's run folder, for its RunLife: the frame's PNG as the
    result, its metrics an entry of the clip's, its trace rows marked with the frame, its
    checkpoints named after it and its state holding its number (a state of another frame is
    none of its business)."""

    def __init__(self, record: ClipRecord, position: int):
        super().__init__(record.folder.path)
        self.record, self.position = record, position
        self.result = self.frame(position)

    def read_metrics(self) -> dict | None:
        return self.record.frame_metrics(self.position)

    def load_state(self) -> dict | None:
        state = super().load_state()
        if state is None or int(state.get("frame", -1)) != self.position:
            return None
        return state

    def start(self, resolved: dict, provenance: dict, resume_from: int) -> None:
        """As RunFolder.start, the trace cut back within this frame only: the rows of the
        frames before it stay, and the file is rewritten only when a row goes."""
        self.frames.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        runs.remove_stale_temporaries(self.path, self.checkpoints, self.frames)
        images.atomic_write(self.config, config.to_yaml({**resolved, "provenance": provenance}))
        rows = self.read_trace()
        kept = [row for row in rows if row.get("frame", 0) < self.position
                or (row.get("frame") == self.position and row["iteration"] <= resume_from)]
        if len(kept) != len(rows) or not self.trace.exists():
            images.atomic_write(self.trace, "".join(json.dumps(r) + "\n" for r in kept))

    def write_metrics(self, metrics: dict) -> None:
        self.record.set_frame(self.position, metrics)

    def append_trace(self, row: dict) -> None:
        super().append_trace({"frame": self.position, **row})

    def save_checkpoint(self, image, done, text, extra=None, label="", metrics=None) -> None:
        super().save_checkpoint(image, done, text, {**(extra or {}), "frame": self.position},
                                f"frame{self.position:06d}_{label}", metrics)

    def remove_checkpoint_images(self) -> None:
        """A frame done needs its checkpoint PNGs no more (frames/ has its result): a long
        clip would otherwise leave thousands."""
        for png in self.checkpoints.glob(f"frame{self.position:06d}_*.png"):
            png.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the run


def run(run: life.RunLife, clip: plan.Clip | None, on_step, should_stop, environment, inputs):
    """Stylise every frame not done yet, in order, then assemble result.mp4. `environment()`
    and `inputs(cfg)` are jobs.py's (provenance; the styles and masks). Returns the clip's
    status and a message: completed, interrupted (a stop: the same command resumes), or failed
    (the frames before the failed one are kept); jobs.run_one makes it the run's Outcome."""
    cfg, record = run.cfg, None
    try:
        run.folder.path.mkdir(parents=True, exist_ok=True)
        clip = clip or plan.check(cfg)  # planned in another process: checked there
        record = ClipRecord(run, clip)
        env = environment()
        loaded = inputs(cfg)
        from pipeline import autodiff, model  # the framework: loaded by the run's process

        # One network for every frame, and one compile for every frame of one kind (the
        # first, the others: each frame's targets are arguments, autodiff.Shared).
        network = model.feature_extractor(cfg.model, cfg.seed)
        status, message = _frames(run, record, clip, loaded, env,
                                  (network, autodiff.Shared()), on_step, should_stop)
        if status == "completed":
            folder = run.folder
            size = assemble(folder.saved_frames()[:clip.count], folder.video, clip.fps)
            record.write(status="completed", result=str(folder.video), video_size=list(size))
            message = f"{clip.count} frames"
        elif status == "interrupted":
            record.write(status="interrupted")
    except Exception as e:  # noqa: BLE001 - one run's failure must not end a batch
        message = life.describe_error(e, cfg)
        try:  # the frames done are kept: a failed clip goes on from them next time
            if record is not None:
                record.write(status="failed", error=message)
            elif run.folder.read_metrics():
                life.mark_failed(run.folder, message)
            else:
                run.fail(e)
        except OSError as again:
            log.error("%s: cannot record its failure: %s", run.run_id, again)
        return "failed", message
    return status, message


def _frames(run, record: ClipRecord, clip: plan.Clip, loaded: dict, env: dict, compute,
            on_step, should_stop) -> tuple[str, str]:
    """The frames not done, in order; (the clip's status, a message) when they end.
    `compute`: the network and the compiled functions (autodiff.Shared) every frame uses."""
    cfg, video = run.cfg, run.cfg.video
    done = record.done()
    if done == clip.count:
        return "completed", ""
    flows = cache.FlowCache(run.folder.path.parent / "flows", video.flow)
    reach = max(video.long_term)
    first = max(1, done + 1 - reach)  # the content frames the next frame's flows need
    window: dict[int, tuple[np.ndarray, str]] = {}
    for position, (_, raw) in enumerate(frames.read_frames(clip.info, clip.indices[first - 1:]),
                                        start=first):
        content = images.resize_long_side(raw, cfg.size)
        window[position] = content, cache.frame_key(content)
        window.pop(position - reach - 1, None)
        if position <= done:
            continue
        if should_stop():
            return "interrupted", "stopped on request"
        status, message = _frame(run, record, clip, position, window, flows, loaded, env,
                                 compute, on_step, should_stop)
        if status != "completed":
            return status, message
    return "completed", ""


def _frame(run, record, clip, position, window, flows, loaded, env, compute, on_step,
           should_stop) -> tuple[str, str]:
    """One frame: its temporal targets and start from the saved frames before it, then its
    own life (start or resume, record, finish). Returns its status and message."""
    from pipeline.stylize import stylize

    cfg, video = run.cfg, run.cfg.video
    began = time.perf_counter()
    content, key = window[position]
    iterations = (config.first_iterations(video, cfg.optimizer) if position == 1
                  else cfg.optimizer.iterations)
    frame_cfg = dataclasses.replace(
        cfg, optimizer=dataclasses.replace(cfg.optimizer, iterations=iterations))
    folder = FrameFolder(record, position)
    frame_life = life.RunLife(folder, run.run_id, run.label, cfg,
                              stages=scales.stages(frame_cfg))
    extra: dict = {}
    temporal_args, x0, previous = None, loaded["init_image"], None
    if position > 1:
        # d = 1 always: the start image and the flicker metric need it.
        distances = sorted({1, *(d for d in video.long_term if position - d >= 1)})
        got = {d: flows.get(content, window[position - d][0], key, window[position - d][1])
               for d in distances}
        extra.update(flow_seconds=round(time.perf_counter() - began, 4),
                     flows_cached=all(c for _, _, c in got.values()))
        saved = {d: images.load_image(run.folder.frame(position - d)) for d in distances}
        used = [d for d in distances if d in video.long_term]
        backward = [got[d][0] for d in used]
        weights = [got[d][1] if video.consistency else flow.warp(saved[d], got[d][0])[1]
                   .astype(np.float32) for d in used]
        warped, c = temporal.targets([saved[d] for d in used], backward, weights)
        if cfg.preserve_colors == "luminance":  # the optimiser's image is grey (Y, Y, Y)
            warped = np.repeat(color.luminance(warped)[..., None], 3, axis=-1)
        temporal_args = warped, c, video.temporal_weight
        previous = saved[1], got[1]
        x0 = {"prev_warped": lambda: flow.prev_warped(saved[1], got[1][0], content),
              "prev": lambda: saved[1], "content": lambda: content}[video.init]()
    base = plan.total_iterations(cfg, position - 1)  # the run's numbering, for progress

    def record_step(step):
        frame_life.record(step)
        if on_step is not None:
            on_step(dataclasses.replace(step, iteration=base + step.iteration))

    try:
        start = frame_life.start(env)
        record.set_frame(position, {}, **extra)
        result, weights = stylize(frame_cfg, content, loaded["styles"], init_image=x0,
                                  on_step=record_step, should_stop=should_stop, start=start,
                                  style_masks=loaded["style_masks"],
                                  content_mask=loaded["content_mask"], network=compute[0],
                                  temporal=temporal_args, shared=compute[1])
        status = frame_life.finish(result, weights)
    except Exception as e:  # noqa: BLE001 - recorded as the frame's (and the clip's) failure
        return "failed", frame_life.fail(e)
    if status == "completed":
        if previous is not None:  # flicker: this frame against the one before, both as saved
            (saved_previous, (backward_1, reliable_1, _)) = previous
            extra["warping_error"] = round(temporal.warping_error(
                images.load_image(folder.result), saved_previous, backward_1, reliable_1), 4)
        extra["wall_seconds"] = round(time.perf_counter() - began, 3)
        record.set_frame(position, {}, **extra)
        folder.remove_checkpoint_images()
    return status, result.message


# --------------------------------------------------------------------------- result.mp4


def retime(run: life.RunLife, clip: plan.Clip) -> bool:
    """A completed clip asked for at another video.fps (which changes no frame, so not the run
    id): result.mp4 assembled again at that rate, its metrics and config.yaml updated. Returns
    whether it was."""
    metrics = run.folder.read_metrics() or {}
    if metrics.get("clip", {}).get("fps") == clip.fps:
        return False
    with runs.Lock(run.folder.lock, f"run {run.run_id}", wait=120):
        assemble(run.folder.saved_frames()[:clip.count], run.folder.video, clip.fps)
        metrics["clip"]["fps"] = clip.fps
        run.folder.write_metrics(metrics)
        saved = yaml.safe_load(run.folder.config.read_text()) or {}
        saved.setdefault("video", {})["fps"] = run.cfg.video.fps
        images.atomic_write(run.folder.config, config.to_yaml(saved))
    log.info("%s: already completed; result.mp4 assembled again at %g fps", run.run_id, clip.fps)
    return True


def assemble(paths: list[Path], out: Path, fps: float) -> tuple[int, int]:
    """The frames as an H.264 video (yuv420p, which players expect), written atomically.
    yuv420p halves the colour resolution, so width and height must be even: an odd one loses
    its last column or row here (frames/ keeps every pixel). Returns (width, height)."""
    import imageio_ffmpeg

    frames._ffmpeg(str(out))  # its one-line error if there is no ffmpeg
    first = images.load_image(paths[0])
    h, w = first.shape[0] // 2 * 2, first.shape[1] // 2 * 2
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # cleared by the next start if torn
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (w, h), fps=fps, codec="libx264", quality=None, macro_block_size=1,
        output_params=["-f", "mp4", "-crf", "18", "-movflags", "+faststart"])
    try:
        writer.send(None)
        for path in paths:
            pixels = np.clip(np.rint(images.load_image(path)[:h, :w]), 0, 255).astype(np.uint8)
            writer.send(np.ascontiguousarray(pixels))
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return w, h
