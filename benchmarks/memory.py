"""Peak tensor memory of a meta-step, counted at PyTorch's CPU allocator.

Method: ``torch.profiler`` with ``profile_memory=True`` records every allocation and every
free that PyTorch's CPU allocator serves, with its size and time: every tensor storage, so
the weights, the activations autograd saves for backward, gradients and optimizer state.
Summing the records in time order gives the bytes of tensor storage alive at each instant,
relative to the start of the measured call; the maximum is the *peak*, the final sum the bytes
the call leaves *retained* (still referenced when it returns).

Why not the process's peak RSS: a W1-size meta-step's whole autograd graph is a few hundred
KB, well below what RSS can resolve (glibc keeps freed pages in its arenas, serves large
blocks with mmap, and the first call of anything maps in code and caches). The allocator
count is exact and deterministic: the same step gives the same bytes on every run, in this
process or a fresh one, so one measurement per configuration is enough. It counts tensor
storage only, not Python objects (higher's per-task patched classes, autograd's graph nodes).

Each configuration is called three times under the profiler: a discarded warm-up (it
allocates the outer Adam state, and makes the allocator's records know the sizes of the
``.grad`` tensors that the next ``zero_grad`` frees), then once with Python's cyclic garbage
collector running as usual (*peak*, *retained*), then once with the collector off
(*peak, no GC*, *retained, no GC*): there only reference counting frees memory, which shows
what reference cycles keep alive until a collection. A collection runs before each call.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import higher
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import higher_func

from . import maml, sinusoid
from .paths import BATCHED, FUNC_AUTOGRAD, HIGHER, LEGACY


def tensor_bytes(fn: Callable[[], object], collector: bool = True) -> Tuple[int, int]:
    """``(peak, retained)`` bytes of tensor storage allocated by one call of ``fn``.

    Args:
        fn: the call to measure.
        collector: whether Python's cyclic garbage collector may run during the call (it
            always runs once before). Off, only reference counting frees memory, which shows
            what reference cycles keep alive.
    """
    from torch._C._profiler import _EventType

    gc.collect()
    if not collector:
        gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        gc.enable()
    sizes = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak, live


@dataclass
class MemoryResult:
    """Bytes per measured configuration: ``{label: {"peak": bytes, "retained": bytes}}``."""

    workload: str
    title: str
    config: dict
    bytes: Dict[str, Dict[str, int]]

    def peak(self, label: str) -> int:
        return self.bytes[label]["peak"]

    def to_json(self) -> dict:
        return {
            "workload": self.workload,
            "title": self.title,
            "config": self.config,
            "bytes": self.bytes,
        }


def _both(fn: Callable[[], object]) -> Dict[str, int]:
    """Both counts, after one discarded call (see the module docstring)."""
    tensor_bytes(fn)
    peak, retained = tensor_bytes(fn)
    peak_no_gc, retained_no_gc = tensor_bytes(fn, collector=False)
    return {
        "peak": peak,
        "retained": retained,
        "peak_no_gc": peak_no_gc,
        "retained_no_gc": retained_no_gc,
    }


def tracked(steps: int = 20, tasks: int = 25) -> MemoryResult:
    """M1: one W1 meta-step with ``steps`` tracked inner steps, per path."""
    sizes = sinusoid.Sizes(tasks=tasks, steps=steps)
    names = (HIGHER, LEGACY, BATCHED, FUNC_AUTOGRAD)
    paths = maml.build(sinusoid.problem(sizes), names)
    measured = {}
    for name, path in paths.items():
        measured[name] = _both(path.step)
    title = f"peak tensor memory, one W1 meta-step, {steps} tracked inner steps"
    return MemoryResult("M1", title, {"tasks": tasks, "steps": steps}, measured)


def adapt(library, model, inner_opt, x, y, steps: int, **kwargs) -> torch.Tensor:
    """Test-time adaptation: ``steps`` untracked inner steps, then a prediction."""
    loss = torch.vmap(F.mse_loss) if "num_tasks" in kwargs else F.mse_loss
    with library.innerloop_ctx(model, inner_opt, track_higher_grads=False, **kwargs) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            diffopt.step(loss(fmodel(x), y))
        return fmodel(x)


def untracked(step_counts=(10, 200), tasks: int = 25) -> MemoryResult:
    """M2: adaptation with ``track_higher_grads=False`` at each of ``step_counts``: one task
    for higher and the legacy path, ``tasks`` tasks for the batched path."""
    model = sinusoid.make_model()
    inner_opt = torch.optim.SGD(model.parameters(), lr=sinusoid.FULL.inner_lr)
    xs, ys, _, _ = sinusoid.sample(tasks, sinusoid.FULL.shots, 1)
    runs = {
        HIGHER: lambda steps: adapt(higher, model, inner_opt, xs[0], ys[0], steps),
        LEGACY: lambda steps: adapt(higher_func, model, inner_opt, xs[0], ys[0], steps),
        BATCHED: lambda steps: adapt(higher_func, model, inner_opt, xs, ys, steps, num_tasks=tasks),
    }
    measured = {}
    for name, run in runs.items():
        for steps in step_counts:
            measured[f"{name}@{steps}"] = _both(functools.partial(run, steps))
    title = "peak tensor memory, track_higher_grads=False, " + " vs ".join(
        f"{s}" for s in step_counts
    )
    config = {"tasks (batched)": tasks, "step_counts": list(step_counts)}
    return MemoryResult("M2", title + " inner steps", config, measured)
