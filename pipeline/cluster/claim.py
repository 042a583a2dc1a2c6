"""The experiment's claim on the cluster, and the driver's stop signal: one named actor.

Its name is taken while the driver lives, so a second driver for the same experiment on the
same cluster is refused, whatever the file system's locks; Ctrl-C or SIGTERM on the driver
sets it, and every task watches it and stops at its next evaluation, saving its run.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from pipeline import runs


class StopFlag:
    """The driver's word to its tasks (an async Ray actor): set once; `wait` answers when it
    is. Tasks never block on it in ray.get: Ray lends a blocked task's CPU to another task,
    so that more runs would share a node than it has room for."""

    def __init__(self):
        self.event = asyncio.Event()

    async def set(self) -> None:
        self.event.set()

    async def is_set(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> bool:
        await self.event.wait()
        return True


def claim(ray, exp: Path, address: str | None):
    """The experiment's stop flag, a named actor on the driver's node; runs.Locked (exit 3)
    when another driver holds it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = "experiment-" + hashlib.sha256(str(exp).encode()).hexdigest()[:24]
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    try:
        flag = ray.remote(StopFlag).options(name=name, num_cpus=0,
                                            scheduling_strategy=here).remote()
        ray.get(flag.is_set.remote())
    except ValueError:  # the name is taken
        raise runs.Locked(f"experiment {exp} is in use by another driver on the Ray "
                          f"cluster at {address or 'this machine'}") from None
    return flag
