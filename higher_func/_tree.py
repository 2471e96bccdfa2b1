"""A patch's own module tree: shallow copies of the user's modules that hold the fast weights.

Every distinct submodule of the user's module is copied once per patch, shallowly: the copy
is an instance of the same class that shares the user's code, hooks, configuration and
non-tensor attributes, but owns nn.Module's bookkeeping containers (parameter, buffer and
child dictionaries, hook dictionaries) and its training flag. The fast weights are written
into the copies' parameter slots, so a call is the user's own forward on the copy: nothing is
lent into the user's module, not even for the length of a call, and no lock is needed.

What a forward writes (``self.last = h``, a reassigned buffer, ``module.weight`` computed by a
weight-norm hook, a flag flipped by a ``train()`` override) lands on the copy, as it would on a
plain module holding the fast weights.

Under ``torch.compile`` the copies are built inside the traced function (Dynamo traces
``object.__new__`` and dictionary copies). One difference there: buffers live as plain
attributes of the copies, not in their ``_buffers``, because Dynamo cannot trace
``nn.Module.__setattr__``'s buffer branch on a module created in the graph, and a forward may
reassign a buffer (``self.ema = 0.9 * self.ema + ...``).
"""

from __future__ import annotations

import collections
import functools
import types
import weakref
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from ._compat import (
    handle_extra_dicts,
    inside_checkpoint,
    is_compiling,
    set_handle_extra_dicts,
)

# nn.Module's own bookkeeping containers (parameters, buffers, children, hooks, the set of
# non-persistent buffers): each copy gets its own, so nothing done to a copy reaches the
# user's module. Everything else in a module's __dict__ is shared with the original.
_BOOKKEEPING = tuple(
    key for key, value in nn.Module().__dict__.items() if isinstance(value, (dict, set))
)
_BOOKKEEPING_SET = frozenset(_BOOKKEEPING)
_HOOK_DICTS_SET = frozenset(key for key in _BOOKKEEPING if key.endswith("hooks"))

_Slot = Tuple[Dict[str, Any], str, int]  # (the dict holding it, key, index among distinct)


@functools.lru_cache(maxsize=4096)
def _mentions_checkpoint(cls: type) -> bool:
    """Whether a method of ``cls`` (outside torch itself) names ``checkpoint``."""

    def names(code: types.CodeType) -> Iterator[str]:
        yield from code.co_names
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield from names(const)

    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for attr in vars(klass).values():
            code = getattr(attr, "__code__", None)
            if code is not None and any("checkpoint" in name for name in names(code)):
                return True
    return False


def _refuse_checkpoint(module: nn.Module, args: Any) -> None:
    if inside_checkpoint():
        raise RuntimeError(
            f"torch.utils.checkpoint around {type(module).__name__} inside a patched module: "
            "its recomputation during the meta-backward would read the latest fast weights, "
            "not those of the step being recomputed, and give wrong meta-gradients. Remove the "
            "checkpoint from the patched forward"
        )


def _shallow_copy(module: nn.Module, containers: Dict[int, Any]) -> Tuple[nn.Module, List[str]]:
    """A copy of ``module`` sharing everything but nn.Module's bookkeeping containers, and the
    keys that the private pass must look at (see ``_Private.own``). Each hook dict copied is
    recorded in ``containers`` as ``id(original) -> copy``."""
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            f"cannot patch the TorchScript module {type(module).__name__}: patch the Python "
            "module it was scripted from"
        )
    copy = object.__new__(type(module))
    state, original = copy.__dict__, module.__dict__
    shared = []  # hook dicts with hooks in them, and attributes that are not plain values
    for key, value in original.items():  # one pass: this runs per submodule per patch
        if key in _BOOKKEEPING_SET:
            state[key] = own = value.copy()
            if key in _HOOK_DICTS_SET:
                # For the handles that remove a hook: their extra dicts may be empty ones.
                containers[id(value)] = own
                if value:
                    shared.append(key)
        else:
            state[key] = value
            if type(value) not in _IMMUTABLE:
                shared.append(key)
    for slot in _slot_names(type(module)):  # attributes kept in __slots__, not in __dict__
        if hasattr(module, slot):
            object.__setattr__(copy, slot, getattr(module, slot))
    return copy, shared


_SLOT_NAMES: Dict[type, Tuple[str, ...]] = {}


def _slot_names(cls: type) -> Tuple[str, ...]:
    names = _SLOT_NAMES.get(cls)  # a plain dict, not lru_cache: Dynamo traces this
    if names is None:
        every = (slot for klass in cls.__mro__ for slot in getattr(klass, "__slots__", ()))
        names = tuple(n for n in every if n not in ("__dict__", "__weakref__"))
        if not is_compiling():
            _SLOT_NAMES[cls] = names
    return names


class _Private:
    """Make a copy's shared attributes point into the patch instead of the user's module.

    A shallow copy shares every attribute with the user's module, so without this pass a
    forward would still reach the user's module through them: a submodule kept in a plain
    list or as a bound method (``self.impl = self._forward``), a hook that is a bound method
    of a module, a ``RemovableHandle`` a hook uses to remove itself, a list or dict a forward
    appends to, a plain tensor attribute updated in place. Containers and tensors are copied
    once per patch (two modules sharing one keep sharing its copy); everything else (config
    values, functions, other objects) stays shared.
    """

    def __init__(self, copies: Dict[int, nn.Module], containers: Dict[int, Any]) -> None:
        self._copies = copies
        self._containers = containers
        self._seen: Dict[int, Any] = {}

    def __call__(self, value: Any) -> Any:
        seen = self._seen.get(id(value), _UNSEEN)
        if seen is not _UNSEEN:
            return seen
        new = self._private(value)
        self._seen[id(value)] = new
        return new

    def _private(self, value: Any) -> Any:
        if isinstance(value, nn.Module):
            return self._copies.get(id(value), value)
        if isinstance(value, types.MethodType) and isinstance(value.__self__, nn.Module):
            owner = self._copies.get(id(value.__self__))
            return value if owner is None else types.MethodType(value.__func__, owner)
        if isinstance(value, torch.utils.hooks.RemovableHandle):
            return self._handle(value)
        if isinstance(value, torch.Tensor):
            # A plain tensor attribute (not a parameter or buffer) a forward may update in
            # place. Parameters stay shared: they are the user's, read-only to a forward.
            return value if isinstance(value, nn.Parameter) else value.clone()
        if type(value) in (list, tuple, set):
            return type(value)(self(v) for v in value)
        if type(value) in (dict, collections.OrderedDict):
            return type(value)((k, self(v)) for k, v in value.items())
        return value

    def _handle(self, handle: Any) -> Any:
        hooks = self._containers.get(id(handle.hooks_dict_ref()))
        if hooks is None:  # not a hook of a module in the tree
            return handle
        new = object.__new__(type(handle))
        new.__dict__.update(handle.__dict__)
        new.hooks_dict_ref = weakref.ref(hooks)
        extras = handle_extra_dicts(handle)
        refs = tuple(weakref.ref(self._containers.get(id(ref()), ref())) for ref in extras)
        set_handle_extra_dicts(new, refs)
        return new

    def own(self, copy: nn.Module, shared: List[str]) -> None:
        """Point the ``shared`` attributes of ``copy`` (as ``_shallow_copy`` lists them) into
        the patch."""
        state = copy.__dict__
        for key in shared:
            if key in _HOOK_DICTS_SET:  # rebind hooks that are bound methods of a module
                hooks = state[key]
                for hook_id, hook in hooks.items():
                    hooks[hook_id] = self(hook)
            elif key == "_compiled_call_impl":
                # nn.Module.compile() binds a compiled call to the original module: the copy
                # runs its own forward (compile the meta-step with higher_func.compile).
                state[key] = None
            else:
                state[key] = self(state[key])


_UNSEEN = object()
_IMMUTABLE = frozenset({bool, int, float, str, type(None), torch.dtype, torch.device})


class _Tensors:
    """Where one kind of tensor (parameters or buffers) lives in the copies, by name."""

    def __init__(self) -> None:
        self.names: List[str] = []  # one per distinct tensor, its first name
        self.originals: List[torch.Tensor] = []  # the user's tensors, never written
        self.index: Dict[str, int] = {}  # every name (tied ones too) -> distinct index
        self.slots: List[_Slot] = []  # one per slot of a copy
        self._index_of: Dict[int, int] = {}

    def add(self, name: str, tensor: torch.Tensor, holder: Any, key: str) -> None:
        i = self._index_of.get(id(tensor))
        if i is None:
            i = self._index_of[id(tensor)] = len(self.names)
            self.names.append(name)
            self.originals.append(tensor)
        self.index[name] = i
        if holder is not None:
            self.slots.append((holder, key, i))


class ModuleTree:
    """The shallow copy of a module tree that one patch owns, and where its tensors live.

    Attributes:
        root: the copy of the user's module.
        copies: ``id(original submodule) -> its copy``.
        param_names, params: one name per distinct parameter of the user's module, in
            ``module.parameters()`` order (a tied weight once, under its first name), and the
            user's parameters themselves (never written).
        param_index: every name of every parameter (a tied weight under each) -> its index.
        buffer_names, buffers: the same for buffers.
        buffers_as_attributes: whether the copies hold their buffers as plain attributes
            (under ``torch.compile``) instead of in ``_buffers``.
    """

    def __init__(self, module: nn.Module, compiling: bool) -> None:
        self.copies: Dict[int, nn.Module] = {}
        self.buffers_as_attributes = compiling
        params, buffers = _Tensors(), _Tensors()
        self._containers: Dict[int, Any] = {}
        shared: List[Tuple[nn.Module, List[str]]] = []  # what the private pass visits
        self.root = self._copy(module, "", params, buffers, shared)
        if shared:
            private = _Private(self.copies, self._containers)
            for copy, keys in shared:
                private.own(copy, keys)
        self.param_names, self.params, self.param_index = (
            params.names,
            params.originals,
            params.index,
        )
        self.buffer_names, self.buffers = buffers.names, buffers.originals
        self._param_slots, self._buffer_slots = params.slots, buffers.slots
        self.buffer_slot_keys = {(id(d), k) for d, k, _ in self._buffer_slots}
        # The first slot of each distinct tensor, to read it back.
        self._first_buffer_slot = {i: (d, k) for d, k, i in reversed(self._buffer_slots)}
        # RNNBase reads its weights from a `_flat_weights` list, not from `_parameters`.
        self._rnns = [c for c in self.copies.values() if "_flat_weights_names" in c.__dict__]
        # The ignore: torch's stubs declare nn.Module.__hash__ with a self type, so mypy does
        # not see that a class of modules is Hashable (as every class is) for lru_cache.
        classes = [type(c) for c in self.copies.values()]
        if not compiling and any(_mentions_checkpoint(cls) for cls in classes):  # type: ignore[arg-type]
            # Checkpointing recomputes a forward during backward, on whatever the copies hold
            # by then. The guard costs a hook call per module call, so only models whose code
            # mentions checkpointing pay it.
            for copy in self.copies.values():
                if copy._parameters:
                    copy.register_forward_pre_hook(_refuse_checkpoint)

    def _copy(
        self,
        module: nn.Module,
        prefix: str,
        params: _Tensors,
        buffers: _Tensors,
        shared: List[Tuple[nn.Module, List[str]]],
    ):
        # One pass in the order of module.named_parameters(remove_duplicate=False): the copy
        # of a submodule reachable under two names is made once, its names recorded twice.
        copy = self.copies.get(id(module))
        first = copy is None
        if first:
            copy, keys = _shallow_copy(module, self._containers)
            self.copies[id(module)] = copy
            if keys:
                shared.append((copy, keys))
        state = copy.__dict__
        for key, p in module._parameters.items():
            if p is None:
                continue
            # (isinstance with Parameter's metaclass runs Python code: plain Parameters, the
            # usual case, skip it.)
            if type(p) is not nn.Parameter and isinstance(p, nn.parameter.UninitializedParameter):
                raise TypeError(
                    f"{prefix + key} of {type(module).__name__} is not initialized yet (a lazy "
                    "module): run one forward on the module before patching it"
                )
            params.add(prefix + key, p, state["_parameters"] if first else None, key)
        for key, b in module._buffers.items():
            if b is not None:
                if first and self.buffers_as_attributes:
                    del state["_buffers"][key]
                    buffers.add(prefix + key, b, state, key)
                else:
                    buffers.add(prefix + key, b, state["_buffers"] if first else None, key)
        children = state["_modules"]
        for name, child in module._modules.items():
            if child is not None:
                child_copy = self._copy(child, prefix + name + ".", params, buffers, shared)
                if first:
                    children[name] = child_copy
        return copy

    def modules(self) -> List[nn.Module]:
        return list(self.copies.values())

    def write_params(self, params: Sequence[torch.Tensor]) -> None:
        for holder, key, i in self._param_slots:
            holder[key] = params[i]
        for rnn in self._rnns:
            rnn.__dict__["_flat_weights"] = [
                getattr(rnn, name) for name in rnn.__dict__["_flat_weights_names"]
            ]

    def write_buffers(self, buffers: Sequence[torch.Tensor]) -> None:
        for holder, key, i in self._buffer_slots:
            holder[key] = buffers[i]

    def read_buffers(self) -> List[torch.Tensor]:
        """The buffers as the copies hold them now (a forward may have reassigned one)."""
        first = self._first_buffer_slot
        return [first[i][0][first[i][1]] for i in range(len(self.buffers))]
