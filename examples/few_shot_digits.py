"""Few-shot classification with MAML on scikit-learn's 8x8 digits, batched over tasks.

An N-way K-shot task shows the model K images of each of N digit classes, labelled 0..N-1 in a
random order, then asks it to label new images of the same classes. The digit classes are
split: meta-training draws its tasks from some digits, meta-testing from the others, so the
model has never seen a meta-test digit before adapting to it.

The net is a small conv + BatchNorm network. BatchNorm normalises with the statistics of the
batch at hand (``track_running_stats=False``), as in MAML: each task is normalised on its own.
Every meta-step adapts a batch of tasks at once with ``num_tasks=T``.

The images ship with scikit-learn (``sklearn.datasets.load_digits``): nothing is downloaded.

Writes ``few_shot_digits.png`` (into ``--out``): a meta-test task with the adapted model's
predictions, and the meta-training curve.

Usage::

    python examples/few_shot_digits.py                       # 3-way 5-shot, about a minute
    python examples/few_shot_digits.py --ways 2 --shots 1
"""

import argparse
import os
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import matplotlib
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

import higher_func as higher

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

task_cross_entropy = torch.vmap(F.cross_entropy)  # one loss per task: [T, N, C], [T, N] -> [T]


class Tasks(NamedTuple):
    """``T`` classification tasks; images ``[T, N, 1, 8, 8]``, labels ``[T, N]``."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


def load_images_by_class() -> Dict[int, torch.Tensor]:
    """The 1797 digit images, scaled to [0, 1], grouped by digit: ``{digit: [n, 1, 8, 8]}``."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    return {int(d): images[labels == d] for d in labels.unique()}


def sample_tasks(
    images: Dict[int, torch.Tensor],
    classes: Sequence[int],
    num_tasks: int,
    ways: int,
    shots: int,
    queries: int,
    generator: torch.Generator,
) -> Tasks:
    """Draw ``num_tasks`` ``ways``-way tasks from ``classes``, with ``shots`` support and
    ``queries`` query images per class."""
    xs, ys, xq, yq = [], [], [], []
    for _ in range(num_tasks):
        chosen = torch.randperm(len(classes), generator=generator)[:ways]
        support, query = [], []
        for index in chosen.tolist():
            pool = images[classes[index]]
            picked = pool[torch.randperm(len(pool), generator=generator)[: shots + queries]]
            support.append(picked[:shots])
            query.append(picked[shots:])
        # Label i means "the i-th class drawn": labels carry no meaning across tasks.
        xs.append(torch.cat(support))
        xq.append(torch.cat(query))
        ys.append(torch.arange(ways).repeat_interleave(shots))
        yq.append(torch.arange(ways).repeat_interleave(queries))
    return Tasks(torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq))


def make_model(ways: int, channels: int = 16) -> nn.Module:
    """Two conv blocks (conv, BatchNorm, ReLU, 2x2 max-pool: 8x8 -> 4x4 -> 2x2), then a
    linear layer to ``ways`` logits."""

    def block(in_channels: int) -> List[nn.Module]:
        return [
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(*block(1), *block(channels), nn.Flatten(), nn.Linear(4 * channels, ways))


def adapt(fmodel, diffopt, tasks: Tasks, inner_steps: int) -> torch.Tensor:
    """Run the inner loop of every task at once; return the query logits ``[T, N, ways]``."""
    for _ in range(inner_steps):
        diffopt.step(task_cross_entropy(fmodel(tasks.x_support), tasks.y_support))
    return fmodel(tasks.x_query)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def meta_test(model, inner_opt, tasks: Tasks, inner_steps: int) -> Dict[str, object]:
    """Query accuracy over ``tasks``, before and after adaptation (no meta-gradient kept), and
    the adapted predictions."""
    num_tasks = tasks.x_support.shape[0]
    with higher.innerloop_ctx(model, inner_opt, track_higher_grads=False, num_tasks=num_tasks) as (
        fmodel,
        diffopt,
    ):
        before = accuracy(fmodel(tasks.x_query), tasks.y_query)
        logits = adapt(fmodel, diffopt, tasks, inner_steps).detach()
    return {
        "before": before,
        "after": accuracy(logits, tasks.y_query),
        "predicted": logits.argmax(-1),
    }


def plot(path: str, tasks: Tasks, predicted: torch.Tensor, curve: Sequence[float], ways: int):
    """One meta-test task (support images, then query images labelled with the adapted
    model's predictions: green right, red wrong), and the meta-training curve."""
    shots = tasks.x_support.shape[1] // ways
    shown = min(tasks.x_query.shape[1] // ways, 6)
    columns = shots + shown
    fig = plt.figure(figsize=(1.1 * columns + 4.5, 1.2 * ways + 0.6))
    grid = fig.add_gridspec(ways, columns + 4)
    for label in range(ways):
        for column in range(columns):
            ax = fig.add_subplot(grid[label, column])
            ax.set_xticks([])
            ax.set_yticks([])
            if column < shots:
                image = tasks.x_support[0, label * shots + column, 0]
                ax.set_title(f"label {label}" if column == 0 else "", fontsize=8)
            else:
                index = label * (tasks.x_query.shape[1] // ways) + column - shots
                image = tasks.x_query[0, index, 0]
                guess = int(predicted[0, index])
                color = "tab:green" if guess == label else "tab:red"
                ax.set_title(f"predicted {guess}", fontsize=7, color=color)
            ax.imshow(image.numpy(), cmap="gray_r")
    ax = fig.add_subplot(grid[:, columns + 1 :])
    window = max(1, len(curve) // 25)
    smooth = [sum(curve[i - window : i]) / window for i in range(window, len(curve) + 1)]
    ax.plot(range(window, len(curve) + 1), smooth, color="tab:blue")
    ax.axhline(1 / ways, color="gray", ls=":", label="chance")
    ax.set_ylim(0, 1)
    ax.set_xlabel("meta-step")
    ax.set_title("query accuracy (meta-training)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=int, default=3, help="classes per task (N)")
    parser.add_argument("--shots", type=int, default=5, help="support images per class (K)")
    parser.add_argument("--queries", type=int, default=10, help="query images per class")
    parser.add_argument(
        "--test-digits",
        type=int,
        nargs="+",
        default=[6, 7, 8, 9],
        help="digits kept for meta-testing; the others are meta-trained on",
    )
    parser.add_argument("--steps", type=int, default=500, help="meta-training steps")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per meta-step")
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--test-tasks", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".", help="directory for few_shot_digits.png")
    args = parser.parse_args(argv)

    images = load_images_by_class()
    test_classes = sorted(set(args.test_digits))
    train_classes = [d for d in sorted(images) if d not in test_classes]
    for name, classes in (("meta-test", test_classes), ("meta-training", train_classes)):
        if len(classes) < args.ways:
            parser.error(f"{args.ways}-way tasks need {args.ways} {name} digits, got {classes}")

    torch.manual_seed(args.seed)
    model = make_model(args.ways)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    generator = torch.Generator().manual_seed(args.seed)
    shape = dict(ways=args.ways, shots=args.shots, queries=args.queries, generator=generator)
    test_tasks = sample_tasks(images, test_classes, args.test_tasks, **shape)

    untrained = meta_test(model, inner_opt, test_tasks, args.inner_steps)
    curve = []
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="meta-training", unit="step")
    for step in progress:
        tasks = sample_tasks(images, train_classes, args.tasks, **shape)
        meta_opt.zero_grad()
        with higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, num_tasks=args.tasks
        ) as (fmodel, diffopt):
            logits = adapt(fmodel, diffopt, tasks, args.inner_steps)
            task_cross_entropy(logits, tasks.y_query).mean().backward()
        meta_opt.step()
        curve.append(accuracy(logits.detach(), tasks.y_query))
        if step % 20 == 0 or step == args.steps - 1:
            recent = curve[-50:]
            progress.set_postfix(query_accuracy=f"{sum(recent) / len(recent):.2f}")
    seconds = time.perf_counter() - start
    trained = meta_test(model, inner_opt, test_tasks, args.inner_steps)

    os.makedirs(args.out, exist_ok=True)
    figure = os.path.join(args.out, "few_shot_digits.png")
    plot(figure, test_tasks, trained["predicted"], curve, args.ways)

    chance = 1 / args.ways
    print(f"{args.steps} meta-steps of {args.tasks} tasks in {seconds:.1f} s")
    print(
        f"meta-test accuracy on {args.test_tasks} {args.ways}-way {args.shots}-shot tasks of "
        f"unseen digits {test_classes} (chance {chance:.2f}), before -> after "
        f"{args.inner_steps} SGD steps:"
    )
    print(f"  untrained model:    {untrained['before']:.3f} -> {untrained['after']:.3f}")
    print(f"  meta-trained model: {trained['before']:.3f} -> {trained['after']:.3f}")
    print(f"wrote {figure}")
    return {"curve": curve, "untrained": untrained, "trained": trained, "chance": chance}


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation
    main()
