"""The per-task contract of a batched patch: Python-side state, one copy per task.

A batched patched module must hold, for each task, exactly what a separate patch of that
task would hold after the same calls. Everything a forward, hook or method leaves on the
patch's module copies (attributes of any kind: tensors, tuples, numbers, lists it appends to,
dicts, ``None``; tensors updated in place; keys it adds or deletes) is therefore kept per task
here, keyed by the module copy that holds it and its name, never by position, and lent back
to each task at its next call.

Between calls the copies hold a *view* that a user can read: tensor leaves stacked
``[T, ...]``, other leaves as they are when every task has the same one, Python numbers that
differ between tasks as a ``[T]`` tensor. Where the tasks' values cannot be shown as one
(one task has the attribute and another has not, a tuple in one and a tensor in another), the
view is a marker whose every read raises an error naming the attribute; the tasks keep their
own values regardless.

A value assigned from outside a call (``fmodel.prev = None``, ``fmodel.acts.clear()``) is one
value for every task, as if it were assigned to each of T patches: each task starts its next
call from its own copy of it (fresh containers, cloned tensors). Whether a value is per task
or shared is decided by where it came from, never by its shape.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._compat import is_compiling, pytree

ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "<absent>"})()
_TENSOR: Any = object()  # where a tensor leaf goes in a layout

_Key = Tuple[int, str]  # (id of the holding dict, attribute name)
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_NUMBERS = {bool: torch.bool, int: torch.int64, float: torch.float64}


class PerTaskError(ValueError):
    """Per-task state that a batched patched module cannot hold or show as one value."""


class Mixed:
    """What a copy holds between calls for an attribute whose tasks hold values that cannot
    be shown as one; reading it through the patched module raises ``PerTaskError``."""

    __slots__ = ("name", "reason")

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def error(self) -> PerTaskError:
        return PerTaskError(
            f"attribute {self.name!r} of a batched patched module differs between tasks in a "
            f"way one value cannot show ({self.reason}); each task keeps its own and sees it in "
            "its calls. Read it per task inside a method of the module, or give every task the "
            "same structure (set the attribute in every task, to None where it has no value)"
        )

    def __repr__(self) -> str:
        return f"<per-task {self.name!r}: {self.reason}>"


def same_leaf(a: Any, b: Any) -> bool:
    """Whether two non-tensor leaves are the same value (plain values by equality, other
    objects by identity: an object's ``__eq__`` is the user's and may be anything)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) in (set, frozenset):  # (pytree does not look into sets)
        return all(type(x) in _PLAIN for x in (*a, *b)) and a == b
    return type(a) in _PLAIN and a == b


def stack_values(values: Sequence[Any], name: str) -> Any:
    """T per-task values as one: tensor leaves stacked, shared leaves kept, differing
    numbers as a ``[T]`` tensor. Raises ``PerTaskError`` naming ``name`` where the tasks'
    structures differ."""
    flat = [pytree.tree_flatten(v) for v in values]
    leaves0, spec = flat[0]
    for t, (_, other) in enumerate(flat[1:], 1):
        if other != spec:
            raise PerTaskError(
                f"{name} has a different structure in task 0 ({_describe(values[0])}) and task "
                f"{t} ({_describe(values[t])}): per-task values cannot be stacked into one"
            )
    out = []
    for i in range(len(leaves0)):
        column = [leaves[i] for leaves, _ in flat]
        out.append(_stack_column(column, f"{name} (leaf {i})"))
    return pytree.tree_unflatten(out, spec)


def _stack_column(column: List[Any], name: str) -> Any:
    first = column[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in column):
            raise PerTaskError(f"{name} is a tensor in some tasks and not in others")
        shapes = {tuple(v.shape) for v in column}
        if len(shapes) > 1 or len({v.dtype for v in column}) > 1:
            raise PerTaskError(
                f"{name} has a different shape or dtype per task ({sorted(shapes)}): per-task "
                "tensors cannot be stacked into one"
            )
        return torch.stack(column)
    if all(same_leaf(first, v) for v in column):
        return first
    dtype = _NUMBERS.get(type(first))
    if dtype is not None and all(type(v) is type(first) for v in column):
        return torch.tensor(column, dtype=dtype)
    raise PerTaskError(
        f"{name} differs between tasks ({', '.join(_describe(v) for v in column[:3])}...) and "
        "is neither a tensor nor a number: per-task values cannot be stacked into one"
    )


def _describe(value: Any) -> str:
    if value is ABSENT:
        return "not set"
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    return type(value).__name__


def fresh(value: Any) -> Any:
    """A task's own copy of a value shared by all tasks: new containers, cloned tensors
    (so that appending, or updating a tensor in place, touches this task only)."""
    if value is ABSENT or type(value) in _PLAIN:
        return value
    return pytree.tree_map(_own_leaf, value)


def _own_leaf(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return leaf.clone()
    if type(leaf) is set:  # a leaf to pytree, but a container a forward may add to
        return set(leaf)
    return leaf


def _is_state(value: Any) -> bool:
    """Whether an attribute present before any call may be changed in place by a forward:
    a plain tensor, or a container (with or without tensors in it yet)."""
    if isinstance(value, torch.Tensor):
        return not isinstance(value, nn.Parameter)
    if type(value) in (list, dict, set):
        return True
    return isinstance(value, tuple) and any(
        isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)
    )


class _Entry:
    """One attribute's per-task value: ``shared`` (one value every task starts from),
    ``stacked`` (the view, tensor leaves ``[T, ...]``; task t takes ``leaf[t]``), or
    ``tasks`` (a list of the T tasks' own values)."""

    __slots__ = ("holder", "key", "kind", "value", "placed", "seen")

    def __init__(self, holder: Dict[str, Any], key: str, kind: str, value: Any) -> None:
        self.holder, self.key = holder, key
        self.kind, self.value = kind, value
        self.placed: Any = ABSENT  # what the copy was given to show between calls
        self.seen: Any = None  # the placed value's leaves, to notice in-place edits from outside

    def of_task(self, t: int) -> Any:
        if self.kind == "tasks":
            return self.value[t]
        if self.kind == "stacked":
            return pytree.tree_map(lambda x: x[t] if isinstance(x, torch.Tensor) else x, self.value)
        return fresh(self.value)


class TaskState:
    """The per-task attributes of one batched patch (see the module docstring).

    Args:
        modules: ``(name, copy)`` for every module copy of the patch.
        size: the number of tasks.
        skip: ``(id(dict), key)`` of the slots the patch itself manages (parameters,
            buffers); never tracked here.
    """

    def __init__(
        self, modules: Iterable[Tuple[str, nn.Module]], size: int, skip: Iterable[_Key]
    ) -> None:
        self.size = size
        self._names: Dict[int, str] = {}
        self.holders: List[Dict[str, Any]] = []
        modules_list = list(modules)
        for name, module in modules_list:
            # A module's buffer dict only where a buffer is registered as None (a forward may
            # fill it in); its other keys are the patch's own slots.
            buffers = module._buffers
            own = [buffers] if any(b is None for b in buffers.values()) else []
            for holder in (module.__dict__, *own):
                if id(holder) not in self._names:
                    self._names[id(holder)] = name
                    self.holders.append(holder)
        self._skip = set(skip)
        for _, module in modules_list:
            self._skip |= {(id(module.__dict__), k) for k in _never(module)}
        self.entries: Dict[_Key, _Entry] = {}
        self._placed: Optional[List[Tuple[Dict[str, Any], Any]]] = None
        self._watched: List[Any] = [(-1, (), _getter(()))] * len(self.holders)
        self.sync()

    # -- between calls -------------------------------------------------------------------------
    def name(self, key: _Key) -> str:
        prefix = self._names.get(key[0], "")
        return f"{prefix}.{key[1]}" if prefix else key[1]

    def sync(self) -> None:
        """Take in what changed on the copies since the last call: values assigned from
        outside (shared by every task from now on) and new container or tensor attributes."""
        placed = self._placed
        for i, holder in enumerate(self.holders):
            if placed is not None and self._same(i, placed[i]):
                continue  # (the usual case: nothing was assigned since the last call)
            hid = id(holder)
            for key, value in holder.items():
                k = (hid, key)
                if k in self._skip:
                    continue
                entry = self.entries.get(k)
                if entry is None:
                    if _is_state(value):
                        self.entries[k] = _Entry(holder, key, "shared", value)
                elif not _is(value, entry.placed):
                    self.entries[k] = _Entry(holder, key, "shared", value)
        for k, entry in list(self.entries.items()):
            if entry.placed is not ABSENT and entry.key not in entry.holder:  # deleted outside
                entry.kind, entry.value, entry.placed = "shared", ABSENT, ABSENT
            elif entry.seen is not None and _edited(entry):  # fmodel.acts.clear()
                self.entries[k] = _Entry(entry.holder, entry.key, "shared", entry.placed)

    def restore(self, before: List[Tuple[Dict[str, Any], Any]]) -> None:
        """Put the copies' attributes back as ``before`` lists them (after a task's call)."""
        for i, (holder, snap) in enumerate(zip(self.holders, before)):
            if not self._same(i, snap):
                old = snap[0]
                for key in [k for k in holder if k not in old]:
                    del holder[key]
                holder.update(old)

    def snapshot(self) -> List[Tuple[Dict[str, Any], Any]]:
        """The copies' attributes now: a copy of each dict, and a cheap fingerprint of it
        (see ``_same``)."""
        if is_compiling():  # (Dynamo traces id() of some objects only)
            return [(dict(h), None) for h in self.holders]
        return [(dict(h), self._fingerprint(i)) for i, h in enumerate(self.holders)]

    def _fingerprint(self, i: int) -> Tuple[int, Any, List[int]]:
        holder = self.holders[i]
        watched = self._watched[i]
        try:
            values = watched[2](holder) if watched[0] == len(holder) else None
        except KeyError:
            values = None
        if values is None:  # keys were added or deleted: watch them anew
            keys = tuple(k for k in holder if (id(holder), k) not in self._skip)
            watched = self._watched[i] = (len(holder), keys, _getter(keys))
            values = watched[2](holder)
        last = next(reversed(holder)) if holder else None
        return len(holder), last, list(map(id, values))

    def _same(self, i: int, snap: Tuple[Dict[str, Any], Any]) -> bool:
        """Whether holder ``i`` holds what ``snap`` recorded: the same number of keys, the
        same last key (a key deleted and another added changes it) and the same objects
        under the keys the patch does not manage (nn.Module's bookkeeping containers never
        change identity). About a microsecond per module: this runs a few times per call."""
        mark = snap[1]
        if mark is None:
            return False
        holder = self.holders[i]
        if len(holder) != mark[0] or (holder and next(reversed(holder)) != mark[1]):
            return False
        watched = self._watched[i]
        try:
            return watched[0] == mark[0] and list(map(id, watched[2](holder))) == mark[2]
        except KeyError:  # a watched key was deleted (and another added)
            return False

    def changed(self, before: List[Tuple[Dict[str, Any], Any]]) -> List[_Key]:
        """Keys a call added, reassigned or deleted, other than the patch's own slots."""
        out = []
        for i, (holder, snap) in enumerate(zip(self.holders, before)):
            if self._same(i, snap):
                continue
            old, hid = snap[0], id(holder)
            for key, value in holder.items():
                if (hid, key) not in self._skip and not _is(old.get(key, ABSENT), value):
                    out.append((hid, key))
            for key in old:
                if key not in holder and (hid, key) not in self._skip:
                    out.append((hid, key))
        return out

    def holder_of(self, key: _Key) -> Dict[str, Any]:
        return next(h for h in self.holders if id(h) == key[0])

    def place(self) -> None:
        """Give the copies every entry's view (what the user reads between calls)."""
        for k, entry in self.entries.items():
            if entry.kind == "shared":
                view = entry.value
            elif entry.kind == "stacked":
                view = entry.value
            else:
                view = _view_of_tasks(entry.value, self.name(k))
            entry.placed = view
            if view is ABSENT:
                entry.holder.pop(entry.key, None)
            else:
                entry.holder[entry.key] = view
            entry.seen = _leaves_of(view)
        self._placed = self.snapshot()

    # -- a task's call (the loop) ----------------------------------------------------------------
    def lend(self, t: int) -> None:
        for entry in self.entries.values():
            value = entry.of_task(t)
            if value is ABSENT:
                entry.holder.pop(entry.key, None)
            else:
                entry.holder[entry.key] = value

    def collect_tasks(
        self, per_task: List[Dict[_Key, Any]], before: List[Tuple[Dict[str, Any], Any]]
    ) -> None:
        """Make the entries hold what each task left (``per_task[t]``: key -> value for the
        keys tracked or changed in task t); a key one task changed and another did not keeps,
        for the other, what it held before the call."""
        keys = {k for values in per_task for k in values}
        for k in keys:
            entry = self.entries.get(k)
            if entry is None:
                holder = self.holder_of(k)
                old = before[self.holders.index(holder)][0].get(k[1], ABSENT)
                values = [task.get(k, old) for task in per_task]
                entry = self.entries[k] = _Entry(holder, k[1], "tasks", values)
            else:
                entry.kind = "tasks"
                entry.value = [task[k] for task in per_task]

    def set_stacked(self, key: _Key, value: Any) -> None:
        """What a vmapped call left under ``key``: ``value`` with tensor leaves ``[T, ...]``."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry(self.holder_of(key), key[1], "stacked", value)
        entry.kind, entry.value = "stacked", value

    def read(self, keys: Iterable[_Key]) -> Dict[_Key, Any]:
        return {k: self.holder_of(k).get(k[1], ABSENT) for k in keys}

    # -- one vmapped call ------------------------------------------------------------------------
    def for_vmap(self) -> Tuple[List[_Key], List[Any], List[List[torch.Tensor]]]:
        """Each entry as vmap takes it: its pytree spec with non-tensor leaves, and its tensor
        leaves stacked ``[T, ...]``. Raises ``PerTaskError`` for per-task values that differ
        in structure (vmap runs one trace for all tasks)."""
        keys: List[_Key] = []
        specs: List[Any] = []
        tensors: List[List[torch.Tensor]] = []
        for k, entry in self.entries.items():
            if entry.kind == "stacked":
                value = entry.value
            elif entry.kind == "tasks":
                value = stack_values(entry.value, f"attribute {self.name(k)!r}")
            else:
                value = pytree.tree_map(self._expand, entry.value)
            layout, leaves = split(value)
            keys.append(k)
            specs.append(layout)
            tensors.append(leaves)
        return keys, specs, tensors

    def _expand(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.expand(self.size, *x.shape).clone()
        return x


def rebuild(layout: Tuple[Any, List[Any]], tensors: Sequence[torch.Tensor]) -> Any:
    """A value from its layout (see ``split``) and (new) tensor leaves."""
    spec, consts = layout
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if c is _TENSOR else c for c in consts], spec)


def split(value: Any) -> Tuple[Tuple[Any, List[Any]], List[torch.Tensor]]:
    """``value``'s layout (pytree spec, non-tensor leaves) and its tensor leaves."""
    leaves, spec = pytree.tree_flatten(value)
    consts = [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
    return (spec, consts), [x for x in leaves if isinstance(x, torch.Tensor)]


def _is(a: Any, b: Any) -> bool:
    """``a is b``; while compiling, tuples and lists by their items' identity (Dynamo does
    not trace ``is`` between them, and a tuple of the same objects is the same value)."""
    if is_compiling() and isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_is, a, b))
    return a is b


def _getter(keys: Tuple[str, ...]) -> Callable[[Dict[str, Any]], Tuple[Any, ...]]:
    """A function giving a dict's values under ``keys``, as a tuple (in C, fast)."""
    if len(keys) == 0:
        return lambda holder: ()
    if len(keys) == 1:
        key = keys[0]
        return lambda holder: (holder[key],)
    return operator.itemgetter(*keys)


def _view_of_tasks(values: List[Any], name: str) -> Any:
    if all(v is ABSENT for v in values):
        return ABSENT
    try:
        return stack_values(values, f"attribute {name!r}")
    except PerTaskError as error:
        reason = str(error).split(": per-task")[0]
        if any(v is ABSENT for v in values):
            where = [t for t, v in enumerate(values) if v is not ABSENT]
            reason = f"set only in tasks {where}"
        return Mixed(name, reason)


def _leaves_of(view: Any) -> Any:
    if view is ABSENT or type(view) in _PLAIN or isinstance(view, (torch.Tensor, Mixed)):
        return None
    leaves, spec = pytree.tree_flatten(view)
    return spec, [id(x) for x in leaves]


def _edited(entry: _Entry) -> bool:
    """Whether the placed view was changed in place from outside (``fmodel.acts.clear()``)."""
    return entry.seen is not None and _leaves_of(entry.placed) != entry.seen


# nn.Module's own entries in a module's __dict__ (not ``training``, which a forward may set).
_BOOKKEEPING = frozenset(nn.Module().__dict__) - {"training"}


def _never(module: nn.Module) -> List[str]:
    """Keys of a module's ``__dict__`` never kept per task: nn.Module's bookkeeping
    (containers the patch manages, whose identity never changes), and the underscore
    attributes of torch's own module classes (their configuration and caches, e.g. an RNN's
    weight names and weak references, which the patch rewrites itself)."""
    torch_class = type(module).__module__.startswith("torch.")
    return [
        k
        for k in module.__dict__
        if k in _BOOKKEEPING or k == "_flat_weights" or (torch_class and k.startswith("_"))
    ]


class Captured:
    """Containers the patched modules' hooks captured from outside the modules (a closure's
    ``activations`` dict, a ``functools.partial`` argument): a task writing into one would
    share it with every other task (and, under vmap, leave tensors there that cannot be read
    outside it). A call that changes one is an error naming it, after the container is put
    back as it was."""

    def __init__(self, modules: Iterable[Tuple[str, nn.Module]]) -> None:
        self._hooks: List[Tuple[str, Dict[int, Any]]] = []
        for name, module in modules:
            for hooks_key, hooks in module.__dict__.items():
                if hooks_key.endswith("hooks") and isinstance(hooks, dict):
                    self._hooks.append((f"{name or type(module).__name__}.{hooks_key}", hooks))
        self._sizes: List[int] = []
        self._watched: List[Tuple[str, Any]] = []
        self._refresh()

    def _refresh(self) -> None:
        """Look at the hooks again when some were added or removed since (hooks registered
        on a patched module after its first call)."""
        sizes = [len(hooks) for _, hooks in self._hooks]
        if sizes == self._sizes:
            return
        self._sizes = sizes
        self._watched = []
        for where, hooks in self._hooks:
            for hook in hooks.values():
                self._watch(where, hook)

    def _watch(self, where: str, hook: Any) -> None:
        label = getattr(hook, "__qualname__", type(hook).__name__)
        found: List[Tuple[str, Any]] = []
        if isinstance(hook, functools.partial):
            found += [(f"argument {i}", a) for i, a in enumerate(hook.args)]
            found += [(f"argument {k}=", a) for k, a in hook.keywords.items()]
            hook = hook.func
        code, cells = getattr(hook, "__code__", None), getattr(hook, "__closure__", None)
        if code is not None and cells:
            for var, cell in zip(code.co_freevars, cells):
                try:
                    found.append((f"variable {var!r}", cell.cell_contents))
                except ValueError:  # an empty cell
                    continue
        for what, value in found:
            if type(value) in (list, dict, set) or isinstance(value, dict):
                self._watched.append((f"{what} of hook {label} ({where})", value))

    def snapshot(self) -> List[Any]:
        self._refresh()
        return [_contents(c) for _, c in self._watched]

    def put_back(self, before: List[Any]) -> None:
        for (_, container), old in zip(self._watched, before):
            if _contents(container)[0] != old[0]:
                _put_back(container, old)

    def check(self, before: List[Any]) -> None:
        for (what, container), old in zip(self._watched, before):
            if _contents(container)[0] != old[0]:
                _put_back(container, old)
                raise PerTaskError(
                    f"a batched call wrote into {what}, a {type(container).__name__} captured "
                    "from outside the patched module: every task would write into the same one "
                    "(and under vmap it would hold tensors that cannot be read outside the "
                    "call). Record into an attribute of the module instead (self.acts = ..., "
                    "or append to a list attribute), which num_tasks keeps per task"
                )


def _contents(container: Any) -> Any:
    if isinstance(container, dict):
        return [(k, id(v)) for k, v in container.items()], dict(container)
    if isinstance(container, list):
        return [id(v) for v in container], list(container)
    return {id(v) for v in container}, set(container)


def _put_back(container: Any, old: Any) -> None:
    saved = old[1]
    container.clear()
    if isinstance(container, dict):
        container.update(saved)
    elif isinstance(container, list):
        container.extend(saved)
    else:
        container.update(saved)
