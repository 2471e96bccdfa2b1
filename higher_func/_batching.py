"""Many tasks' inner loops as one computation over stacked weights.

Tasks are independent, so stacking their fast weights ``[T, *shape]`` and vmapping the
forward over the leading dim computes every task at once. The gradient of the *sum* of the
per-task losses with respect to the stacked weights is then exactly each task's own gradient,
which is why the optimizers need nothing but one loss per task.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._lending import SlotPlan

_warned: set = set()


def _unbatchable(module: nn.Module) -> bool:
    """Whether ``module``'s forward cannot run under torch.vmap in current torch."""
    # lstm, gru, rnn_tanh and their cells have no batching rule ("Batching rule not
    # implemented"); BatchNorm with momentum=None averages with 1 / num_batches_tracked.item().
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return True
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.momentum is None
        and module.track_running_stats
    )


def check_num_tasks(num_tasks: Any) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    return num_tasks


class BatchingFallbackWarning(UserWarning):
    """A batched patched module runs its tasks in a Python loop instead of one vmap."""


class TaskBatch:
    """How a patched module runs ``size`` tasks: vmapped, or looped when vmap cannot."""

    def __init__(self, size: int, module: nn.Module) -> None:
        self.size = check_num_tasks(size)
        unbatchable = sorted({type(m).__name__ for m in module.modules() if _unbatchable(m)})
        self.loop = bool(unbatchable)
        if self.loop and tuple(unbatchable) not in _warned:
            _warned.add(tuple(unbatchable))
            warnings.warn(
                f"{', '.join(unbatchable)} has no vmap batching rule in torch "
                f"{torch.__version__}: num_tasks runs the tasks in a Python loop (correct, "
                "but without the speed of vmap)",
                BatchingFallbackWarning,
                stacklevel=4,
            )

    def stack(self, tensor: torch.Tensor) -> torch.Tensor:
        """A real copy of ``tensor`` per task (in-place updates must not alias)."""
        return tensor.expand(self.size, *tensor.shape).clone()

    def in_dims(self, args: tuple, kwargs: dict, device: torch.device) -> Tuple[Optional[int], ...]:
        """Pop the ``in_dims=`` call option and check every mapped input has ``size`` tasks
        and lives on the weights' ``device`` (vmap over mixed devices can silently return
        garbage)."""
        in_dims = kwargs.pop("in_dims", 0)
        if in_dims is None or isinstance(in_dims, int):
            in_dims = (in_dims,) * len(args)
        if not isinstance(in_dims, (tuple, list)):
            raise TypeError(f"in_dims must be an int, None or a tuple of them, got {in_dims!r}")
        in_dims = tuple(in_dims)
        if len(in_dims) != len(args):
            raise ValueError(
                f"in_dims has {len(in_dims)} entries for {len(args)} positional inputs"
            )
        for position, (arg, dim) in enumerate(zip(args, in_dims)):
            if dim is None:
                continue
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise TypeError(f"in_dims[{position}] must be an int or None, got {dim!r}")
            for leaf in pytree.tree_leaves(arg):
                if not isinstance(leaf, torch.Tensor):
                    continue
                if not -leaf.dim() <= dim < leaf.dim() or leaf.shape[dim] != self.size:
                    raise ValueError(
                        f"input {position} has shape {tuple(leaf.shape)}: a batched patched "
                        f"module expects num_tasks={self.size} along dim {dim} (mark inputs "
                        "shared by all tasks with in_dims=None for that position)"
                    )
                if device is not None and leaf.device.type != device.type:
                    raise ValueError(
                        f"input {position} is on {leaf.device} but the fast weights are on {device}"
                    )
        return in_dims

    def call(
        self,
        plan: SlotPlan,
        fn: Callable[..., Any],
        params: Sequence[torch.Tensor],
        buffers: List[torch.Tensor],
        modes: Sequence[bool],
        args: tuple,
        kwargs: dict,
    ) -> Tuple[Any, List[torch.Tensor]]:
        """Run ``fn`` once per task; returns the stacked outputs and the stacked buffers."""
        device = next((t.device for t in (*params, *buffers)), None)
        in_dims = self.in_dims(args, kwargs, device)
        # vmap drops autocast for some ops (F.linear with a bias in torch 2.13): loop instead.
        autocast = device is not None and torch.is_autocast_enabled(device.type)
        if autocast and ("autocast",) not in _warned:
            _warned.add(("autocast",))
            warnings.warn(
                "torch.autocast does not reach every op under torch.vmap: with autocast on, "
                "num_tasks runs the tasks in a Python loop",
                BatchingFallbackWarning,
                stacklevel=5,
            )
        if self.loop or autocast:
            return self._loop(plan, fn, params, buffers, modes, args, in_dims, kwargs)

        def one_task(params, buffers, *args):
            buffers = list(buffers)
            return plan.call(fn, params, buffers, modes, args, kwargs), buffers

        out, buffers = torch.vmap(one_task, in_dims=(0, 0, *in_dims))(params, buffers, *args)
        return out, list(buffers)

    def _loop(self, plan, fn, params, buffers, modes, args, in_dims, kwargs):
        def task_slice(arg, dim, t):
            if dim is None:
                return arg
            return pytree.tree_map(
                lambda x: x.select(dim, t) if isinstance(x, torch.Tensor) else x, arg
            )

        outs, per_task = [], []
        reassigned = [False] * len(buffers)
        for t in range(self.size):
            views = [b[t] for b in buffers]  # in-place updates (BatchNorm) land in the stack
            own = list(views)
            task_args = tuple(task_slice(arg, dim, t) for arg, dim in zip(args, in_dims))
            outs.append(plan.call(fn, [p[t] for p in params], own, modes, task_args, kwargs))
            reassigned = [r or o is not v for r, o, v in zip(reassigned, own, views)]
            per_task.append(own)
        stacked = [
            torch.stack([own[i] for own in per_task]) if changed else b
            for i, (b, changed) in enumerate(zip(buffers, reassigned))
        ]
        return pytree.tree_map(lambda *xs: torch.stack(xs), outs[0], *outs[1:]), stacked
