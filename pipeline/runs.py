"""A run's folder: `<output_dir>/<name>/<run_id>/` with result.png, config.yaml,
metrics.json, trace.jsonl and checkpoints/. Every file but the trace is replaced atomically,
so a kill at any moment leaves the last whole version; the trace is append-only and a torn
last line is dropped when it is read."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import socket
import time
import zipfile
from pathlib import Path

import numpy as np

from pipeline import config, images

STATUSES = ("running", "completed", "failed", "interrupted")


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.result = self.path / "result.png"
        self.video = self.path / "result.mp4"  # a clip's result, assembled from frames/
        self.frames = self.path / "frames"  # a clip's frames, 000001.png, ... (video/clip.py)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.json"
        self.trace = self.path / "trace.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.state = self.checkpoints / "state.npz"  # the latest iterate, float32, to resume
        # Outside the run's folder, so that taking the lock creates nothing inside it.
        self.lock = self.path.parent / ".locks" / self.path.name

    @classmethod
    def for_config(cls, cfg: config.Config, run_id: str) -> RunFolder:
        return cls(experiment_dir(cfg) / run_id)

    # ---------------------------------------------------------------- reading

    def read_metrics(self) -> dict | None:
        try:
            return json.loads(self.metrics.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def read_trace(self) -> list[dict]:
        rows = []
        try:
            lines = self.trace.read_text().splitlines()
        except FileNotFoundError:
            return rows
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: it and anything after it is not trusted
        return rows

    def frame(self, position: int) -> Path:
        """Where a clip's frame `position` (1, 2, ... in the clip's order) is saved."""
        return self.frames / f"{position:06d}.png"

    def saved_frames(self) -> list[Path]:
        """A clip's frames saved so far, in order (the last may be one under way)."""
        return sorted(self.frames.glob("[0-9]*.png"))

    def load_state(self) -> dict | None:
        """The latest checkpoint's state, or None: a dict of its named arrays, at least
        `image` (float32), `iteration`, `evaluations`, `seconds` and `stage`, plus whatever
        else was saved with it (save_checkpoint's `extra`)."""
        try:
            with np.load(self.state) as saved:
                state = {key: saved[key] for key in saved.files}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None  # missing, or torn by a kill: the caller starts the run again
        if not {"image", "iteration", "evaluations", "seconds"} <= state.keys():
            return None
        state["image"] = state["image"].astype(np.float32)
        state.setdefault("stage", np.int64(1))  # saved before coarse to fine existed
        return state

    # ---------------------------------------------------------------- writing

    def start(self, resolved: dict, provenance: dict, resume_from: int) -> None:
        """Create the folder, write config.yaml, and cut the trace back to the checkpoint
        the run resumes from (iterations after it will be run again)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path, self.checkpoints)
        images.atomic_write(self.config, config.to_yaml({**resolved, "provenance": provenance}))
        kept = [row for row in self.read_trace() if row["iteration"] <= resume_from]
        images.atomic_write(self.trace, "".join(json.dumps(row) + "\n" for row in kept))

    def write_metrics(self, metrics: dict) -> None:
        images.atomic_write(self.metrics, json.dumps(metrics, indent=2) + "\n")

    def append_trace(self, row: dict) -> None:
        with open(self.trace, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save_checkpoint(self, image: np.ndarray, done: tuple[int, int, float], text: dict,
                        extra: dict | None = None, label: str = "",
                        metrics: dict | None = None) -> None:
        """A PNG to look at (`<label>iter_<iteration>.png`), and the state to resume from:
        the float image, the counts and `extra` named arrays (the stage, an optimiser's
        memory), written after the PNG, so the state never points past a missing image; then
        `metrics`, if given, as metrics.json at that point."""
        iteration, evaluations, seconds = done
        images.save_png(self.checkpoints / f"{label}iter_{iteration:06d}.png", image, text)
        # Streamed into the file, one array at a time (np.savez converts each on its turn
        # and writes it in chunks): an optimiser's memory can be most of a run's, and a copy
        # of it all in memory first (a BytesIO, then its bytes) raised the peak by twice its
        # size (1284 MB for lbfgs's 630 MB at 512 px, history 100; 17 MB streamed).
        with images.atomic_open(self.state) as f:
            np.savez(f, **(extra or {}), image=image.astype(np.float32), iteration=iteration,
                     evaluations=evaluations, seconds=seconds)
        if metrics is not None:
            self.write_metrics(metrics)

    def remove_state(self) -> None:
        """state.npz is for resuming an unfinished run; a finished one needs none (and an
        lbfgs state holds 2 x history images: 630 MB at 512 px with history 100)."""
        self.state.unlink(missing_ok=True)

    def save_result(self, image: np.ndarray, text: dict) -> None:
        images.save_png(self.result, image, text)


def remove_stale_temporaries(*folders: Path) -> None:
    """A kill during an atomic write leaves its temporary file (`.<name>.<random>.tmp`)
    beside the intact original; the next holder of the folder's lock clears them away."""
    for folder in folders:
        for stale in Path(folder).glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def experiment_dir(cfg: config.Config) -> Path:
    return Path(os.path.abspath(cfg.output_dir)) / config.slug(cfg.name)


def trace_row(step) -> dict:
    """One line of trace.jsonl for an optimize.Step."""
    return {
        "iteration": step.iteration,
        "evaluations": step.evaluations,
        "seconds": round(step.seconds, 4),
        "total": step.total,
        **step.terms,
        "stage": step.stage,
        "size": step.size,  # the stage's long side
        "tile": step.tile,  # the stage's tile core in px; null: whole
    }


# --------------------------------------------------------------------------- locks


class Locked(RuntimeError):
    """Another process holds the lock; the message says which."""


class Lock:
    """An exclusive lock on a file, held while the `with` block runs.

    flock is released by the kernel when its holder dies, SIGKILL included, so a crash never
    leaves a stale lock behind. The holder writes who it is into the file for the message.
    """

    def __init__(self, path, what: str, wait: float = 0):
        self.path, self.what, self.wait, self.fd = Path(path), what, wait, None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = _holder_text(fd)
                os.close(fd)
                raise Locked(f"{self.what} is in use by {holder}") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


def experiment_lock(exp_dir) -> Lock:
    """The lock a `run` holds on its experiment. `status` and `--dry-run` look at it with a
    momentary shared flock (holder_of); a starting run waits such a look out rather than
    mistaking it for another run."""
    return Lock(Path(exp_dir) / ".lock", f"experiment {exp_dir}", wait=2)


def _holder_text(fd: int) -> str:
    return os.read(fd, 500).decode(errors="replace").strip() or "another process"


def holder_of(path) -> str | None:
    """Who holds the lock at `path` (the text its holder wrote), or None if nobody does.
    Takes nothing: a shared flock conflicts with the holder's exclusive one, and is dropped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(fd)
    finally:
        os.close(fd)  # closing drops a shared lock we got
    return None


# --------------------------------------------------------------------------- experiments
# An experiment is `<output_dir>/<name>/`: its runs' folders, plan.json (the runs the last
# command planned, so that runs not yet started are known), runs.csv and experiment.log.


def write_plan(exp_dir: Path, jobs: list[dict], workers: int) -> None:
    """jobs: [{"run_id", "label", "iterations"}] in the order they run."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    images.atomic_write(exp_dir / "plan.json",
                        json.dumps({"workers": workers, "runs": jobs}, indent=2) + "\n")


def read_plan(exp_dir: Path) -> dict:
    try:
        return json.loads((Path(exp_dir) / "plan.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"workers": 1, "runs": []}


def experiment_rows(exp_dir: Path) -> list[dict]:
    """One row per run of the experiment's plan (the runs the last command planned), from
    each run's metrics.json (the source of truth); runs not started yet are `pending`, and
    runs marked `running` that no process holds are `killed` (SIGKILL, the OOM killer).
    Folders of runs an edited config no longer plans are left out (see unplanned_runs); with
    no plan at all, every run folder found is a row."""
    exp_dir = Path(exp_dir)
    planned = {job["run_id"]: job for job in read_plan(exp_dir)["runs"]}
    rows = []
    for run_id in planned or _run_folders(exp_dir):
        folder = RunFolder(exp_dir / run_id)
        metrics = folder.read_metrics() or {}
        job = planned.get(run_id, {})
        loss = metrics.get("loss") or {}
        status = metrics.get("status", "pending")
        if status == "running" and holder_of(folder.lock) is None:
            status = "killed"
        result = next((p for p in (folder.video, folder.result) if p.exists()), "")
        rows.append({
            "run_id": run_id,
            "status": status,
            "swept": job.get("label", metrics.get("swept", {})),
            "total": loss.get("total"),
            "content": loss.get("content"),
            "style": loss.get("style"),
            "tv": loss.get("tv"),
            "iterations": metrics.get("iterations", 0),
            "planned_iterations": job.get("iterations"),
            "seconds": metrics.get("seconds"),
            "result": str(result),  # a clip's is result.mp4, once its last frame is done
            "error": metrics.get("error", ""),
            "folder": folder,
            # A clip's frames: done and in all (None for an image run).
            "frames_done": metrics.get("frames_done", 0),
            "frames_total": metrics.get("frames_total", job.get("frames")),
        })
    return rows


def _run_folders(exp_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in Path(exp_dir).glob("*/metrics.json"))


def unplanned_runs(exp_dir: Path) -> list[str]:
    """Run folders the current plan does not name: runs of an earlier version of the config
    (a changed value or an edited image gives a new run id). Kept, never deleted."""
    planned = {job["run_id"] for job in read_plan(exp_dir)["runs"]}
    return [run_id for run_id in _run_folders(exp_dir) if planned and run_id not in planned]


TABLE_COLUMNS = ("run_id", "status", "total", "content", "style", "tv", "iterations", "seconds",
                 "result", "error")
# The loss terms get a suffix in the header: `content` and `style` are also swept keys (the
# images of a glob batch), and a column name must say which it is.
_HEADER = {term: f"{term}_loss" for term in ("total", "content", "style", "tv")}


def write_table(exp_dir: Path) -> list[dict]:
    """Rewrite runs.csv whole (atomically) from the runs' metrics; returns the rows."""
    rows = experiment_rows(exp_dir)
    swept = sorted({key for row in rows for key in row["swept"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*TABLE_COLUMNS[:2], *swept, *(_HEADER.get(c, c) for c in TABLE_COLUMNS[2:])])
    for row in rows:
        values = [row["swept"].get(key, "") for key in swept]
        writer.writerow([row["run_id"], row["status"], *values,
                         *("" if row[c] is None else row[c] for c in TABLE_COLUMNS[2:])])
    images.atomic_write(Path(exp_dir) / "runs.csv", buffer.getvalue())
    return rows


def progress_of(row: dict) -> int:
    """Iterations done: metrics lag behind a running run (written at checkpoints); its trace
    does not."""
    if row["status"] == "running":
        trace = row["folder"].read_trace()
        if trace and "frame" in trace[-1]:  # a clip: each frame numbers its own iterations
            last = {r["frame"]: r["iteration"] for r in trace}
            return max(row["iterations"], sum(last.values()))
        if trace:
            return max(row["iterations"], trace[-1]["iteration"])
    return row["iterations"]
