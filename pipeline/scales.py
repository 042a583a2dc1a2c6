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

from dataclasses import dataclass

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
