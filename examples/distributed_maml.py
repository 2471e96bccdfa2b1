"""MAML meta-training with the tasks of each meta-step sharded across processes.

Every process (rank) holds the same model and the same outer optimizer. At each meta-step all
ranks draw the same batch of tasks; each rank adapts its own share of them at once
(``num_tasks``), backpropagates its query loss, and one ``all_reduce`` averages the
meta-gradients. Every rank then takes the same outer step, so the models stay identical, and
the result is the meta-gradient of the whole batch, as if one process had adapted all tasks.

Launch with torchrun (gloo on CPU, nccl with one GPU per process)::

    torchrun --nproc_per_node=2 examples/distributed_maml.py
    python examples/distributed_maml.py          # a single process, no torchrun needed

On several machines, run the same ``torchrun`` command on each with ``--nnodes``,
``--node_rank`` and ``--rdzv_endpoint`` (see ``torchrun --help``).

Rank 0 writes the meta-trained weights to ``distributed_maml.pt`` (into ``--out``).

The averaging is one explicit ``all_reduce`` per meta-step rather than DDP: the meta-gradient
only exists once the backward through the whole inner loop has finished, and a single flat
buffer is all there is to reduce.
"""

import argparse
import datetime
import os
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sinusoid_tasks import TaskBatch, make_model, sample_tasks

import higher_func as higher

task_mse = torch.vmap(F.mse_loss)  # one loss per task: [T, N, 1] -> [T]


def rank_and_world_size() -> Tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(tasks: TaskBatch, rank: int, world_size: int) -> TaskBatch:
    """The ``rank``-th of ``world_size`` equal, contiguous shares of ``tasks``.

    Raises:
        ValueError: the tasks do not split evenly (the average of the ranks' mean losses would
            then not be the mean over all tasks).
    """
    num_tasks = tasks.x_support.shape[0]
    if num_tasks % world_size:
        raise ValueError(
            f"{num_tasks} tasks do not split evenly over {world_size} processes; use a "
            f"multiple of {world_size}"
        )
    size = num_tasks // world_size
    return TaskBatch(*(t[rank * size : (rank + 1) * size] for t in tasks))


def all_reduce_mean_(tensors: List[torch.Tensor], world_size: int) -> None:
    """Replace each tensor by its mean over all processes, with a single collective."""
    if world_size == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)  # a sum
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def distributed_meta_gradient(
    model: torch.nn.Module, inner_opt: torch.optim.Optimizer, tasks: TaskBatch, inner_steps: int
) -> torch.Tensor:
    """Adapt this process's share of ``tasks``, then leave in every process's ``model.grad``
    the meta-gradient of the mean query loss over *all* ``tasks``.

    Every process must pass the same ``tasks``. Without a process group this is the plain
    batched meta-gradient of one process.

    Returns:
        The mean query loss over all ``tasks`` (detached).
    """
    rank, world_size = rank_and_world_size()
    mine = shard(tasks, rank, world_size)
    with higher.innerloop_ctx(
        model, inner_opt, copy_initial_weights=False, num_tasks=mine.x_support.shape[0]
    ) as (fmodel, diffopt):
        for _ in range(inner_steps):
            diffopt.step(task_mse(fmodel(mine.x_support), mine.y_support))
        loss = task_mse(fmodel(mine.x_query), mine.y_query).mean()
        loss.backward()
    # Equal shares: the mean over ranks of each rank's mean is the mean over all tasks. The
    # loss rides along in the same buffer, for logging.
    loss = loss.detach().reshape(1)
    all_reduce_mean_([p.grad for p in model.parameters()] + [loss], world_size)
    return loss[0]


def train(
    steps: int,
    tasks: int = 24,
    shots: int = 10,
    inner_steps: int = 5,
    inner_lr: float = 0.01,
    meta_lr: float = 1e-3,
    seed: int = 0,
    device: Optional[torch.device] = None,
    log_every: int = 0,
) -> Tuple[torch.nn.Module, List[float]]:
    """Meta-train the sinusoid model for ``steps`` meta-steps of ``tasks`` tasks, sharded over
    the processes of the current process group (or alone without one).

    Returns:
        The meta-trained model (identical on every rank) and the loss at every meta-step.
    """
    rank, world_size = rank_and_world_size()
    torch.manual_seed(seed)
    model = make_model().to(device)
    if world_size > 1:
        for p in model.parameters():  # identical starting weights, whatever each rank drew
            dist.broadcast(p.data, src=0)
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    meta_opt = torch.optim.Adam(model.parameters(), lr=meta_lr)
    # The same generator on every rank: all ranks draw the same batch and keep their share.
    # (With a dataset on disk, a DistributedSampler would give each rank its share instead.)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        batch = TaskBatch(*(t.to(device) for t in sample_tasks(tasks, shots, generator)))
        meta_opt.zero_grad()
        losses.append(distributed_meta_gradient(model, inner_opt, batch, inner_steps).item())
        meta_opt.step()
        if log_every and rank == 0 and (step % log_every == 0 or step == steps - 1):
            recent = losses[-log_every:]
            print(f"meta-step {step:5d}  query MSE {sum(recent) / len(recent):.3f}", flush=True)
    return model, losses


def identical_on_all_ranks(model: torch.nn.Module) -> bool:
    """Whether every rank holds exactly rank 0's weights."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return True
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    mismatches = torch.tensor([0.0 if torch.equal(mine, reference) else 1.0], device=mine.device)
    dist.all_reduce(mismatches)
    return mismatches.item() == 0


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="meta-training steps")
    parser.add_argument("--tasks", type=int, default=24, help="tasks per meta-step, all ranks")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".", help="directory for distributed_maml.pt")
    args = parser.parse_args(argv)

    launched = "WORLD_SIZE" in os.environ  # set by torchrun
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if args.tasks % processes:
        parser.error(f"--tasks {args.tasks} does not split evenly over {processes} processes")
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if launched:
        dist.init_process_group(
            "nccl" if device is not None else "gloo", timeout=datetime.timedelta(minutes=5)
        )
    rank, world_size = rank_and_world_size()
    if rank == 0:
        share = args.tasks // world_size
        print(f"{world_size} process(es), {share} of {args.tasks} tasks each, on {device or 'cpu'}")
    try:
        start = time.perf_counter()
        model, losses = train(
            args.steps,
            tasks=args.tasks,
            shots=args.shots,
            inner_steps=args.inner_steps,
            inner_lr=args.inner_lr,
            meta_lr=args.meta_lr,
            seed=args.seed,
            device=device,
            log_every=max(1, args.steps // 10),
        )
        seconds = time.perf_counter() - start
        same = identical_on_all_ranks(model)
        if rank == 0:
            window = max(1, len(losses) // 20)  # first and last 5% of the meta-steps
            first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
            print(
                f"{args.steps} meta-steps in {seconds:.1f} s; query MSE after adaptation "
                f"{first:.3f} -> {last:.3f}"
            )
            if world_size > 1:
                print(f"weights identical on all {world_size} ranks: {same}")
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "distributed_maml.pt")
            torch.save(model.state_dict(), path)
            print(f"wrote {path}")
        if launched:
            # Leave together: a rank tearing down gloo while its peer still talks to it can
            # abort that peer ("terminate called without an active exception").
            dist.barrier()
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation
    main()
