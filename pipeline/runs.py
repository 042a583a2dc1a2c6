"""A run's folder: `<output_dir>/<name>/<run_id>/` with result.png, config.yaml,
metrics.json, trace.jsonl and checkpoints/. Every file but the trace is replaced atomically,
so a kill at any moment leaves the last whole version; the trace is append-only and a torn
last line is dropped when it is read."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from pipeline import config, images

STATUSES = ("running", "completed", "failed", "interrupted")


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.result = self.path / "result.png"
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.json"
        self.trace = self.path / "trace.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.state = self.checkpoints / "state.npz"  # the latest iterate, float32, to resume

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

    def load_state(self) -> tuple[np.ndarray, tuple[int, int, float]] | None:
        """The latest checkpoint: (image, (iterations, evaluations, seconds)), or None."""
        try:
            with np.load(self.state) as state:
                done = (int(state["iteration"]), int(state["evaluations"]), float(state["seconds"]))
                return state["image"].astype(np.float32), done
        except (FileNotFoundError, OSError, KeyError, ValueError):
            return None

    # ---------------------------------------------------------------- writing

    def start(self, resolved: dict, provenance: dict, resume_from: int) -> None:
        """Create the folder, write config.yaml, and cut the trace back to the checkpoint
        the run resumes from (iterations after it will be run again)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        images.atomic_write(self.config, config.to_yaml({**resolved, "provenance": provenance}))
        kept = [row for row in self.read_trace() if row["iteration"] <= resume_from]
        images.atomic_write(self.trace, "".join(json.dumps(row) + "\n" for row in kept))

    def write_metrics(self, metrics: dict) -> None:
        images.atomic_write(self.metrics, json.dumps(metrics, indent=2) + "\n")

    def append_trace(self, row: dict) -> None:
        with open(self.trace, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save_checkpoint(self, image: np.ndarray, done: tuple[int, int, float], text: dict) -> None:
        """A PNG to look at, and the float state to resume from (written after the PNG, so
        the state never points past an image that is missing)."""
        iteration, evaluations, seconds = done
        images.save_png(self.checkpoints / f"iter_{iteration:06d}.png", image, text)
        buffer = io.BytesIO()
        np.savez(buffer, image=image.astype(np.float32), iteration=iteration,
                 evaluations=evaluations, seconds=seconds)
        images.atomic_write(self.state, buffer.getvalue())

    def save_result(self, image: np.ndarray, text: dict) -> None:
        images.save_png(self.result, image, text)


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
    }
