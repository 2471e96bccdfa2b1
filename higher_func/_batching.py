"""Many tasks' inner loops as one computation over stacked weights.

Tasks are independent, so stacking their fast weights ``[T, *shape]`` and vmapping the
forward over the leading dim computes every task at once. The gradient of the *sum* of the
per-task losses with respect to the stacked weights is then exactly each task's own gradient,
which is why the optimizers need nothing but one loss per task.

Between calls the patch's module copies hold the stacked tensors (so ``fmodel.fc.weight`` reads
``[T, *shape]``); for the length of a call they hold one task's tensors, inside vmap or inside a
loop over tasks. Everything else the forward leaves on the copies is kept per task by
``_task_state.TaskState`` (the per-task contract, docs/batching.md), which both paths go
through: it lends each task its values before the task runs and takes back what it left.

How a patch runs its tasks is ``batching=``'s choice, or with ``"auto"`` decided once: at
patch time from the module types (modules without batching rules, and convolutions with
BatchNorm on a CPU, where the loop is faster), otherwise at the first call that vmap cannot
run (a missing batching rule, an ``autograd.Function`` without ``setup_context``, ``.item()``
in the forward, per-task state of different structures): that call is run again in the loop,
and so is every later call of the patch.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ._compat import (
    VMAP_LIMITS,
    BatchNorm,
    ConvNd,
    attention_fastpath_off,
    autocast_enabled,
    is_compiling,
    pytree,
    user_stacklevel,
)
from ._task_state import ABSENT, Captured, PerTaskError, TaskState, rebuild, split, stack_values
from ._tree import ModuleTree

_warned: set = set()
_RANDOMNESS = ("different", "same", "error")
_BATCHING = ("auto", "vmap", "loop")

# Modules whose forward takes a fused inference-only kernel when no weight seems to require
# grad: inside vmap the per-task weights never do, and the step then fails with "derivative
# for aten::_transformer_encoder_layer_fwd is not implemented".
_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


def _unbatchable(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot run under torch.vmap in current torch, or None."""
    # lstm, gru, rnn_tanh and their cells have no batching rule ("Batching rule not
    # implemented"); BatchNorm with momentum=None averages with 1 / num_batches_tracked.item().
    name = type(module).__name__
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) or (
        isinstance(module, BatchNorm) and module.momentum is None and module.track_running_stats
    ):
        return f"{name} has no vmap batching rule in torch {torch.__version__}"
    return None


def _loop_is_faster(module: nn.Module, device: Optional[torch.device]) -> Optional[str]:
    """Why a loop over tasks beats vmap for ``module`` on ``device``, or None.

    On a CPU, vmap turns a convolution over stacked weights into one grouped convolution, and
    BatchNorm over stacked statistics into reshapes around it; with both, a vmapped meta-step
    of benchmark W2 (conv4 + BatchNorm2d, 8 tasks, written by hand) ran 0.73x higher's speed
    and the loop 0.93x (docs/batching.md).
    """
    if device is None or device.type != "cpu":
        return None
    kinds = list(module.modules())
    conv = next((m for m in kinds if isinstance(m, ConvNd)), None)
    norm = next((m for m in kinds if isinstance(m, BatchNorm)), None)
    if conv is None or norm is None:
        return None
    return (
        f"{type(conv).__name__} with {type(norm).__name__} on a CPU: a loop over tasks is "
        "faster than vmap there"
    )


def check_num_tasks(num_tasks: Any) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    return num_tasks


def check_batching(batching: Any) -> str:
    if not isinstance(batching, str) or batching not in _BATCHING:
        raise ValueError(
            f"batching must be one of {_BATCHING} ('auto': vmap where it can run the tasks and "
            f"is faster, else a loop over tasks), got {batching!r}"
        )
    return batching


def check_randomness(randomness: Any) -> str:
    if randomness not in _RANDOMNESS:
        raise ValueError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")
    return randomness


class BatchingFallbackWarning(UserWarning):
    """A batched patched module runs its tasks in a Python loop instead of one vmap."""


def _warn_once(key: Tuple[str, ...], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, BatchingFallbackWarning, stacklevel=user_stacklevel())


def _is_vmap_limit(error: BaseException) -> bool:
    if not isinstance(error, (RuntimeError, NotImplementedError)):
        return False
    message = str(error)
    return any(limit in message for limit in VMAP_LIMITS)


def _split_tensors(tree: Any) -> Tuple[List[torch.Tensor], Callable[[List[Any]], Any]]:
    """The tensor leaves of ``tree`` and a function that puts (new) tensors back in place;
    leaves that are not tensors (None, ints, strings) pass through unchanged."""
    leaves, spec = pytree.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) and _holds_tensors(leaf):
            raise TypeError(
                f"a batched patched module returned a {type(leaf).__name__} holding tensors, "
                "which torch's pytree cannot look into: its tensors cannot be split or stacked "
                "per task. Return tuples, lists, dicts or namedtuples, or register the type "
                "with torch's pytree (its register_pytree_node)"
            )

    def rebuild(tensors: List[Any]) -> Any:
        new = list(leaves)
        for i, t in zip(where, tensors):
            new[i] = t
        return pytree.tree_unflatten(new, spec)

    return [leaves[i] for i in where], rebuild


def _holds_tensors(value: Any) -> bool:
    """Whether an object that is not a pytree node keeps tensors in its attributes (not
    checked while compiling: Dynamo cannot look into every object's __dict__)."""
    if value is None or type(value) in (bool, int, float, str) or is_compiling():
        return False
    attributes = getattr(value, "__dict__", None)
    if not isinstance(attributes, dict) or isinstance(value, (type, torch.nn.Module)):
        return False
    return any(isinstance(v, torch.Tensor) for v in attributes.values())


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


class _Inputs:
    """A call's inputs split by task: positional and keyword, each mapped along a dim or
    shared by all tasks."""

    def __init__(
        self,
        args: tuple,
        arg_dims: Tuple[Optional[int], ...],
        kwargs: dict,
        kwarg_dims: Dict[str, Optional[int]],
    ) -> None:
        self.args, self.arg_dims = args, arg_dims
        self.mapped = {k: v for k, v in kwargs.items() if kwarg_dims.get(k) is not None}
        self.mapped_dims = {k: kwarg_dims[k] for k in self.mapped}
        self.shared = {k: v for k, v in kwargs.items() if k not in self.mapped}

    def of_task(self, t: int) -> Tuple[tuple, dict]:
        def select(value: Any, dim: Optional[int]) -> Any:
            if dim is None:
                return value
            return pytree.tree_map(
                lambda x: x.select(dim, t) if isinstance(x, torch.Tensor) else x, value
            )

        args = tuple(select(a, d) for a, d in zip(self.args, self.arg_dims))
        mapped = {k: select(v, self.mapped_dims[k]) for k, v in self.mapped.items()}
        return args, {**self.shared, **mapped}


class TaskBatch:
    """How a patched module runs ``size`` tasks: vmapped, or looped where vmap cannot run
    them or is slower, or as ``batching=`` says."""

    def __init__(
        self,
        size: int,
        module: nn.Module,
        randomness: str = "different",
        device: Optional[torch.device] = None,
        batching: str = "auto",
    ) -> None:
        self.size = check_num_tasks(size)
        self.randomness = check_randomness(randomness)
        self.batching = check_batching(batching)
        self._state: Optional[TaskState] = None
        self._captured: Optional[Captured] = None
        # Calls lend one task's tensors into the patch's copies: two threads calling the same
        # batched patched module take turns. (Dynamo cannot build a lock; compiled code has
        # no threads to exclude.)
        self._lock = None if is_compiling() else threading.RLock()
        self._attention = any(isinstance(m, _ATTENTION) for m in module.modules())
        self.mode, self.reason = "vmap", None
        if batching == "vmap":
            return
        if batching == "loop":
            self.mode, self.reason = "loop", "batching='loop' was asked for"
            return
        unbatchable = sorted({r for r in map(_unbatchable, module.modules()) if r is not None})
        if device is None:
            device = next((t.device for t in (*module.parameters(), *module.buffers())), None)
        if unbatchable:
            self._fall_back(tuple(unbatchable), "; ".join(unbatchable))
        elif not is_compiling():
            # Compiled code keeps vmap: Inductor fuses the batched graph, where the speed
            # measured above does not apply.
            faster = _loop_is_faster(module, device)
            if faster is not None:
                self.mode, self.reason = "loop", faster

    def _fall_back(self, key: Tuple[str, ...], reason: str) -> None:
        self.mode, self.reason = "loop", reason
        _warn_once(
            key,
            f"{reason}: num_tasks runs the tasks in a Python loop (the same results, without "
            "the speed of vmap)",
        )

    def stack(self, tensor: torch.Tensor) -> torch.Tensor:
        """A real copy of ``tensor`` per task (in-place updates must not alias)."""
        return tensor.expand(self.size, *tensor.shape).clone()

    def _check_mapped(self, what: str, value: Any, dim: Any, device: Any) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"in_dims for {what} must be an int or None, got {dim!r}")
        for leaf in pytree.tree_leaves(value):
            if not isinstance(leaf, torch.Tensor):
                continue
            if not -leaf.dim() <= dim < leaf.dim() or leaf.shape[dim] != self.size:
                raise ValueError(
                    f"{what} has shape {tuple(leaf.shape)}: a batched patched module expects "
                    f"num_tasks={self.size} along dim {dim} (mark inputs shared by all tasks "
                    "with None in in_dims)"
                )
            if device is not None and leaf.device.type != device.type:
                raise ValueError(f"{what} is on {leaf.device} but the fast weights are on {device}")

    def inputs(self, args: tuple, kwargs: dict, device: Optional[torch.device]) -> _Inputs:
        """Pop the ``in_dims=`` call option and check every mapped input has ``size`` tasks
        and lives on the weights' ``device`` (vmap over mixed devices can silently return
        garbage).

        ``in_dims`` is an int or None for every positional input, or a tuple with one entry
        per positional input, optionally followed by a dict ``{keyword: int or None}`` for the
        keyword inputs that hold tensors. A keyword tensor must be named there: whether it is
        per task or shared is never guessed.
        """
        in_dims = kwargs.pop("in_dims", 0)
        kwarg_dims: Dict[str, Any] = {}
        if in_dims is None or isinstance(in_dims, int):
            in_dims = (in_dims,) * len(args)
        if not isinstance(in_dims, (tuple, list)):
            raise TypeError(
                "in_dims must be an int, None, or a tuple of them (one per positional input) "
                f"optionally ending with a dict for keyword inputs; got {in_dims!r}"
            )
        in_dims = tuple(in_dims)
        if len(in_dims) == len(args) + 1 and isinstance(in_dims[-1], Mapping):
            kwarg_dims, in_dims = dict(in_dims[-1]), in_dims[:-1]
        if len(in_dims) != len(args):
            raise ValueError(
                f"in_dims has {len(in_dims)} entries for {len(args)} positional inputs (keyword "
                "inputs go in a dict at its end: in_dims=(0, {'mask': None}))"
            )
        # An input that holds no tensor (None, a flag) has nothing to map: every task gets it
        # as it is, whatever dim it was given.
        in_dims = tuple(d if _has_tensor(a) else None for a, d in zip(args, in_dims))
        for position, (arg, dim) in enumerate(zip(args, in_dims)):
            if dim is not None:
                self._check_mapped(f"input {position}", arg, dim, device)
        unknown = sorted(k for k in kwarg_dims if k not in kwargs)
        if unknown:
            raise ValueError(f"in_dims names keyword inputs {unknown} that the call does not pass")
        for key, value in kwargs.items():
            if key not in kwarg_dims:
                if _has_tensor(value):
                    raise TypeError(
                        f"keyword input {key}= holds a tensor: say whether it is per task or "
                        f"shared by all tasks, with in_dims=(..., {{{key!r}: 0}}) (its dim 0 is "
                        f"the task) or in_dims=(..., {{{key!r}: None}}) (shared), after one "
                        "entry per positional input"
                    )
            elif kwarg_dims[key] is not None:
                self._check_mapped(f"keyword input {key}=", value, kwarg_dims[key], device)
        return _Inputs(args, in_dims, kwargs, kwarg_dims)

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
        hold them again afterwards, also when ``fn`` raises. Each call works on its own copy
        of the buffers: torch updates running statistics in place, and a tensor an earlier
        call saved for backward (BatchNorm in eval mode) must not change under it.
        """
        device = next((t.device for t in (*params, *buffers)), None)
        inputs = self.inputs(args, kwargs, device)
        if self._state is None:
            self._state = TaskState(tree.root.named_modules(), self.size, tree.buffer_slot_keys)
            self._captured = Captured(tree.root.named_modules())
        # vmap drops autocast for some ops (F.linear with a bias in torch 2.13): loop instead.
        autocast = device is not None and autocast_enabled(device.type)
        if autocast and self.batching == "vmap":
            raise RuntimeError(
                "batching='vmap' under torch.autocast: torch.vmap does not apply autocast to "
                "every op (the results would silently differ from a loop over tasks); use "
                "batching='auto' or 'loop' with autocast"
            )
        if autocast and self.mode != "loop":
            _warn_once(
                ("autocast",),
                "torch.autocast does not reach every op under torch.vmap: with autocast on, "
                "num_tasks runs the tasks in a Python loop",
            )
        if compiling or self._lock is None:
            return self._run(tree, fn, params, buffers, inputs, autocast)
        with self._lock:
            return self._run(tree, fn, params, buffers, inputs, autocast)

    def _run(self, tree, fn, params, buffers, inputs, autocast):
        state, captured = self._state, self._captured
        assert state is not None and captured is not None
        state.sync()
        watched = captured.snapshot()
        try:
            if self.mode == "loop" or autocast:
                result = self._loop(tree, fn, params, buffers, inputs)
            elif self.batching == "vmap":
                result = self._vmap(tree, fn, params, buffers, inputs)
            else:
                result = self._vmap_or_loop(tree, fn, params, buffers, inputs)
        except BaseException:
            captured.put_back(watched)  # the call's own error is the one to see
            raise
        captured.check(watched)
        state.place()
        return result

    def _vmap_or_loop(self, tree, fn, params, buffers, inputs):
        """vmap, or the loop for good if vmap meets one of its limits."""
        try:
            return self._vmap(tree, fn, params, buffers, inputs)
        except PerTaskError as error:
            reason = f"per-task state vmap cannot take: {error}"
            self._fall_back(("state", str(error)), reason)
        except Exception as error:
            if not _is_vmap_limit(error):
                raise
            first_line = str(error).strip().splitlines()[0]
            self._fall_back((type(error).__name__, first_line), f"torch.vmap: {first_line}")
        return self._loop(tree, fn, params, buffers, inputs)

    def _vmap(self, tree, fn, params, buffers, inputs: _Inputs):
        state = self._state
        assert state is not None
        keys, layouts, leaves = state.for_vmap()
        base = state.snapshot()  # the views, restored after the call
        own_buffers = [b.clone() for b in buffers]
        passthrough: Dict[str, Any] = {}

        def one_task(task_params, task_buffers, task_leaves, task_kwargs, *task_args):
            tree.write_params(task_params)
            tree.write_buffers(task_buffers)
            for key, layout, values in zip(keys, layouts, task_leaves):
                lend(state.holder_of(key), key[1], rebuild(layout, values))
            before = state.snapshot()
            out = fn(*task_args, **inputs.shared, **task_kwargs)
            new_keys = [k for k in state.changed(before) if k not in state.entries]
            left = state.read([*keys, *new_keys])
            for key, value in left.items():
                if any(_holds_tensors(leaf) for leaf in pytree.tree_leaves(value)):
                    raise PerTaskError(
                        f"attribute {state.name(key)!r} holds a {type(value).__name__} with "
                        "tensors in it, which torch's pytree cannot look into: torch.vmap "
                        "cannot keep it per task (batching='loop' can; or keep the tensors in "
                        "tuples, lists, dicts or namedtuples)"
                    )
            out_tensors, out_rebuild = _split_tensors(out)
            split_left = [split(v) for v in left.values()]
            passthrough.update(
                out=out_rebuild, keys=list(left), layouts=[layout for layout, _ in split_left]
            )
            return out_tensors, tree.read_buffers(), [t for _, t in split_left]

        batched = torch.vmap(
            one_task,
            in_dims=(0, 0, 0, inputs.mapped_dims, *inputs.arg_dims),
            randomness=self.randomness,
        )
        # (Dynamo does not trace the switch: higher_func.compile turns it off around the call.)
        flip = self._attention and not is_compiling()
        fastpath = attention_fastpath_off() if flip else contextlib.nullcontext()
        try:
            with fastpath:
                tensors, new_buffers, new_leaves = batched(
                    params, own_buffers, leaves, inputs.mapped, *inputs.args
                )
        finally:
            state.restore(base)
            tree.write_params(params)
            tree.write_buffers(buffers)
        out = passthrough["out"](tensors)
        for key, layout, values in zip(passthrough["keys"], passthrough["layouts"], new_leaves):
            state.set_stacked(key, rebuild(layout, values))
        new_buffers = list(new_buffers)
        tree.write_buffers(new_buffers)
        return out, new_buffers

    def _loop(self, tree, fn, params, buffers, inputs: _Inputs):
        state = self._state
        assert state is not None
        own_buffers = [b.clone() for b in buffers]
        outs, per_task_buffers, left = [], [], []
        reassigned = [False] * len(buffers)
        rng = _Randomness(self.randomness, buffers[0].device if buffers else None)
        base = state.snapshot()
        try:
            for t in range(self.size):
                views = [b[t] for b in own_buffers]  # in-place updates land in the stack
                tree.write_params([p[t] for p in params])
                tree.write_buffers(views)
                state.lend(t)
                before = state.snapshot()
                task_args, task_kwargs = inputs.of_task(t)
                try:
                    with rng.task():
                        outs.append(fn(*task_args, **task_kwargs))
                    own = tree.read_buffers()
                    reassigned = [r or o is not v for r, o, v in zip(reassigned, own, views)]
                    per_task_buffers.append(own)
                    left.append(state.read({*state.entries, *state.changed(before)}))
                finally:
                    state.restore(base)
        finally:
            tree.write_params(params)
            tree.write_buffers(buffers)
        state.collect_tasks(left, base)
        stacked = [
            torch.stack([own[i] for own in per_task_buffers]) if changed else b
            for i, (b, changed) in enumerate(zip(own_buffers, reassigned))
        ]
        tree.write_buffers(stacked)
        for value in outs:
            _split_tensors(value)  # refuses outputs whose tensors cannot be stacked
        return stack_values(outs, "the output"), stacked


def lend(holder: Dict[str, Any], key: str, value: Any) -> None:
    if value is ABSENT:
        holder.pop(key, None)
    else:
        holder[key] = value


def _same_state(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


class _Randomness:
    """vmap's ``randomness=`` for the loop over tasks: ``"different"`` draws on (each task
    continues the generator), ``"same"`` starts every task from the same generator state,
    ``"error"`` refuses a task that draws."""

    def __init__(self, randomness: str, device: Optional[torch.device]) -> None:
        self.randomness = randomness
        self._cuda = device is not None and device.type == "cuda"
        self._start = self._state() if randomness != "different" else None

    def _state(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return torch.get_rng_state(), torch.cuda.get_rng_state() if self._cuda else None

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        start = self._start
        if self.randomness == "same" and start is not None:
            cpu, cuda = start
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)
        yield
        if self.randomness == "error" and start is not None:
            if not all(_same_state(a, b) for a, b in zip(self._state(), start)):
                raise RuntimeError(
                    "a random operation ran in a batched patched module created with "
                    "randomness='error' (use 'different' for each task its own draws, or "
                    "'same' for one draw shared by all tasks)"
                )
