"""The one rewrite of what a patch's copies share with the user's module.

A shallow copy of a module shares every attribute with the user's module, and through them
whatever those attributes reach: lists of submodules, hooks that are closures over ``self``,
``functools.partial`` objects, dataclasses, dicts keyed by submodules, weakrefs to a parent,
counters a forward increments. One rule decides, for every object of that graph:

    An object is rebuilt inside the patch when it is the module's mutable state, or when it
    reaches the tree (a module, parameter or buffer of the user's module) or the module's
    state. Everything else is shared. What must be rebuilt and cannot be is refused at patch
    time, with the path that reaches it.

The module's state is what its attributes hold, through containers and objects but not inside
functions; hooks and functions (their closures, defaults) are the program's code, shared unless
they reach the tree or the state (``_reach.plan`` computes both sets). So a hook appending to a
list of the user's script keeps appending to it, while a hook closing over ``self`` runs on the
patch's copy.

Rebuilding follows each object's own copy protocol (``__reduce_ex__``, the protocol ``copy``
and ``pickle`` use), with every part rewritten by the same rule: that covers plain objects,
dataclasses, namedtuples, ``SimpleNamespace``, ``functools.partial``, ``RemovableHandle``,
container subclasses and bound builtins without a list of known shapes. Only what has no such
protocol has a rule of its own: functions (new cells where a cell must be rebuilt), cells,
bound methods, weakrefs, ``torch.Generator`` (same state) and tensors. Objects with neither
(locks, C objects, running generators) are shared when they reach nothing of the tree, and
refused otherwise.

Everything is memoized by identity, so what the user's module shares stays shared in the
patch (two modules holding one list hold one copy of it; a cycle stays a cycle), and the
modules of the tree map to their copies.

Two answers are refusals by design:

- A reference to one of the tree's ``Parameter`` objects that does not go through its module
  (``self.weights = [self.lin.weight]``): the fast weights replace that parameter at every
  step, and the reference would keep reading the model's own weights. The same for a buffer
  under ``num_tasks`` or ``torch.compile``, where the patch's buffer is another tensor.
- A function that reads a module of the tree through a global name: globals are not part of
  the module, so the patch cannot re-point them.

Tensors of the state are copied (``_tensors.TensorCopies``): lazily where torch can
(copy-on-write), so a large lookup table a forward never writes costs nothing, and by storage,
so that views and buffers that share memory keep sharing it.
"""

from __future__ import annotations

import copyreg
import enum
import types
import weakref
from collections import OrderedDict, defaultdict, deque
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from ._reach import LEAVES, Plan, plan
from ._tensors import TensorCopies

__all__ = ["Rewriter", "PatchRefused", "plan"]


class PatchRefused(TypeError):
    """The user's module holds a reference the patch cannot make private.

    The message names the attribute path (``model.blocks[0]._forward_hooks[3].__closure__[0]``)
    and says how to change the model.
    """


_UNSEEN = object()
# What object.__reduce_ex__ names as the constructor of a plain instance (typeshed omits them).
_NEWOBJ = copyreg.__newobj__  # type: ignore[attr-defined]
_NEWOBJ_EX = copyreg.__newobj_ex__  # type: ignore[attr-defined]
_Rule = Callable[["Rewriter", Any, str], Any]


class Rewriter:
    """Rewrites values shared with the user's module so that they point into the patch.

    Args:
        memo: ``id(original) -> replacement`` for what the tree already owns (each module's
            copy, the copies of its bookkeeping dictionaries and buffers). The walk adds to it.
        tree: ``id(module) -> copy`` for the modules of the tree.
        refused: ``id(tensor) -> what it is`` for the tensors that must not be reached except
            through their modules (the tree's parameters).
        tensors: where the other tensors are copied.
        plan: what to rebuild (``_reach.plan``); everything else is shared.

    Example:
        >>> log, seen = [1], []
        >>> rewrite = Rewriter({}, {}, {}, TensorCopies(False), plan([log], [seen], bool))
        >>> rewrite(log, "model.log") is log  # the module's state: the patch gets its own
        False
        >>> rewrite(seen, "model._forward_hooks[0]") is seen  # the program's: shared
        True
    """

    def __init__(
        self,
        memo: Dict[int, Any],
        tree: Dict[int, nn.Module],
        refused: Dict[int, str],
        tensors: TensorCopies,
        plan: Plan,
    ) -> None:
        self._memo = memo
        self._plan = plan
        self._rebuild = plan.rebuild
        self._tree = tree
        self._refused = refused
        self._tensors = tensors
        # The originals the memo's ids refer to, and replacements only a weakref points at:
        # both must stay alive as long as the patch.
        self.keep: List[Any] = []
        self._filled: set = set()

    def __call__(self, value: Any, path: str) -> Any:
        cls = type(value)
        if cls in LEAVES:
            return value
        hit = self._memo.get(id(value), _UNSEEN)
        if hit is not _UNSEEN:
            return hit
        if id(value) not in self._rebuild:
            return value
        rule = _RULES.get(cls)
        if rule is None:
            rule = _RULES[cls] = _rule_for(cls)
        return rule(self, value, path)

    def parts(self, value: Any, path: str) -> Any:
        """Rewrite what a copy protocol returned. The plan knows the objects themselves; the
        tuples, lists and dicts a protocol makes to hold them (or passes through unplanned, as
        a partial's arguments) are rewritten item by item, keys included."""
        if id(value) in self._rebuild or id(value) in self._memo:
            return self(value, path)
        cls = type(value)
        if cls is tuple:
            return tuple(self.parts(v, f"{path}[{i}]") for i, v in enumerate(value))
        if cls is list:
            return [self.parts(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if cls is dict:
            return {
                self.parts(k, f"{path}.keys()"): self.parts(v, f"{path}.{k}")
                for k, v in value.copy().items()
            }
        return self(value, path)

    def _remember(self, value: Any, new: Any) -> Any:
        self._memo[id(value)] = new
        self.keep.append(value)
        return new

    # -- refusals ------------------------------------------------------------------------
    def refuse(self, path: str, what: str, fix: str) -> PatchRefused:
        return PatchRefused(f"cannot patch the module: {path} {what}. {fix}")


# -- rules, one per kind of object; chosen once per class ----------------------------------


def _share(rw: Rewriter, value: Any, path: str) -> Any:
    return value


def _builtin(rw: Rewriter, value: Any, path: str) -> Any:
    owner = getattr(value, "__self__", None)
    if owner is None or type(owner) in LEAVES or isinstance(owner, type):
        return value
    new_owner = rw(owner, path + ".__self__")
    if new_owner is owner:
        return value
    return rw._remember(value, getattr(new_owner, value.__name__))


def _tensor(rw: Rewriter, value: torch.Tensor, path: str) -> Any:
    what = rw._refused.get(id(value))
    if what is not None:
        raise rw.refuse(
            path,
            f"is {what} itself, not read through its module",
            "The patch replaces it with its own tensor (the fast weights change at every "
            "step), so this reference would keep reading the model's. Keep the module instead "
            "and read the tensor as its attribute when it is used",
        )
    if isinstance(value, nn.Parameter):
        return value  # a parameter outside the tree: a constant to the patch, as to a forward
    return rw._remember(value, rw._tensors.copy(value))


def _list(rw: Rewriter, value: list, path: str) -> Any:
    new: list = rw._remember(value, [])
    new.extend(rw(v, f"{path}[{i}]") for i, v in enumerate(list(value)))  # list(): a snapshot
    return new


def _tuple(rw: Rewriter, value: tuple, path: str) -> Any:
    items = [rw(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if all(a is b for a, b in zip(items, value)):
        return value
    return rw._remember(value, tuple(items))


def _frozenset(rw: Rewriter, value: frozenset, path: str) -> Any:
    items = [rw(v, f"{path}{{{v!r}}}") for v in value]
    if all(a is b for a, b in zip(items, value)):
        return value
    return rw._remember(value, frozenset(items))


def _set(rw: Rewriter, value: set, path: str) -> Any:
    new: set = rw._remember(value, set())
    new.update(rw(v, f"{path}{{{v!r}}}") for v in value.copy())
    return new


def _dict_items(rw: Rewriter, value: dict, new: dict, path: str) -> None:
    for k, v in value.copy().items():  # dict.copy() is atomic: another thread may be adding
        key = rw(k, f"{path}.keys()[{k!r}]")
        new[key] = rw(v, f"{path}[{k!r}]")


def _dict(rw: Rewriter, value: dict, path: str) -> Any:
    new = rw._remember(value, type(value)())
    _dict_items(rw, value, new, path)
    return new


def _defaultdict(rw: Rewriter, value: defaultdict, path: str) -> Any:
    new = rw._remember(value, defaultdict())
    new.default_factory = rw(value.default_factory, path + ".default_factory")
    _dict_items(rw, value, new, path)
    return new


def _deque(rw: Rewriter, value: deque, path: str) -> Any:
    new = rw._remember(value, deque(maxlen=value.maxlen))
    new.extend(rw(v, f"{path}[{i}]") for i, v in enumerate(list(value)))
    return new


def _cell(rw: Rewriter, value: Any, path: str) -> Any:
    # A cell is mutable (``nonlocal``), so every cell gets its own; the function rule fills it
    # after registering the function, so that a closure over itself stays one.
    new = rw._remember(value, types.CellType())
    _fill(rw, value, new, path)
    return new


def _fill(rw: Rewriter, cell: Any, new: Any, path: str) -> None:
    if id(new) in rw._filled:
        return
    rw._filled.add(id(new))
    try:
        contents = cell.cell_contents
    except ValueError:  # an empty cell: a name the closure has not bound yet
        return
    new.cell_contents = rw(contents, path)


def _function(rw: Rewriter, fn: types.FunctionType, path: str) -> Any:
    _check_globals(rw, fn, path)
    closure = fn.__closure__
    defaults = rw(fn.__defaults__, path + ".__defaults__")
    kwdefaults = rw(fn.__kwdefaults__, path + ".__kwdefaults__")
    unchanged = defaults is fn.__defaults__ and kwdefaults is fn.__kwdefaults__
    if closure is None and not fn.__dict__ and unchanged:
        return fn  # no state of its own, and what it holds is shared
    cells = None if closure is None else tuple(_cell_shell(rw, c) for c in closure)
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, defaults, cells)
    rw._remember(fn, new)
    new.__kwdefaults__ = kwdefaults
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    new.__annotations__ = fn.__annotations__
    for i, (old, cell) in enumerate(zip(closure or (), cells or ())):
        if cell is not old:
            name = fn.__code__.co_freevars[i]
            _fill(rw, old, cell, f"{path}.__closure__[{i}] ({name})")
    if fn.__dict__:
        new.__dict__.update(rw(fn.__dict__, path + ".__dict__"))
    return new


def _cell_shell(rw: Rewriter, cell: Any) -> Any:
    if id(cell) not in rw._rebuild:
        return cell  # the program's: shared with the function it came from
    new = rw._memo.get(id(cell))
    if new is None:
        new = rw._remember(cell, types.CellType())
    return new


def _check_globals(rw: Rewriter, fn: types.FunctionType, path: str) -> None:
    found = fn.__globals__
    for name in fn.__code__.co_names:
        value = found.get(name)
        if value is not None and (id(value) in rw._tree or id(value) in rw._refused):
            raise rw.refuse(
                f"{path}.__globals__[{name!r}]",
                "is a module or parameter of the model reached through a global name",
                "A global is not part of the module, so the patch cannot point it at the fast "
                "weights. Keep the module as an attribute (self.x = ...) and read it there",
            )


def _method(rw: Rewriter, value: types.MethodType, path: str) -> Any:
    func = rw(value.__func__, path + ".__func__")
    owner = rw(value.__self__, path + ".__self__")
    if func is value.__func__ and owner is value.__self__:
        return value
    return rw._remember(value, types.MethodType(func, owner))


def _weakref(rw: Rewriter, value: weakref.ref, path: str) -> Any:
    referent = value()
    if referent is None:
        return value
    new = rw(referent, path + "()")
    if new is referent:
        return value
    if type(value) is not weakref.ref:
        raise rw.refuse(
            path,
            f"is a {type(value).__name__} (a weakref subclass) to an object the patch copies",
            "A plain weakref.ref can be re-pointed at the copy; keep one instead",
        )
    callback = rw(value.__callback__, path + ".__callback__")
    rw.keep.append(new)  # a copy only this weakref points at must live as long as the patch
    return rw._remember(value, weakref.ref(new, callback))


def _generator(rw: Rewriter, value: torch.Generator, path: str) -> Any:
    new = torch.Generator(device=value.device)
    new.set_state(value.get_state())
    return rw._remember(value, new)


def _opaque(rw: Rewriter, value: Any, path: str, why: str) -> Any:
    if id(value) in rw._plan.tree:
        raise rw.refuse(
            path,
            f"is a {type(value).__qualname__} that reaches the model's modules or "
            f"parameters, and the patch cannot copy it ({why})",
            "Keep what it needs as attributes of the module, or give its class a "
            "__reduce__ (the copy protocol) so that the patch can rebuild it",
        )
    return value


def _by_protocol(rw: Rewriter, value: Any, path: str) -> Any:
    """Rebuild ``value`` the way ``copy.copy`` would, every part rewritten by the one rule."""
    try:
        reduced = value.__reduce_ex__(4)
    except Exception as error:  # noqa: BLE001 -- any failure means: no copy protocol
        return _opaque(rw, value, path, f"{type(error).__name__}: {error}")
    if isinstance(reduced, str):  # a global singleton, copied as itself
        return value
    make, args = reduced[0], reduced[1]
    state = reduced[2] if len(reduced) > 2 else None
    listitems = reduced[3] if len(reduced) > 3 else None
    dictitems = reduced[4] if len(reduced) > 4 else None
    setter = reduced[5] if len(reduced) > 5 else None
    if make is _NEWOBJ:
        cls = args[0]
        new = cls.__new__(cls, *rw.parts(tuple(args[1:]), path))
    elif make is _NEWOBJ_EX:
        cls, pos, kw = args
        new = cls.__new__(cls, *rw.parts(pos, path), **rw.parts(kw, path))
    else:
        new = make(*rw.parts(tuple(args), path))
    rw._remember(value, new)
    if state is not None:
        state = rw.parts(state, path)
        if setter is not None:
            setter(new, state)
        elif hasattr(new, "__setstate__"):
            new.__setstate__(state)
        else:
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            if state:
                new.__dict__.update(state)
            for key, slot_value in (slots or {}).items():
                setattr(new, key, slot_value)
    if listitems is not None:
        for i, item in enumerate(list(listitems)):
            new.append(rw(item, f"{path}[{i}]"))
    if dictitems is not None:
        for key, item in list(dictitems):
            new[rw(key, f"{path}.keys()[{key!r}]")] = rw(item, f"{path}[{key!r}]")
    return new


def _module_not_in_tree(rw: Rewriter, value: nn.Module, path: str) -> Any:
    # A module the tree does not hold (kept in a plain list, say): not part of the fast
    # weights, but a forward may still change its state, so the patch gets its own copy.
    return _by_protocol(rw, value, path)


def _rule_for(cls: type) -> _Rule:
    if issubclass(cls, type) or issubclass(cls, enum.Enum):
        return _share
    if cls is types.BuiltinFunctionType or cls is types.MethodWrapperType:
        return _builtin
    if issubclass(cls, torch.Tensor):
        return _tensor
    if issubclass(cls, nn.Module):
        return _module_not_in_tree
    exact: Dict[type, _Rule] = {
        list: _list,
        tuple: _tuple,
        dict: _dict,
        OrderedDict: _dict,
        set: _set,
        frozenset: _frozenset,
        defaultdict: _defaultdict,
        deque: _deque,
        types.CellType: _cell,
        types.FunctionType: _function,
        types.MethodType: _method,
        weakref.ref: _weakref,
        torch.Generator: _generator,
    }
    rule = exact.get(cls)
    if rule is not None:
        return rule
    if issubclass(cls, weakref.ref):
        return _weakref
    return _by_protocol


_RULES: Dict[type, _Rule] = {}
