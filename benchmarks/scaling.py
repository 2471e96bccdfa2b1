"""How a W1 meta-step's cost grows with the number of tasks and with the inner steps.

Two sweeps of the sinusoid workload, each point timed like the workloads (interleaved rounds,
medians): tasks T = 1..256 at 5 inner steps, and inner steps 1..50 at T = 25.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Sequence

from . import maml, sinusoid
from .paths import BATCHED, FUNC, FUNC_AUTOGRAD, HIGHER, LEGACY
from .timing import interleaved

PATHS = (HIGHER, LEGACY, BATCHED, FUNC, FUNC_AUTOGRAD)
TASKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEPS = (1, 2, 5, 10, 20, 50)
QUICK_TASKS = (1, 4)
QUICK_STEPS = (1, 3)


def sweep(axis: str, values: Sequence[int], rounds: int, log=print) -> dict:
    """Median ms of every path at each value of ``axis`` ("tasks" or "steps")."""
    medians: Dict[str, List[float]] = {name: [] for name in PATHS}
    for value in values:
        sizes = replace(sinusoid.FULL, **{axis: value})
        paths = maml.build(sinusoid.problem(sizes), PATHS)
        samples = interleaved({name: p.step for name, p in paths.items()}, rounds)
        for name in PATHS:
            medians[name].append(1e3 * samples.median(name))
        shown = ", ".join(f"{name} {medians[name][-1]:.1f}" for name in PATHS)
        log(f"  {axis}={value}: {shown} ms")
    fixed = {"tasks": sinusoid.FULL.steps, "steps": sinusoid.FULL.tasks}[axis]
    other = "steps" if axis == "tasks" else "tasks"
    return {"axis": axis, "values": list(values), other: fixed, "median_ms": medians}
