"""Many tasks' inner loops as one computation over stacked weights.

Tasks are independent, so stacking their fast weights ``[T, *shape]`` and vmapping the
forward over the leading dim computes every task at once. The gradient of the *sum* of the
per-task losses with respect to the stacked weights is then exactly each task's own gradient,
which is why the optimizers need nothing but one loss per task.

Between calls the patch's module copies hold the stacked tensors (so ``fmodel.fc.weight`` reads
``[T, *shape]``); for the length of a call they hold one task's tensors, inside vmap or inside a
loop over tasks. What the forward leaves on the copies (a reassigned buffer, ``self.last = h``)
comes back out stacked, one entry per task.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._compat import BatchNorm, is_compiling, pytree
from ._tree import ModuleTree

_warned: set = set()
_RANDOMNESS = ("different", "same", "error")


def _unbatchable(module: nn.Module) -> bool:
    """Whether ``module``'s forward cannot run under torch.vmap in current torch."""
    # lstm, gru, rnn_tanh and their cells have no batching rule ("Batching rule not
    # implemented"); BatchNorm with momentum=None averages with 1 / num_batches_tracked.item().
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return True
    return isinstance(module, BatchNorm) and module.momentum is None and module.track_running_stats


def check_num_tasks(num_tasks: Any) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    return num_tasks


def check_randomness(randomness: Any) -> str:
    if randomness not in _RANDOMNESS:
        raise ValueError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")
    return randomness


class BatchingFallbackWarning(UserWarning):
    """A batched patched module runs its tasks in a Python loop instead of one vmap."""


def _warn_once(key: Tuple[str, ...], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, BatchingFallbackWarning, stacklevel=5)


_MISSING = object()


class _Leftovers:
    """What a forward left on the copies besides the buffer slots: new or reassigned tensor
    attributes (``self.last = h``, a buffer registered as None and filled in forward)."""

    def __init__(self, tree: ModuleTree) -> None:
        self._holders = [c.__dict__ for c in tree.modules()]
        self._holders += [c._buffers for c in tree.modules()]
        self._before = [dict(h) for h in self._holders]
        self._slots = tree.buffer_slot_keys  # read back by the caller, not here

    def changed(self) -> List[Tuple[Dict[str, Any], str, Any]]:
        out = []
        for holder, before in zip(self._holders, self._before):
            for key, value in holder.items():
                if before.get(key, _MISSING) is value or key == "_flat_weights":
                    continue
                if (id(holder), key) not in self._slots:
                    out.append((holder, key, value))
        return out

    def restore(self) -> None:
        for holder, before in zip(self._holders, self._before):
            for key in [k for k in holder if k not in before]:
                del holder[key]
            holder.update(before)


def _split_tensors(tree: Any) -> Tuple[List[torch.Tensor], Callable[[List[Any]], Any]]:
    """The tensor leaves of ``tree`` and a function that puts (new) tensors back in place;
    leaves that are not tensors (None, ints, strings) pass through unchanged."""
    leaves, spec = pytree.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def rebuild(tensors: List[Any]) -> Any:
        new = list(leaves)
        for i, t in zip(where, tensors):
            new[i] = t
        return pytree.tree_unflatten(new, spec)

    return [leaves[i] for i in where], rebuild


class TaskBatch:
    """How a patched module runs ``size`` tasks: vmapped, or looped when vmap cannot."""

    def __init__(self, size: int, module: nn.Module, randomness: str = "different") -> None:
        self.size = check_num_tasks(size)
        self.randomness = check_randomness(randomness)
        # Calls lend one task's tensors into the patch's copies: two threads calling the same
        # batched patched module take turns. (Dynamo cannot build a lock; compiled code has
        # no threads to exclude.)
        self._lock = None if is_compiling() else threading.RLock()
        unbatchable = sorted({type(m).__name__ for m in module.modules() if _unbatchable(m)})
        self.loop = bool(unbatchable)
        if self.loop:
            _warn_once(
                tuple(unbatchable),
                f"{', '.join(unbatchable)} has no vmap batching rule in torch "
                f"{torch.__version__}: num_tasks runs the tasks in a Python loop (correct, "
                "but without the speed of vmap)",
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
        for key, value in kwargs.items():
            if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)):
                raise TypeError(
                    f"keyword argument {key}= holds a tensor: a batched patched module maps "
                    "positional inputs over tasks (see in_dims=) and cannot tell whether a "
                    "keyword tensor is per task or shared; pass it positionally"
                )
        return in_dims

    def call(
        self,
        tree: ModuleTree,
        fn: Callable[..., Any],
        params: Sequence[torch.Tensor],
        buffers: List[torch.Tensor],
        args: tuple,
        kwargs: dict,
        compiling: bool,
    ) -> Tuple[Any, List[torch.Tensor]]:
        """Run ``fn`` once per task; returns the stacked outputs and the stacked buffers.

        ``params`` and ``buffers`` are the stacked tensors the copies hold between calls; they
        hold them again afterwards, also when ``fn`` raises.
        """
        device = next((t.device for t in (*params, *buffers)), None)
        in_dims = self.in_dims(args, kwargs, device)
        # vmap drops autocast for some ops (F.linear with a bias in torch 2.13): loop instead.
        autocast = device is not None and torch.is_autocast_enabled(device.type)
        if autocast:
            _warn_once(
                ("autocast",),
                "torch.autocast does not reach every op under torch.vmap: with autocast on, "
                "num_tasks runs the tasks in a Python loop",
            )
        run = self._loop if self.loop or autocast else self._vmap
        if compiling or self._lock is None:
            return run(tree, fn, params, buffers, args, in_dims, kwargs)
        with self._lock:
            return run(tree, fn, params, buffers, args, in_dims, kwargs)

    def _vmap(self, tree, fn, params, buffers, args, in_dims, kwargs):
        passthrough: Dict[str, Any] = {}

        def one_task(task_params, task_buffers, *task_args):
            tree.write_params(task_params)
            tree.write_buffers(task_buffers)
            leftovers = _Leftovers(tree)
            out = fn(*task_args, **kwargs)
            changed = leftovers.changed()
            # Outputs and attributes that are not tensors (None, ints) cannot leave vmap;
            # they are the same for every task, so the trace's own values are kept.
            tensors, rebuild = _split_tensors((out, [value for _, _, value in changed]))
            passthrough.update(rebuild=rebuild, changed=changed, leftovers=leftovers)
            return tensors, tree.read_buffers()

        try:
            tensors, new_buffers = torch.vmap(
                one_task, in_dims=(0, 0, *in_dims), randomness=self.randomness
            )(params, buffers, *args)
        finally:
            if "leftovers" in passthrough:
                passthrough["leftovers"].restore()
            tree.write_params(params)
            tree.write_buffers(buffers)
        out, values = passthrough["rebuild"](tensors)
        for (holder, key, _), value in zip(passthrough["changed"], values):
            holder[key] = value
        new_buffers = list(new_buffers)
        tree.write_buffers(new_buffers)
        return out, new_buffers

    def _loop(self, tree, fn, params, buffers, args, in_dims, kwargs):
        def task_slice(arg, dim, t):
            if dim is None:
                return arg
            return pytree.tree_map(
                lambda x: x.select(dim, t) if isinstance(x, torch.Tensor) else x, arg
            )

        outs, per_task_buffers, per_task_changed = [], [], []
        reassigned = [False] * len(buffers)
        try:
            for t in range(self.size):
                views = [b[t] for b in buffers]  # in-place updates (BatchNorm) land in the stack
                tree.write_params([p[t] for p in params])
                tree.write_buffers(views)
                leftovers = _Leftovers(tree)
                task_args = tuple(task_slice(arg, dim, t) for arg, dim in zip(args, in_dims))
                outs.append(fn(*task_args, **kwargs))
                own = tree.read_buffers()
                reassigned = [r or o is not v for r, o, v in zip(reassigned, own, views)]
                per_task_buffers.append(own)
                per_task_changed.append(leftovers.changed())
                leftovers.restore()
        finally:
            tree.write_params(params)
            tree.write_buffers(buffers)
        stacked = [
            torch.stack([own[i] for own in per_task_buffers]) if changed else b
            for i, (b, changed) in enumerate(zip(buffers, reassigned))
        ]
        for entries in zip(*per_task_changed):
            holder, key, _ = entries[0]
            holder[key] = _stack_tasks([value for _, _, value in entries])
        tree.write_buffers(stacked)
        return _stack_tasks(outs), stacked


def _stack_tasks(per_task: List[Any]) -> Any:
    """Stack the tensor leaves of per-task results; other leaves are the first task's."""
    tensors, rebuild = _split_tensors(per_task[0])
    columns = [_split_tensors(result)[0] for result in per_task]
    return rebuild([torch.stack(column) for column in zip(*columns)] if tensors else [])
