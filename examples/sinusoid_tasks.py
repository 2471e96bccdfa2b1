"""The sinusoid regression tasks of MAML (Finn et al., 2017), shared by the sinusoid examples.

A task is ``y = amplitude * sin(x + phase)`` with the amplitude drawn from [0.1, 5], the phase
from [0, pi] and inputs from [-5, 5]. Torch only, so that every example (and the tests that
import them) can use it without the ``examples`` extra.
"""

import math
from typing import NamedTuple

import torch
from torch import nn


class TaskBatch(NamedTuple):
    """``T`` tasks: support and query sets with a leading task dim (``[T, K, 1]``)."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    amplitude: torch.Tensor  # [T]
    phase: torch.Tensor  # [T]


def sample_tasks(
    num_tasks: int, shots: int, generator: torch.Generator, queries: int = 0
) -> TaskBatch:
    """Draw ``num_tasks`` sinusoids, ``shots`` support and ``queries`` (default ``shots``) query
    points each, all from ``generator`` (so every process can draw the same batch)."""
    queries = queries or shots
    amplitude = torch.empty(num_tasks).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(num_tasks).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(num_tasks, shots + queries, 1).uniform_(-5.0, 5.0, generator=generator)
    y = sinusoid(x, amplitude, phase)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], amplitude, phase)


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The targets of each task at ``x`` (``[T, N, 1]``)."""
    return amplitude.view(-1, 1, 1) * torch.sin(x + phase.view(-1, 1, 1))


def make_model(hidden: int = 40) -> nn.Module:
    """The 1-40-40-1 ReLU network of the MAML paper."""
    return nn.Sequential(
        nn.Linear(1, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )
