"""Coarse to fine: the stages of a run, from `scales` and `scale_iterations`.

Light on purpose (no deep-learning framework): the command line, the workers and the
estimate plan with it before any run starts.

Iterations are numbered across the whole run. Stage k owns the numbers after the budgets of
the stages before it: with `scales: [256, 512]` and 100 iterations each, stage 1 runs
iterations 1..100 and stage 2 runs 101..200. A stage that converges early leaves the rest of
its numbers unused, so an iteration number always names one stage, and a resumed run knows
where each stage starts and ends from the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import Config


@dataclass(frozen=True)
class Stage:
    index: int  # 1, 2, ...
    size: int  # long side of the generated image in this stage
    first: int  # the first iteration number of this stage
    last: int  # its last: the run's iteration count once this stage is done


def stages(cfg: Config) -> list[Stage]:
    """The run's stages in order; one stage at `size` when `scales` is empty."""
    sizes = cfg.scales or [cfg.size]
    budgets = cfg.scale_iterations or [cfg.optimizer.iterations] * len(sizes)
    out, last = [], 0
    for index, (size, budget) in enumerate(zip(sizes, budgets), start=1):
        out.append(Stage(index, size, last + 1, last + budget))
        last += budget
    return out


def total_iterations(cfg: Config) -> int:
    return stages(cfg)[-1].last


def resume_point(plan: list[Stage], stage: int, iteration: int) -> int:
    """The stage (index) a run resumes in, from the stage and iteration of its checkpoint:
    the same stage, or the next one when the checkpoint ended its stage."""
    if not 1 <= stage <= len(plan) or not plan[stage - 1].first - 1 <= iteration <= plan[
            stage - 1].last:
        raise ValueError(f"checkpoint at stage {stage}, iteration {iteration} does not fit "
                         f"this run's stages ({len(plan)}, {plan[-1].last} iterations)")
    if iteration == plan[stage - 1].last and stage < len(plan):
        return stage + 1
    return stage


# A checkpoint keeps an optimiser's state under this prefix, and the run's first loss under
# `initial.` (see life.save_checkpoint).
STATE_PREFIX, INITIAL_PREFIX = "optimizer.", "initial."


@dataclass(frozen=True)
class Start:
    """Where a run starts: at the beginning, or where its checkpoint says."""

    stage: int = 1  # the index of the stage it starts in
    image: np.ndarray | None = field(default=None, repr=False)  # None: the initial image
    inside: bool = False  # resumed inside `stage`: `image` is its own iterate, at its size
    done: tuple[int, int, float] = (0, 0, 0.0)  # iterations, evaluations, seconds so far
    state: dict = field(default_factory=dict, repr=False)  # the optimiser's, inside a stage
    initial: dict | None = None  # the run's first loss, kept by the checkpoint


def start_of(plan: list[Stage], resume: dict | None) -> Start:
    """Where a run with this checkpoint's state (runs.RunFolder.load_state; None: none)
    starts. A checkpoint inside a stage goes on with its own iterate and optimiser state; one
    that ended its stage starts the next stage from that stage's best image, as an
    uninterrupted run does (scipy and the device optimisers keep it; older checkpoints only
    the iterate)."""
    if not resume:
        return Start()
    done = (int(resume["iteration"]), int(resume["evaluations"]), float(resume["seconds"]))
    stage = resume_point(plan, int(resume.get("stage", 1)), done[0])
    inside = done[0] >= plan[stage - 1].first  # else the checkpoint ended the stage before
    state = {k[len(STATE_PREFIX):]: v for k, v in resume.items() if k.startswith(STATE_PREFIX)}
    initial = {k[len(INITIAL_PREFIX):]: float(v) for k, v in resume.items()
               if k.startswith(INITIAL_PREFIX)}
    image = resume["image"] if inside else state.get("best_x", resume["image"])
    return Start(stage, image, inside, done, state if inside else {}, initial or None)
