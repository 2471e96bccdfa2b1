"""W2: MAML at the shape of 5-way 1-shot Omniglot, the classic convolutional workload.

Four blocks of (3x3 conv, 64 channels, padding 1 - BatchNorm2d - ReLU - 2x2 max-pool) take a
28x28x1 image to 64 features, and a linear head to 5 classes. Each task has 5 support images
(one per class) and 75 query images (15 per class); 5 inner SGD steps of learning rate 0.4
(higher's Omniglot example), 8 tasks per meta-step. Only the shapes matter for timing, so the
images are random numbers instead of the Omniglot data set.

BatchNorm runs in training mode (batch statistics, as in MAML); with ``momentum=1`` its
running statistics are the last batch's, as in higher's example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .maml import Maml


@dataclass(frozen=True)
class Sizes:
    tasks: int = 8
    ways: int = 5
    shots: int = 1
    queries: int = 15  # per class
    steps: int = 5
    inner_lr: float = 0.4


FULL = Sizes()
QUICK = Sizes(tasks=2, queries=2, steps=1)


def make_model(ways: int = 5) -> nn.Module:
    """The four-block convolutional network, with the same weights at every call."""
    torch.manual_seed(0)
    layers = []
    channels = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.BatchNorm2d(64, momentum=1.0),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))


def sample(sizes: Sizes, seed: int = 1):
    """Random images and labels with the shapes of ``sizes``: ``(xs, ys, xq, yq)``."""
    generator = torch.Generator().manual_seed(seed)

    def images(per_class):
        count = sizes.ways * per_class
        x = torch.randn(sizes.tasks, count, 1, 28, 28, generator=generator)
        y = torch.arange(sizes.ways).repeat_interleave(per_class).repeat(sizes.tasks, 1)
        return x, y

    return (*images(sizes.shots), *images(sizes.queries))


def problem(sizes: Sizes = FULL) -> Maml:
    """The W2 meta-step at ``sizes``."""
    return Maml(
        lambda: make_model(sizes.ways),
        F.cross_entropy,
        sample(sizes),
        sizes.steps,
        sizes.inner_lr,
    )
