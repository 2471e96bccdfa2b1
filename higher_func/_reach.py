"""Which objects a patch must rebuild: the module's own state, and every path that reaches it.

The objects a copy shares with the user's module fall in two kinds:

- **State**: what the module's attributes hold, and what that holds in turn (containers and
  their keys, plain objects' attributes, dataclasses, ``functools.partial`` arguments, the
  objects of bound methods, weakrefs' referents), not looking inside functions. A forward
  that changes it changes the module, so the patch owns a copy of whatever in it is mutable
  (and of its tensors).
- **Code**: hooks, functions, and what their closures, defaults and attributes hold. That is
  the program's, not the module's (a hook that appends to a list of the user's script must
  keep appending to it), so it is shared, unless it reaches the tree or the module's state.

``plan`` computes both closures at once: the objects to rebuild are the targets (the tree's
modules, bookkeeping dictionaries, parameters and buffers, and the mutable state) and every
object from which a target can be reached. Everything else is shared as it is.

What the garbage collector sees is followed for objects of no known kind, except a module's
global namespace (globals are the program's; ``_graph`` checks functions' globals by name).
"""

from __future__ import annotations

import functools
import gc
import types
import weakref
from collections import deque
from typing import Any, Callable, Dict, Iterable, List, Set, Tuple

import torch

__all__ = ["Plan", "plan"]

# Shared as they are, never followed.
LEAVES = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        range,
        slice,
        type(Ellipsis),
        type(NotImplemented),
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
        torch.Size,
        types.ModuleType,
        types.CodeType,
        types.WrapperDescriptorType,
        types.MethodDescriptorType,
        types.ClassMethodDescriptorType,
        types.GetSetDescriptorType,
        types.MemberDescriptorType,
        property,
    }
)
# Immutable themselves: rebuilt only when they reach a target.
_IMMUTABLE = (
    tuple,
    frozenset,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    weakref.ref,
    functools.partial,
)
# Past this many objects the search stops following what the garbage collector sees.
_OPAQUE_LIMIT = 50_000


class Plan:
    """What to rebuild (``rebuild``), and what of it reaches the tree itself (``tree``)."""

    def __init__(self, rebuild: Set[int], tree: Set[int], keep: List[Any]) -> None:
        self.rebuild = rebuild
        self.tree = tree
        self._keep = keep  # the objects whose ids the sets hold


def _torch_functions() -> Set[int]:
    """The ids of torch's own public functions (``F.relu``, ``torch.tanh``...).

    They are the library's code, not the model's: their globals are torch's, so they cannot
    reach a user's module, and a module may hold one (``self.activation = F.relu``). Kept as
    ids because a membership test of an id is what Dynamo can trace when a patch is built in a
    compiled meta-step (it cannot read such a function's code or ``__dict__``).
    """
    namespaces = (torch, torch.nn.functional, torch.nn.init, torch.linalg, torch.special)
    return {
        id(value)
        for namespace in namespaces
        for value in vars(namespace).values()
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType))
    }


_TORCH_FUNCTIONS = _torch_functions()


def _is_leaf(obj: Any) -> bool:
    return type(obj) in LEAVES or isinstance(obj, type) or id(obj) in _TORCH_FUNCTIONS


def _data(obj: Any) -> Tuple[List[Any], bool]:
    """The parts of ``obj`` that are state (data edges), and whether its kind is known."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, torch.Generator):
        return [], True
    if isinstance(obj, dict):
        items = list(obj.copy().items())  # dict.copy() is atomic; another thread may write
        parts = [x for kv in items for x in kv]
        factory = getattr(obj, "default_factory", None)
        return (parts if factory is None else [*parts, factory]), True
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return list(obj), True
    if isinstance(obj, (types.FunctionType, types.CellType)):
        return [], True
    if isinstance(obj, types.MethodType):
        return [obj.__self__], True
    if isinstance(obj, types.BuiltinFunctionType):
        owner = obj.__self__
        return ([] if owner is None or _is_leaf(owner) else [owner]), True
    if isinstance(obj, weakref.ref):
        referent = obj()
        return ([] if referent is None else [referent]), True
    parts = []
    known = False
    if isinstance(obj, functools.partial):
        parts += [obj.func, *obj.args, *obj.keywords.values()]
        known = True
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        parts += list(state.copy().values())
        known = True
    for slot in _slots(type(obj)):
        if hasattr(obj, slot):
            parts.append(getattr(obj, slot))
            known = True
    return parts, known


def _code(obj: Any) -> List[Any]:
    """The parts of a function or cell (code edges)."""
    if isinstance(obj, types.FunctionType):
        return [*(obj.__closure__ or ()), obj.__defaults__, obj.__kwdefaults__, obj.__dict__]
    if isinstance(obj, types.CellType):
        try:
            return [obj.cell_contents]
        except ValueError:  # not bound yet
            return []
    if isinstance(obj, types.MethodType):
        return [obj.__func__]
    return []


def _opaque(obj: Any) -> List[Any]:
    return [r for r in gc.get_referents(obj) if not _is_namespace(r) and not _is_leaf(r)]


def _is_namespace(obj: Any) -> bool:
    return isinstance(obj, dict) and "__builtins__" in obj and "__name__" in obj


_SLOTS: Dict[type, Tuple[str, ...]] = {}


def _slots(cls: type) -> Tuple[str, ...]:
    names = _SLOTS.get(cls)
    if names is None:
        found: List[str] = []
        for klass in cls.__mro__:
            declared = klass.__dict__.get("__slots__", ())
            declared = (declared,) if isinstance(declared, str) else declared
            found += [s for s in declared if s not in ("__dict__", "__weakref__")]
        names = _SLOTS[cls] = tuple(found)
    return names


def plan(
    state: Iterable[Any],
    code: Iterable[Any],
    is_tree: Callable[[Any], bool],
) -> Plan:
    """Decide what to rebuild.

    Args:
        state: the values of the copies' attributes (their state roots).
        code: the hooks of the copies (code roots).
        is_tree: whether an object is the tree's own (a module, bookkeeping dictionary,
            parameter or buffer of the user's module).

    Returns:
        A ``Plan``: ids of the objects to rebuild, and of those that reach the tree.

    Example:
        >>> log, config = [], (1, 2)
        >>> p = plan([log, config], [], lambda obj: False)
        >>> id(log) in p.rebuild, id(config) in p.rebuild
        (True, False)
    """
    keep: List[Any] = []
    owned: Set[int] = set()
    # The module's state: what its attributes reach through data edges.
    stack = [v for v in state if not _is_leaf(v)]
    in_state: Set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in in_state or is_tree(obj):
            continue
        in_state.add(id(obj))
        keep.append(obj)
        if isinstance(obj, torch.Tensor):
            owned.add(id(obj))  # a forward may write it in place
        elif not isinstance(obj, _IMMUTABLE):
            owned.add(id(obj))
        parts, _ = _data(obj)
        stack.extend(p for p in parts if not _is_leaf(p))
    # Everything the roots reach, through any edge, and who reaches whom.
    parents: Dict[int, List[int]] = {}
    tree: Set[int] = set()
    seen: Set[int] = set()
    stack = [v for v in (*state, *code) if not _is_leaf(v)]
    opaque = 0
    while stack:
        obj = stack.pop()
        key = id(obj)
        if key in seen:
            continue
        seen.add(key)
        keep.append(obj)
        if is_tree(obj) or (isinstance(obj, types.FunctionType) and _global_tree(obj, is_tree)):
            tree.add(key)
            continue
        parts, known = _data(obj)
        parts += _code(obj)
        if not known and opaque < _OPAQUE_LIMIT:
            found = _opaque(obj)
            opaque += len(found)
            parts += found
        for part in parts:
            if not _is_leaf(part):
                parents.setdefault(id(part), []).append(key)
                stack.append(part)
    reaches_tree = _ancestors(tree, parents)
    return Plan(_ancestors(owned | tree, parents) | reaches_tree, reaches_tree, keep)


def _global_tree(fn: types.FunctionType, is_tree: Callable[[Any], bool]) -> bool:
    """Whether ``fn`` names a module or tensor of the tree as a global."""
    namespace = fn.__globals__
    return any(is_tree(namespace.get(name)) for name in fn.__code__.co_names)


def _ancestors(targets: Set[int], parents: Dict[int, List[int]]) -> Set[int]:
    found = set(targets)
    stack = list(targets)
    while stack:
        for parent in parents.get(stack.pop(), ()):
            if parent not in found:
                found.add(parent)
                stack.append(parent)
    return found
