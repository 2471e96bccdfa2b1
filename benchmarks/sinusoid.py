"""W1: sinusoid regression MAML (Finn et al., 2017), the classic small-model workload.

A 1-40-40-1 ReLU MLP; each task is ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``,
``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``; 10 support and 10 query points per task, 5 inner SGD
steps of learning rate 0.01, 25 tasks per meta-step. The model is tiny, so a meta-step is
mostly Python and per-op overhead: the workload that shows what the library itself costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .maml import Maml


@dataclass(frozen=True)
class Sizes:
    tasks: int = 25
    shots: int = 10
    queries: int = 10
    steps: int = 5
    inner_lr: float = 0.01


FULL = Sizes()
QUICK = Sizes(tasks=4, steps=2)


def make_model() -> nn.Module:
    """The 1-40-40-1 MLP, with the same weights at every call."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def sample(tasks: int, shots: int, queries: int, seed: int = 1):
    """Support and query sets of ``tasks`` random sinusoids: ``(xs, ys, xq, yq)``."""
    generator = torch.Generator().manual_seed(seed)
    amplitude = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)

    def points(n):
        x = torch.empty(tasks, n, 1).uniform_(-5.0, 5.0, generator=generator)
        return x, amplitude * torch.sin(x - phase)

    return (*points(shots), *points(queries))


def problem(sizes: Sizes = FULL) -> Maml:
    """The W1 meta-step at ``sizes``."""
    data = sample(sizes.tasks, sizes.shots, sizes.queries)
    return Maml(make_model, F.mse_loss, data, sizes.steps, sizes.inner_lr)
