"""A whole MAML meta-step compiled into one graph with ``higher_func.compile``, against eager.

The meta-loss function below contains the entire inner loop: every ``diffopt.step`` (an
``autograd.grad`` with ``create_graph=True`` and an SGD update) and the query loss.
``higher_func.compile`` compiles it with ``torch.compile(fullgraph=True)``; calling
``.backward()`` on its result then runs the compiled backward through all inner steps.

The program checks that compiled and eager meta-gradients agree, then times both:

* compile time: the first call, which traces and compiles (later calls with inputs of the same
  shapes reuse the graph). Inductor caches compiled code on disk, so a second run of this
  program compiles much faster than the first;
* per meta-step (forward and backward) in steady state, eager vs compiled.

``--mode loop`` compiles the legacy form instead (a Python loop of one ``innerloop_ctx`` per
task, unrolled into the graph): longer to compile, same speed-up story.

Usage::

    python examples/compile_maml.py                 # under a minute, most of it compiling
    python examples/compile_maml.py --mode loop --tasks 4

Writes ``compile_maml.json`` (into ``--out``) with the timings.
"""

import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from sinusoid_tasks import make_model, sample_tasks

import higher_func as higher

task_mse = torch.vmap(F.mse_loss)  # one loss per task: [T, N, 1] -> [T]


def make_meta_loss(
    model: torch.nn.Module, inner_opt: torch.optim.Optimizer, inner_steps: int, mode: str
) -> Callable[..., torch.Tensor]:
    """``meta_loss(xs, ys, xq, yq)``: the mean query loss after adapting to each task's support
    set, differentiable with respect to ``model``'s parameters."""
    if mode == "batched":

        def meta_loss(xs, ys, xq, yq):
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, num_tasks=xs.shape[0]
            ) as (fmodel, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(task_mse(fmodel(xs), ys))
                return task_mse(fmodel(xq), yq).mean()

    else:

        def meta_loss(xs, ys, xq, yq):
            total = 0.0
            for t in range(xs.shape[0]):
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                    fmodel,
                    diffopt,
                ):
                    for _ in range(inner_steps):
                        diffopt.step(F.mse_loss(fmodel(xs[t]), ys[t]))
                    total = total + F.mse_loss(fmodel(xq[t]), yq[t])
            return total / xs.shape[0]

    return meta_loss


def meta_gradients(meta_loss, model, batch) -> List[torch.Tensor]:
    return list(torch.autograd.grad(meta_loss(*batch), list(model.parameters())))


def time_meta_steps(meta_loss, model, batches) -> List[float]:
    """Seconds per meta-step (forward and backward) over ``batches``."""
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        meta_gradients(meta_loss, model, batch)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("batched", "loop"), default="batched")
    parser.add_argument("--tasks", type=int, default=25, help="tasks per meta-step")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=50, help="meta-steps timed per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".", help="directory for compile_maml.json")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = make_model()
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    eager = make_meta_loss(model, inner_opt, args.inner_steps, args.mode)
    compiled = higher.compile(make_meta_loss(model, inner_opt, args.inner_steps, args.mode))

    generator = torch.Generator().manual_seed(args.seed)
    batches = [sample_tasks(args.tasks, args.shots, generator)[:4] for _ in range(args.repeats + 1)]

    start = time.perf_counter()
    compiled_grads = meta_gradients(compiled, model, batches[0])  # traces and compiles
    compile_seconds = time.perf_counter() - start
    eager_grads = meta_gradients(eager, model, batches[0])
    difference = max((c - e).abs().max().item() for c, e in zip(compiled_grads, eager_grads))
    scale = max(e.abs().max().item() for e in eager_grads)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)

    eager_times = time_meta_steps(eager, model, batches[1:])
    compiled_times = time_meta_steps(compiled, model, batches[1:])
    eager_ms = 1e3 * statistics.median(eager_times)
    compiled_ms = 1e3 * statistics.median(compiled_times)

    results = {
        "mode": args.mode,
        "tasks": args.tasks,
        "inner_steps": args.inner_steps,
        "torch": torch.__version__,
        "compile_seconds": compile_seconds,
        "eager_ms_per_step": eager_ms,
        "compiled_ms_per_step": compiled_ms,
        "max_abs_gradient_difference": difference,
        "max_abs_gradient": scale,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "compile_maml.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)

    print(
        f"MAML meta-step, {args.tasks} tasks x {args.inner_steps} inner SGD steps "
        f"({args.mode}), torch {torch.__version__}"
    )
    print(
        f"meta-gradients: compiled and eager agree (max difference {difference:.1e}, "
        f"largest entry {scale:.1e})"
    )
    print(f"compile (first call):  {compile_seconds:.1f} s")
    print(f"eager meta-step:       {eager_ms:.2f} ms (median of {args.repeats})")
    print(f"compiled meta-step:    {compiled_ms:.2f} ms ({eager_ms / compiled_ms:.1f}x)")
    print(f"wrote {path}")
    return {**results, "compiled_grads": compiled_grads, "eager_grads": eager_grads}


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation
    main()
