"""The floor under W1's legacy path: ``python -m benchmarks.floor [--rounds N]``.

Times W1's legacy program (higher, higher_func) side by side with the same meta-step written
with no module and no library at all: the MLP as three ``F.linear`` calls on a list of
tensors, ``torch.autograd.grad(create_graph=True)`` and the SGD update, per tensor
(``torch.add``) or for all tensors at once (``torch._foreach_add``). Every path computes the
same meta-gradient (checked against higher's first).

What is left between the bare loop and higher_func's legacy path is what running the user's
own module costs (``nn.Module.__call__`` of every layer, the patch's copies of the module
tree) plus the library's bookkeeping; what is left between the bare loop and higher is the
floor that no library running the legacy program's shape can go below.
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from . import maml, sinusoid
from .paths import HIGHER, LEGACY, Path, first_call
from .timing import interleaved

BARE = "bare F.linear loop"
BARE_FOREACH = "bare loop, foreach update"


def _mlp(x: Tensor, w: List[Tensor]) -> Tensor:
    hidden = F.relu(F.linear(x, w[0], w[1]))
    hidden = F.relu(F.linear(hidden, w[2], w[3]))
    return F.linear(hidden, w[4], w[5])


def _bare_path(name: str, problem: maml.Maml, foreach: bool) -> Path:
    model = problem.make_model()
    outer = torch.optim.Adam(model.parameters(), lr=problem.outer_lr)
    params = list(model.parameters())
    xs, ys, xq, yq = problem.data
    tasks, lr = problem.tasks, problem.inner_lr

    def update(weights: List[Tensor], grads) -> List[Tensor]:
        if foreach:
            return list(torch._foreach_add(weights, grads, alpha=-lr))
        return [torch.add(w, g, alpha=-lr) for w, g in zip(weights, grads)]

    def step() -> None:
        outer.zero_grad()
        for t in range(tasks):
            weights = [p.clone() for p in params]  # as the legacy paths start each task
            for _ in range(problem.steps):
                loss = problem.loss(_mlp(xs[t], weights), ys[t])
                weights = update(weights, torch.autograd.grad(loss, weights, create_graph=True))
            (problem.loss(_mlp(xq[t], weights), yq[t]) / tasks).backward()
        outer.step()

    return Path(name, step, params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = sinusoid.problem()
    paths = {
        **maml.build(problem, (HIGHER, LEGACY)),
        BARE: _bare_path(BARE, problem, foreach=False),
        BARE_FOREACH: _bare_path(BARE_FOREACH, problem, foreach=True),
    }
    first = first_call(paths, HIGHER)
    if first.failed or first.wrong(1e-4):
        print(f"paths disagree with higher: {first.failed or first.error}", file=sys.stderr)
        return 1
    samples = interleaved({name: p.step for name, p in paths.items()}, args.rounds)
    print(f"W1 legacy shape, {args.rounds} interleaved rounds, 1 torch thread")
    print(f"  {'path':<28} {'median ms':>10} {'vs higher':>10}")
    for name in paths:
        speedup = samples.speedup(name, HIGHER)
        print(f"  {name:<28} {1e3 * samples.median(name):10.2f} {speedup:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
