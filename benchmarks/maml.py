"""MAML meta-steps written every way the benchmarks compare, for any model and per-task loss.

One meta-step: ``steps`` inner SGD steps on each task's support set starting from the model's
weights, the query loss of the adapted weights averaged over tasks, backward into the
model's weights (second order: through every inner step), one outer Adam step. The five ways
of writing it compute the same meta-gradient (``benchmarks.paths.first_call`` checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Tuple

import higher
import torch
from torch import Tensor, nn
from torch.func import functional_call

import higher_func

from .paths import BATCHED, COMPILED, FUNC, FUNC_AUTOGRAD, FUNC_LOOP, HIGHER, LEGACY, Path

Loss = Callable[[Tensor, Tensor], Tensor]
Data = Tuple[Tensor, Tensor, Tensor, Tensor]  # support x, y and query x, y: [tasks, ...] each


@dataclass(frozen=True)
class Maml:
    """A MAML workload.

    Attributes:
        make_model: returns a freshly initialised model, the same weights at every call.
        loss: the per-task loss ``loss(prediction, target) -> scalar``.
        data: ``(xs, ys, xq, yq)``, each with a leading task dim.
        steps: inner SGD steps per task.
        inner_lr: the inner SGD learning rate.
        outer_lr: the outer Adam learning rate.
    """

    make_model: Callable[[], nn.Module]
    loss: Loss
    data: Data
    steps: int
    inner_lr: float
    outer_lr: float = 1e-3

    @property
    def tasks(self) -> int:
        return self.data[0].shape[0]


def legacy_meta_step(higher, model, inner_opt, meta_opt, problem: Maml) -> None:
    """The legacy program, as higher's examples write it: one task at a time, each task's
    share of the meta-loss backpropagated as soon as it is computed. ``higher`` is the
    ``higher`` module or ``higher_func`` imported as higher."""
    xs, ys, xq, yq = problem.data
    tasks = xs.shape[0]
    meta_opt.zero_grad()
    for t in range(tasks):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(problem.steps):
                diffopt.step(problem.loss(fmodel(xs[t]), ys[t]))
            (problem.loss(fmodel(xq[t]), yq[t]) / tasks).backward()
    meta_opt.step()


def batched_meta_loss(model: nn.Module, inner_opt: torch.optim.Optimizer, problem: Maml):
    """``meta_loss(xs, ys, xq, yq)``: all tasks' inner loops as one, with ``num_tasks``."""
    tasks, steps, loss = problem.tasks, problem.steps, torch.vmap(problem.loss)

    def meta_loss(xs, ys, xq, yq):
        with higher_func.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, num_tasks=tasks
        ) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss(fmodel(xs), ys))
            return loss(fmodel(xq), yq).mean()

    return meta_loss


def func_meta_loss(model: nn.Module, problem: Maml):
    """Hand-written: ``vmap`` over tasks of an adaptation written with ``torch.func.grad``.

    This is the functorch MAML recipe. Buffers (BatchNorm running stats, which the forward
    updates in place) are copied per task, as ``num_tasks`` does.
    """
    steps, lr, loss_fn = problem.steps, problem.inner_lr, problem.loss

    def task_loss(params, buffers, x, y):
        return loss_fn(functional_call(model, (params, buffers), (x,)), y)

    def adapt_and_evaluate(params, buffers, xs, ys, xq, yq):
        for _ in range(steps):
            grads = torch.func.grad(task_loss)(params, buffers, xs, ys)
            params = {name: p - lr * grads[name] for name, p in params.items()}
        return task_loss(params, buffers, xq, yq)

    per_task = torch.vmap(adapt_and_evaluate, in_dims=(None, 0, 0, 0, 0, 0))

    def meta_loss(xs, ys, xq, yq):
        params = dict(model.named_parameters())
        buffers = {name: _stack(b, problem.tasks) for name, b in model.named_buffers()}
        return per_task(params, buffers, xs, ys, xq, yq).mean()

    return meta_loss


def func_autograd_meta_loss(model: nn.Module, problem: Maml):
    """Hand-written: the forward vmapped over stacked weights ``[tasks, ...]``, inner
    gradients from ``torch.autograd.grad(create_graph=True)`` of the summed task losses
    (tasks are independent, so that is every task's own gradient)."""
    steps, lr, tasks = problem.steps, problem.inner_lr, problem.tasks
    names = [name for name, _ in model.named_parameters()]
    buffer_names = [name for name, _ in model.named_buffers()]
    loss = torch.vmap(problem.loss)

    def forward(params, buffers, x):
        tensors = (dict(zip(names, params)), dict(zip(buffer_names, buffers)))
        return functional_call(model, tensors, (x,))

    batched_forward = torch.vmap(forward)

    def meta_loss(xs, ys, xq, yq):
        params = [p.expand(tasks, *p.shape) for p in model.parameters()]
        buffers = [_stack(b, tasks) for b in model.buffers()]
        for _ in range(steps):
            task_losses = loss(batched_forward(params, buffers, xs), ys)
            grads = torch.autograd.grad(task_losses.sum(), params, create_graph=True)
            params = [p - lr * g for p, g in zip(params, grads)]
        return loss(batched_forward(params, buffers, xq), yq).mean()

    return meta_loss


def func_loop_meta_step(model: nn.Module, meta_opt: torch.optim.Optimizer, problem: Maml):
    """Hand-written, shaped like the legacy program: one task at a time, inner gradients from
    ``torch.autograd.grad(create_graph=True)``, each task's query loss backpropagated at once.
    What the legacy program costs without any library in between. BatchNorm updates the
    model's own running statistics here; in training mode it normalises with the batch's,
    so the meta-gradient is the same."""
    names = [name for name, _ in model.named_parameters()]
    steps, lr, loss = problem.steps, problem.inner_lr, problem.loss

    def forward(params, x):
        return functional_call(model, dict(zip(names, params)), (x,))

    def step():
        xs, ys, xq, yq = problem.data
        tasks = xs.shape[0]
        meta_opt.zero_grad()
        for t in range(tasks):
            params = [p.clone() for p in model.parameters()]
            for _ in range(steps):
                grads = torch.autograd.grad(
                    loss(forward(params, xs[t]), ys[t]), params, create_graph=True
                )
                params = [p - lr * g for p, g in zip(params, grads)]
            (loss(forward(params, xq[t]), yq[t]) / tasks).backward()
        meta_opt.step()

    return step


def _stack(tensor: Tensor, tasks: int) -> Tensor:
    return tensor.expand(tasks, *tensor.shape).clone()


def build(problem: Maml, names: Iterable[str], **compile_kwargs) -> Dict[str, Path]:
    """The paths ``names`` (of ``benchmarks.paths.ORDER``), each with its own model and
    optimizers; the compiled path is compiled on its first call, with ``compile_kwargs``
    for ``higher_func.compile``."""
    paths = {}
    for name in names:
        model = problem.make_model()
        inner_opt = torch.optim.SGD(model.parameters(), lr=problem.inner_lr)
        meta_opt = torch.optim.Adam(model.parameters(), lr=problem.outer_lr)
        if name in (HIGHER, LEGACY):
            library = higher if name == HIGHER else higher_func

            def step(library=library, model=model, inner_opt=inner_opt, meta_opt=meta_opt):
                legacy_meta_step(library, model, inner_opt, meta_opt, problem)

        elif name == FUNC_LOOP:
            step = func_loop_meta_step(model, meta_opt, problem)
        else:
            if name == BATCHED:
                meta_loss = batched_meta_loss(model, inner_opt, problem)
            elif name == COMPILED:
                torch._dynamo.reset()
                meta_loss = batched_meta_loss(model, inner_opt, problem)
                meta_loss = higher_func.compile(meta_loss, **compile_kwargs)
            elif name == FUNC:
                meta_loss = func_meta_loss(model, problem)
            elif name == FUNC_AUTOGRAD:
                meta_loss = func_autograd_meta_loss(model, problem)
            else:
                raise ValueError(f"unknown path {name!r}")
            step = outer_step(meta_loss, meta_opt, problem.data)
        paths[name] = Path(name, step, list(model.parameters()))
    return paths


def outer_step(meta_loss, meta_opt: torch.optim.Optimizer, data: Data) -> Callable[[], None]:
    """A meta-step around a function returning the meta-loss of ``data``."""

    def step():
        meta_opt.zero_grad()
        meta_loss(*data).backward()
        meta_opt.step()

    return step
