"""W3: hyperparameter learning, the hypergradient of a learned Adam learning rate.

An 8-64-64-1 Tanh MLP is trained on each of 4 regression tasks (32 training points) by 10
inner Adam steps whose learning rate is a tensor passed with ``override={"lr": [lr]}``; the
validation loss (32 points per task) after the unroll is backpropagated through all 10 Adam
steps into ``lr``, and an outer Adam step updates ``lr``. The initial weights are detached
copies (``copy_initial_weights=True``, higher's default), so ``lr`` is the only thing learned.

Tanh, not ReLU: Adam divides by ``sqrt(v)``, whose derivative is infinite where a gradient
entry is exactly zero (a dead ReLU unit). higher hides the resulting NaNs with hooks and
higher_func avoids them; a hand-written rule would need the same care, which is beside the
point of a timing comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable

import higher
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import higher_func

from .maml import outer_step
from .paths import BATCHED, COMPILED, FUNC, FUNC_AUTOGRAD, FUNC_LOOP, HIGHER, LEGACY, Path

BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass(frozen=True)
class Sizes:
    tasks: int = 4
    features: int = 8
    hidden: int = 64
    train: int = 32
    valid: int = 32
    steps: int = 10
    initial_lr: float = 0.01
    outer_lr: float = 1e-3


FULL = Sizes()
QUICK = Sizes(tasks=2, steps=3)


def make_model(sizes: Sizes) -> nn.Module:
    """The MLP, with the same weights at every call."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(sizes.features, sizes.hidden),
        nn.Tanh(),
        nn.Linear(sizes.hidden, sizes.hidden),
        nn.Tanh(),
        nn.Linear(sizes.hidden, 1),
    )


def sample(sizes: Sizes, seed: int = 1):
    """Noisy random linear-regression tasks: ``(x_train, y_train, x_valid, y_valid)``."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(sizes.tasks, sizes.features, 1, generator=generator)

    def points(n):
        x = torch.randn(sizes.tasks, n, sizes.features, generator=generator)
        noise = 0.1 * torch.randn(sizes.tasks, n, 1, generator=generator)
        return x, x @ weights + noise

    return (*points(sizes.train), *points(sizes.valid))


def legacy_meta_step(higher, model, inner_opt, lr, hyper_opt, data, steps) -> None:
    """The legacy program: per task, an unrolled Adam with a learned ``lr``, backward."""
    x, y, xv, yv = data
    tasks = x.shape[0]
    hyper_opt.zero_grad()
    for t in range(tasks):
        with higher.innerloop_ctx(model, inner_opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.mse_loss(fmodel(x[t]), y[t]))
            (F.mse_loss(fmodel(xv[t]), yv[t]) / tasks).backward()
    hyper_opt.step()


def batched_meta_loss(model, inner_opt, lr, sizes: Sizes):
    """``meta_loss(x, y, xv, yv)`` with all tasks' unrolls as one (``num_tasks``)."""
    loss = torch.vmap(F.mse_loss)

    def meta_loss(x, y, xv, yv):
        with higher_func.innerloop_ctx(
            model, inner_opt, override={"lr": [lr]}, num_tasks=sizes.tasks
        ) as (fmodel, diffopt):
            for _ in range(sizes.steps):
                diffopt.step(loss(fmodel(x), y))
            return loss(fmodel(xv), yv).mean()

    return meta_loss


def adam(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int, lr: Tensor):
    """torch.optim.Adam's update written out by hand (what a torch.func user writes)."""
    beta1, beta2 = BETAS
    m = m + (1 - beta1) * (grad - m)
    v = beta2 * v + (1 - beta2) * grad * grad
    denom = v.sqrt() / (1 - beta2**step) ** 0.5 + EPS
    return param - lr / (1 - beta1**step) * m / denom, m, v


def func_meta_loss(model, lr, sizes: Sizes):
    """Hand-written: ``vmap`` over tasks of an unroll written with ``torch.func.grad``."""

    def task_loss(params, x, y):
        return F.mse_loss(functional_call(model, params, (x,)), y)

    def unroll_and_validate(params, x, y, xv, yv):
        m = {name: torch.zeros_like(p) for name, p in params.items()}
        v = dict(m)
        for step in range(1, sizes.steps + 1):
            grads = torch.func.grad(task_loss)(params, x, y)
            for name in params:
                params[name], m[name], v[name] = adam(
                    params[name], grads[name], m[name], v[name], step, lr
                )
        return task_loss(params, xv, yv)

    per_task = torch.vmap(unroll_and_validate, in_dims=(None, 0, 0, 0, 0))

    def meta_loss(x, y, xv, yv):
        params = {name: p.detach() for name, p in model.named_parameters()}
        return per_task(params, x, y, xv, yv).mean()

    return meta_loss


def func_autograd_meta_loss(model, lr, sizes: Sizes):
    """Hand-written: vmapped forward on stacked weights, ``torch.autograd.grad`` steps."""
    names = [name for name, _ in model.named_parameters()]
    loss = torch.vmap(F.mse_loss)
    batched_forward = torch.vmap(
        lambda params, x: functional_call(model, dict(zip(names, params)), (x,))
    )

    def meta_loss(x, y, xv, yv):
        params = [
            p.detach().expand(sizes.tasks, *p.shape).clone().requires_grad_()
            for p in model.parameters()
        ]
        m = [torch.zeros_like(p) for p in params]
        v = list(m)
        for step in range(1, sizes.steps + 1):
            task_losses = loss(batched_forward(params, x), y)
            grads = torch.autograd.grad(task_losses.sum(), params, create_graph=True)
            for i, g in enumerate(grads):
                params[i], m[i], v[i] = adam(params[i], g, m[i], v[i], step, lr)
        return loss(batched_forward(params, xv), yv).mean()

    return meta_loss


def func_loop_meta_step(model, lr, hyper_opt, data, steps):
    """Hand-written, shaped like the legacy program: a loop over tasks of
    ``torch.autograd.grad(create_graph=True)`` steps and the hand-written Adam."""
    names = [name for name, _ in model.named_parameters()]

    def forward(params, x):
        return functional_call(model, dict(zip(names, params)), (x,))

    def step():
        x, y, xv, yv = data
        tasks = x.shape[0]
        hyper_opt.zero_grad()
        for t in range(tasks):
            params = [p.detach().clone().requires_grad_() for p in model.parameters()]
            m = [torch.zeros_like(p) for p in params]
            v = list(m)
            for k in range(1, steps + 1):
                loss = F.mse_loss(forward(params, x[t]), y[t])
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for i, g in enumerate(grads):
                    params[i], m[i], v[i] = adam(params[i], g, m[i], v[i], k, lr)
            (F.mse_loss(forward(params, xv[t]), yv[t]) / tasks).backward()
        hyper_opt.step()

    return step


def build(sizes: Sizes, names: Iterable[str], **compile_kwargs) -> Dict[str, Path]:
    """The paths ``names``, each with its own model, ``lr`` tensor and optimizers
    (``compile_kwargs`` go to ``higher_func.compile``)."""
    data = sample(sizes)
    paths = {}
    for name in names:
        model = make_model(sizes)
        lr = torch.tensor(sizes.initial_lr, requires_grad=True)
        inner_opt = torch.optim.Adam(model.parameters(), lr=sizes.initial_lr, betas=BETAS, eps=EPS)
        hyper_opt = torch.optim.Adam([lr], lr=sizes.outer_lr)
        if name in (HIGHER, LEGACY):
            library = higher if name == HIGHER else higher_func

            def step(library=library, model=model, opt=inner_opt, lr=lr, hyper_opt=hyper_opt):
                legacy_meta_step(library, model, opt, lr, hyper_opt, data, sizes.steps)

        elif name == FUNC_LOOP:
            step = func_loop_meta_step(model, lr, hyper_opt, data, sizes.steps)
        else:
            if name == BATCHED:
                meta_loss = batched_meta_loss(model, inner_opt, lr, sizes)
            elif name == COMPILED:
                torch._dynamo.reset()
                meta_loss = batched_meta_loss(model, inner_opt, lr, sizes)
                meta_loss = higher_func.compile(meta_loss, **compile_kwargs)
            elif name == FUNC:
                meta_loss = func_meta_loss(model, lr, sizes)
            elif name == FUNC_AUTOGRAD:
                meta_loss = func_autograd_meta_loss(model, lr, sizes)
            else:
                raise ValueError(f"unknown path {name!r}")
            step = outer_step(meta_loss, hyper_opt, data)
        paths[name] = Path(name, step, [lr])
    return paths
