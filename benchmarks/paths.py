"""A *path*: one way of writing a workload's meta-step, and the check that all paths agree.

Every workload builds the same meta-step several ways (higher, higher_func legacy, batched,
compiled, hand-written torch.func). Each path owns its own copy of the model and optimizers,
built from the same seed, so one path's outer steps never change another's starting point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

# The names of the paths, in the order tables list them.
HIGHER = "higher"
LEGACY = "legacy"
BATCHED = "batched"
COMPILED = "compiled"
FUNC = "torch.func"
FUNC_AUTOGRAD = "torch.func+autograd"
FUNC_LOOP = "torch.func loop"
ORDER = (HIGHER, LEGACY, BATCHED, COMPILED, FUNC, FUNC_AUTOGRAD, FUNC_LOOP)
# W4's paths on the model with hand-written (eager) attention instead of torch's SDPA; not
# in ORDER, which every other workload builds.
LEGACY_EAGER = "legacy, eager attn"
BATCHED_EAGER = "batched, eager attn"

# What each path is, for tables and the README.
DESCRIPTIONS = {
    HIGHER: "higher 0.2.1 innerloop_ctx, a Python loop over tasks (the legacy program)",
    LEGACY: "the same legacy program with `import higher_func as higher`",
    BATCHED: "higher_func.innerloop_ctx(..., num_tasks=T), one vmapped inner loop",
    COMPILED: "the batched meta-loss wrapped in higher_func.compile",
    FUNC: "hand-written: torch.vmap over tasks of torch.func.grad + functional_call",
    FUNC_AUTOGRAD: "hand-written: vmapped functional_call on stacked weights + "
    "torch.autograd.grad(create_graph=True)",
    FUNC_LOOP: "hand-written, the legacy program's shape without a library: a Python loop over "
    "tasks of functional_call + torch.autograd.grad(create_graph=True)",
    LEGACY_EAGER: "legacy, on the model with eager attention (W4: what SDPA's math kernel costs)",
    BATCHED_EAGER: "batched, on the model with eager attention",
}


@dataclass
class Path:
    """One way of writing a meta-step.

    Attributes:
        name: one of ``ORDER``.
        step: runs one whole meta-step: zero the meta-gradients, the inner loops of all tasks,
            the query loss, backward, the outer optimizer's step.
        learned: the tensors the outer optimizer updates; after ``step`` their ``.grad`` holds
            that step's meta-gradient.
    """

    name: str
    step: Callable[[], None]
    learned: Sequence[torch.Tensor]


@dataclass
class FirstCall:
    """What the first call of every path showed: its duration (for a compiled path, the
    compile time), its meta-gradient's relative error against the reference path, or the
    exception it raised."""

    seconds: Dict[str, float]
    error: Dict[str, float]
    failed: Dict[str, str]

    def wrong(self, tolerance: float) -> List[str]:
        """The paths whose meta-gradient differs from the reference's by more than
        ``tolerance`` (relative, in the 2-norm over all learned tensors)."""
        return [name for name, err in self.error.items() if not err <= tolerance]


def first_call(paths: Mapping[str, Path], reference: str) -> FirstCall:
    """Run every path once from its identical starting point and compare meta-gradients.

    The relative error is ``|g - g_ref| / |g_ref|`` over all learned tensors concatenated,
    a per-tensor check would flag tensors whose meta-gradient is only rounding noise (a conv
    bias before BatchNorm has an exactly-zero true gradient).
    """
    seconds, failed = {}, {}
    for name, path in paths.items():
        begin = time.perf_counter()
        try:
            path.step()
        except Exception as error:  # reported in the table; the other paths still run
            first_line = (str(error).splitlines() or [""])[0]
            failed[name] = f"{type(error).__name__}: {first_line[:200]}"
            continue
        seconds[name] = time.perf_counter() - begin
    error = {name: float("nan") for name in seconds}
    if reference in seconds:
        ref = _flat_grad(paths[reference].learned)
        for name in seconds:
            error[name] = float((_flat_grad(paths[name].learned) - ref).norm() / ref.norm())
    return FirstCall(seconds, error, failed)


def _flat_grad(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in tensors]
    return torch.cat([g.reshape(-1) for g in grads]).double()


def ordered(names: Sequence[str], order: Optional[Sequence[str]] = None) -> List[str]:
    """``names`` in table order."""
    order = (*ORDER, LEGACY_EAGER, BATCHED_EAGER) if order is None else order
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))
