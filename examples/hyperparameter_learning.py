"""Learn an optimizer's learning rate and momentum by differentiating through training.

The inner problem: fit a linear model by least squares with 20 SGD steps, on 40 points whose
features live on scales from 1 to 0.1 (a condition number of 100: plain SGD crawls along the
flat directions, momentum helps). The outer objective: the loss on 40 new points after those
steps. That loss is a differentiable function of SGD's ``lr`` and ``momentum``, so they can be
learned by gradient descent like any weight:

1. ``get_trainable_opt_params(opt)`` turns the hyperparameters of an ordinary
   ``torch.optim.SGD`` into tensors that require grad;
2. ``innerloop_ctx(..., override=...)`` unrolls the training with them, and the validation
   loss backpropagates into them (``num_tasks`` averages the hypergradient over several
   regression problems at once);
3. ``apply_trainable_opt_params(opt, ...)`` writes the learned values back into the
   ``torch.optim`` optimizer, which then trains as usual.

Usage::

    python examples/hyperparameter_learning.py               # about 10 seconds
    python examples/hyperparameter_learning.py --unroll 50

Writes ``hyperparameter_learning.png`` (into ``--out``): the hyperparameters and the
validation loss along the hyper-training.
"""

import argparse
import os
import time
from typing import Dict, List, NamedTuple, Optional

import matplotlib
import torch
import torch.nn.functional as F

import higher_func as higher
from higher_func.optim import apply_trainable_opt_params, get_trainable_opt_params

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

task_mse = torch.vmap(F.mse_loss)  # one loss per task: [T, N, 1] -> [T]

LEARNED = ("lr", "momentum")
# Hyper-steps must keep SGD well defined: a positive learning rate, a momentum below 1.
BOUNDS = {"lr": (1e-4, None), "momentum": (0.0, 0.99)}


class Tasks(NamedTuple):
    """``T`` regression problems: training and validation sets, ``[T, N, features]``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def sample_tasks(num_tasks: int, points: int, features: int, generator) -> Tasks:
    """Random linear targets ``y = x @ w + noise``, with feature scales from 1 down to 0.1."""
    scales = torch.logspace(0, -1, features)
    w = torch.randn(num_tasks, features, 1, generator=generator)
    x = torch.randn(num_tasks, 2 * points, features, generator=generator) * scales
    y = x @ w + 0.1 * torch.randn(num_tasks, 2 * points, 1, generator=generator)
    return Tasks(x[:, :points], y[:, :points], x[:, points:], y[:, points:])


def validation_loss_after_training(model, opt, hyper, tasks: Tasks, unroll: int) -> torch.Tensor:
    """Mean validation loss over ``tasks`` after ``unroll`` steps of ``opt`` with the
    hyperparameters ``hyper``, differentiable in them."""
    num_tasks = tasks.x_train.shape[0]
    # copy_initial_weights=True (the default): the initial weights are constants here, only
    # the hyperparameters are learned.
    with higher.innerloop_ctx(model, opt, override=hyper, num_tasks=num_tasks) as (
        fmodel,
        diffopt,
    ):
        for _ in range(unroll):
            diffopt.step(task_mse(fmodel(tasks.x_train), tasks.y_train))
        return task_mse(fmodel(tasks.x_val), tasks.y_val).mean()


def plain_training(model, opt, tasks: Tasks, unroll: int, seed: int) -> float:
    """Mean validation loss after training with ``opt`` itself, task by task, in the usual
    ``zero_grad / backward / step`` loop (no higher_func), from initial weights drawn with
    ``seed``."""
    torch.manual_seed(seed)
    losses = []
    for t in range(tasks.x_train.shape[0]):
        model.reset_parameters()
        opt.state.clear()  # no momentum carried over from the previous run
        for _ in range(unroll):
            opt.zero_grad()
            F.mse_loss(model(tasks.x_train[t]), tasks.y_train[t]).backward()
            opt.step()
        with torch.no_grad():
            losses.append(F.mse_loss(model(tasks.x_val[t]), tasks.y_val[t]).item())
    return sum(losses) / len(losses)


def plot(path: str, history: Dict[str, List[float]]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("lr", "momentum", "validation loss")):
        ax.plot(history[key])
        ax.set_title(key)
        ax.set_xlabel("hyper-step")
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="hyper-steps")
    parser.add_argument("--unroll", type=int, default=20, help="SGD steps differentiated through")
    parser.add_argument("--tasks", type=int, default=8, help="regression problems per hyper-step")
    parser.add_argument("--points", type=int, default=40, help="training points per problem")
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate")
    parser.add_argument("--momentum", type=float, default=0.0, help="initial momentum")
    parser.add_argument("--hyper-lr", type=float, default=0.01, help="Adam's lr on lr, momentum")
    parser.add_argument("--eval-tasks", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".", help="directory for hyperparameter_learning.png")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = torch.nn.Linear(args.features, 1)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    # Every numeric hyperparameter of SGD as a tensor requiring grad; keep the two we learn.
    trainable = get_trainable_opt_params(opt)
    hyper = {key: trainable[key] for key in LEARNED}  # {"lr": [tensor], "momentum": [tensor]}
    hyper_opt = torch.optim.Adam([hyper[key][0] for key in LEARNED], lr=args.hyper_lr)

    data = torch.Generator().manual_seed(args.seed)
    history: Dict[str, List[float]] = {"lr": [], "momentum": [], "validation loss": []}
    start = time.perf_counter()
    for _ in range(args.steps):
        model.reset_parameters()  # a fresh start for every hyper-step, in place
        tasks = sample_tasks(args.tasks, args.points, args.features, data)
        loss = validation_loss_after_training(model, opt, hyper, tasks, args.unroll)
        hyper_opt.zero_grad()
        loss.backward()  # d(validation loss)/d(lr, momentum), through every SGD step
        hyper_opt.step()
        with torch.no_grad():
            for key, (low, high) in BOUNDS.items():
                hyper[key][0].clamp_(low, high)
        history["validation loss"].append(loss.item())
        for key in LEARNED:
            history[key].append(hyper[key][0].item())
    seconds = time.perf_counter() - start

    eval_tasks = sample_tasks(args.eval_tasks, args.points, args.features, data)
    initial_loss = plain_training(model, opt, eval_tasks, args.unroll, args.seed)
    apply_trainable_opt_params(opt, hyper)  # opt's param_groups now hold the learned floats
    learned_loss = plain_training(model, opt, eval_tasks, args.unroll, args.seed)
    learned = {key: opt.param_groups[0][key] for key in LEARNED}

    os.makedirs(args.out, exist_ok=True)
    figure = os.path.join(args.out, "hyperparameter_learning.png")
    plot(figure, history)

    print(f"{args.steps} hyper-steps through {args.unroll} SGD steps in {seconds:.1f} s")
    print(
        f"learned lr = {learned['lr']:.4f} (from {args.lr}), momentum = "
        f"{learned['momentum']:.4f} (from {args.momentum})"
    )
    print(
        f"validation loss after {args.unroll} steps of torch.optim.SGD, mean over "
        f"{args.eval_tasks} new problems: {initial_loss:.3f} with the initial hyperparameters, "
        f"{learned_loss:.3f} with the learned ones"
    )
    print(f"wrote {figure}")
    return {
        "learned": learned,
        "history": history,
        "initial_loss": initial_loss,
        "learned_loss": learned_loss,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation
    main()
