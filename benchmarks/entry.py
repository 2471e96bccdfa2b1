"""E1: what entering ``innerloop_ctx`` costs, per task, with W1's model and inner optimizer.

Entering patches the model and builds the differentiable optimizer: the fixed cost of every
task before its first inner step. The legacy program enters once per task; a batched one
once for all its tasks. Each path's step enters (and leaves) as often as one W1 meta-step
does, with ``copy_initial_weights=False`` as MAML has it; its time over the tasks is the cost
per task. The paths run interleaved like the meta-steps (``timing.interleaved``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import higher
import torch

import higher_func

from . import sinusoid
from .paths import BATCHED, HIGHER, LEGACY
from .timing import Samples, interleaved


def _per_task(library, model, opt, tasks: int) -> Callable[[], None]:
    def enter_every_task() -> None:
        for _ in range(tasks):
            with library.innerloop_ctx(model, opt, copy_initial_weights=False):
                pass

    return enter_every_task


def _batched(model, opt, tasks: int) -> Callable[[], None]:
    def enter_once() -> None:
        with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=tasks):
            pass

    return enter_once


def paths(tasks: int) -> Dict[str, Callable[[], None]]:
    model = sinusoid.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=sinusoid.FULL.inner_lr)
    return {
        HIGHER: _per_task(higher, model, opt, tasks),
        LEGACY: _per_task(higher_func, model, opt, tasks),
        BATCHED: _batched(model, opt, tasks),
    }


@dataclass
class EntryResult:
    """Every path's seconds per round for entering as often as a meta-step of ``tasks``."""

    samples: Samples
    tasks: int
    workload: str = "E1"
    title: str = "entering innerloop_ctx, W1's MLP and SGD, copy_initial_weights=False"

    def us_per_task(self, path: str) -> float:
        return 1e6 * self.samples.median(path) / self.tasks

    def to_json(self) -> dict:
        return {
            "workload": self.workload,
            "title": self.title,
            "config": {"tasks": self.tasks},
            "us_per_task": {name: self.us_per_task(name) for name in self.samples.seconds},
            "speedup_vs_higher": {
                name: self.samples.speedup(name, HIGHER) for name in self.samples.seconds
            },
            "seconds": self.samples.seconds,
        }

    def table(self) -> str:
        lines = [
            f"{self.workload}: {self.title}, T={self.tasks}",
            f"  {'path':<20} {'us per task':>12} {'vs higher':>10}",
        ]
        for name in self.samples.seconds:
            speedup = self.samples.speedup(name, HIGHER)
            lines.append(f"  {name:<20} {self.us_per_task(name):12.1f} {speedup:9.2f}x")
        return "\n".join(lines)


def measure(tasks: int, rounds: int) -> EntryResult:
    return EntryResult(interleaved(paths(tasks), rounds), tasks)
