"""A patch's own module tree: shallow copies of the user's modules that hold the fast weights.

Every distinct submodule of the user's module is copied once per patch, shallowly: the copy
is an instance of the same class that shares the user's code, but owns nn.Module's
bookkeeping containers (parameter, buffer and child dictionaries, hook dictionaries) and its
training flag. The fast weights are written into the copies' parameter slots, so a call is the
user's own forward on the copy: nothing is lent into the user's module, not even for the
length of a call, and no lock is needed.

Everything else a copy would share with the user's module (its attributes and hooks, and
whatever they reach: containers, closures, partials, dataclasses, weakrefs, handles, plain
tensors) goes through the one rewrite of ``higher_func._graph``: rebuilt inside the patch when
it reaches the tree or may be changed by a forward, shared when immutable and reaching
nothing, refused at patch time (naming the attribute path) when it reaches the tree and cannot
be rebuilt. Buffers and tensor attributes are copied per storage and copy-on-write
(``higher_func._tensors``), so views stay views and a table no forward writes costs nothing.

What a forward writes (``self.last = h``, a reassigned buffer, ``module.weight`` computed by a
weight-norm hook, a flag flipped by a ``train()`` override) lands on the copy, as it would on a
plain module holding the fast weights.

``torch.utils.checkpoint`` inside a patched forward would recompute, during the meta-backward,
on whatever fast weights the copies hold by then. The copies' parameter dictionaries refuse to
be read inside a checkpointed region (``_GuardedParameters``: a check made at call time, on
each weight read, however the checkpoint was reached).

Under ``torch.compile`` the copies are built inside the traced function (Dynamo traces
``object.__new__`` and dictionary copies). One difference there: buffers live as plain
attributes of the copies, not in their ``_buffers``, because Dynamo cannot trace
``nn.Module.__setattr__``'s buffer branch on a module created in the graph, and a forward may
reassign a buffer (``self.ema = 0.9 * self.ema + ...``).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from ._compat import (
    COMPILED_CALL,
    FLAT_WEIGHT_NAMES,
    RNN_WEIGHT_LISTS,
    inside_checkpoint,
    is_compiling,
    top_saved_tensors_hooks,
)
from ._graph import PatchRefused, Rewriter, plan
from ._tensors import TensorCopies

# nn.Module's own bookkeeping containers (parameters, buffers, children, hooks, the set of
# non-persistent buffers): each copy gets its own, so nothing done to a copy reaches the
# user's module. Everything else in a module's __dict__ is shared with the original.
_BOOKKEEPING = tuple(
    key for key, value in nn.Module().__dict__.items() if isinstance(value, (dict, set))
)
_BOOKKEEPING_SET = frozenset(_BOOKKEEPING)
_HOOK_DICTS_SET = frozenset(key for key in _BOOKKEEPING if key.endswith("hooks"))

_Slot = Tuple[Dict[str, Any], str, int]  # (the dict holding it, key, index among distinct)


def _refuse_checkpoint(module: nn.Module, *args: Any) -> None:
    if inside_checkpoint():
        _checkpoint_error(type(module).__name__)


def _checkpoint_error(what: str) -> None:
    raise RuntimeError(
        f"torch.utils.checkpoint around {what} inside a patched module: "
        "its recomputation during the meta-backward would read the latest fast weights, "
        "not those of the step being recomputed, and give wrong meta-gradients. Remove the "
        "checkpoint from the patched forward, or pass the weights into the checkpointed "
        "function as arguments (checkpoint(F.linear, x, self.weight))"
    )


_top_hooks = top_saved_tensors_hooks
_grad_enabled = torch.is_grad_enabled


class _GuardedParameters(dict):
    """A copy's parameter dictionary that refuses to be read inside ``torch.utils.checkpoint``.

    Checkpointing recomputes a forward during backward, on whatever fast weights the copies
    hold by then: a meta-backward through several steps would recompute every step on the
    last one's weights. Reads are where a forward meets the weights, however it got there (a
    helper, a wrapper, ``apply_activation_checkpointing``, reentrant or not), so the check is
    made on each read, at call time: two C calls, no forward hook (which would cost a module
    call its fast path). Weights read outside the region and passed in as arguments are saved
    by the checkpoint like any input, and are right.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        # Inlined: no saved-tensors hooks and gradients on (the usual read) is two C calls.
        if _top_hooks(False) is not None or not _grad_enabled():
            if inside_checkpoint():
                _checkpoint_error(f"code reading the parameter {key!r}")
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> Any:
        return [self[k] for k in dict.keys(self)]

    def items(self) -> Any:
        return [(k, self[k]) for k in dict.keys(self)]

    def copy(self) -> Dict[str, Any]:
        return dict(dict.items(self))


def _shallow_copy(module: nn.Module, guard: bool) -> Tuple[nn.Module, List[str]]:
    """A copy of ``module`` owning nn.Module's bookkeeping containers and sharing the rest,
    and the keys of what it shares that the rewrite must look at. ``guard``: the parameter
    dictionary refuses reads inside checkpointing (``_GuardedParameters``)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            f"cannot patch the TorchScript module {type(module).__name__}: patch the Python "
            "module it was scripted from"
        )
    copy = object.__new__(type(module))
    state = copy.__dict__
    # dict.copy() is atomic: another thread's forward may be adding attributes meanwhile.
    state.update(module.__dict__.copy())
    shared = []  # hook dicts with hooks in them, and attributes that are not plain values
    for key, value in state.items():  # one pass: this runs per submodule per patch
        if key in _BOOKKEEPING_SET:
            guarded = guard and key == "_parameters" and value
            state[key] = _GuardedParameters(value) if guarded else value.copy()
            if value and key in _HOOK_DICTS_SET:
                shared.append(key)
        elif type(value) not in _IMMUTABLE and not _plain_tuple(value):
            shared.append(key)
    for slot in _slot_names(type(module)):  # attributes kept in __slots__, not in __dict__
        if hasattr(module, slot):
            object.__setattr__(copy, slot, getattr(module, slot))
            shared.append(slot)
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


def _own(rewrite: Rewriter, copy: nn.Module, shared: List[str], path: str) -> None:
    """Point the ``shared`` attributes of ``copy`` (as ``_shallow_copy`` lists them) into the
    patch, through the one rewrite."""
    state = copy.__dict__
    for key in shared:
        if key in _HOOK_DICTS_SET:
            hooks = state[key]
            for hook_id, hook in list(hooks.items()):
                hooks[hook_id] = rewrite(hook, f"{path}.{key}[{hook_id}]")
        elif key == COMPILED_CALL:
            # nn.Module.compile() binds a compiled call to the original module: the copy
            # runs its own forward (compile the meta-step with higher_func.compile).
            state[key] = None
        elif key in RNN_WEIGHT_LISTS:
            pass  # the user's Parameters until write_params rebuilds the list from the slots
        elif key in state:
            state[key] = rewrite(state[key], f"{path}.{key}")
        else:  # a slot
            value = rewrite(getattr(copy, key), f"{path}.{key}")
            object.__setattr__(copy, key, value)


class _Diagnosis(threading.local):
    active = False


_diagnosis = _Diagnosis()


class NothingToRebuild(Exception):
    """Raised while diagnosing a failed compile: this patch rebuilds nothing."""


@contextlib.contextmanager
def diagnosing_compile() -> Iterator[None]:
    """While active, building a tree raises ``PatchRefused`` naming the first attribute it
    would rebuild, or ``NothingToRebuild``: why a compiled meta-step failed to trace."""
    _diagnosis.active = True
    try:
        yield
    finally:
        _diagnosis.active = False


def _diagnose(
    shared: List[Tuple[nn.Module, List[str], str]], memo: Dict[int, Any], refused: Dict[int, str]
) -> None:
    state, code = _roots(shared)
    decided = plan(state, code, lambda obj: id(obj) in memo or id(obj) in refused)
    rebuilt = []
    for copy, keys, path in shared:
        values = copy.__dict__
        for key in keys:
            found = values.get(key, _NO_VALUE)
            hooks = values[key].items() if key in _HOOK_DICTS_SET else [(None, found)]
            for hook_id, value in hooks:
                if id(value) in decided.rebuild:
                    where = f"{path}.{key}" + ("" if hook_id is None else f"[{hook_id}]")
                    rebuilt.append(f"{where} ({type(value).__name__})")
    if rebuilt:
        raise PatchRefused(
            "higher_func.compile could not trace the patch of this module, which rebuilds "
            f"{', '.join(rebuilt)}: each reaches the model's modules, parameters or mutable "
            "state, so every patch makes its own, and one of these rebuilds is not something "
            "torch.compile can trace. Keep what the forward needs as attributes of the module "
            "(submodules, tensors, plain lists and dicts of them), or run this meta-step eagerly"
        )
    raise NothingToRebuild


_NO_VALUE = object()


def _roots(shared: List[Tuple[nn.Module, List[str], str]]) -> Tuple[List[Any], List[Any]]:
    """The copies' attribute values (the module's state) and hooks (the program's code)."""
    state: List[Any] = []
    code: List[Any] = []
    for copy, keys, _ in shared:
        values = copy.__dict__
        for key in keys:
            if key in _HOOK_DICTS_SET:
                code.extend(values[key].values())
            elif key in values:
                if key != COMPILED_CALL and key not in RNN_WEIGHT_LISTS:
                    state.append(values[key])
            else:
                state.append(getattr(copy, key))  # a slot
    return state, code


def _plain_tuple(value: Any) -> bool:
    # Convolutions' kernel_size, stride, padding...: immutable and reaching nothing, so they
    # need no walk (which would cost every patch of a convolutional network).
    return type(value) is tuple and all(type(v) in _IMMUTABLE for v in value)


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

    def __init__(self, module: nn.Module, compiling: bool, batched: bool = False) -> None:
        self.copies: Dict[int, nn.Module] = {}
        self.buffers_as_attributes = compiling
        params, buffers = _Tensors(), _Tensors()
        pairs: List[Tuple[nn.Module, nn.Module]] = []  # (the user's module, its copy)
        shared: List[Tuple[nn.Module, List[str], str]] = []  # what the rewrite visits
        self.root = self._copy(module, "", "model", params, buffers, shared, pairs)
        self.param_names, self.params, self.param_index = (
            params.names,
            params.originals,
            params.index,
        )
        self.buffer_names, self.buffers = buffers.names, buffers.originals
        self._param_slots, self._buffer_slots = params.slots, buffers.slots
        tensors = TensorCopies(compiling)
        # The patch's own buffers, made here with the tensor attributes so that a view of a
        # buffer stays a view of the patch's buffer. With tasks or under compile the patch
        # stacks or clones them itself, and another reference to a buffer is refused.
        own_buffers = not (compiling or batched)
        self.private_buffers: List[torch.Tensor] = []
        if own_buffers:
            self.private_buffers = [tensors.copy(b, detach=True) for b in buffers.originals]
        self._keep: List[Any] = []
        if not shared and not _diagnosis.active:  # nothing shared but plain values: the usual
            self._finish(compiling)
            return
        memo: Dict[int, Any] = {}
        for original, copy in pairs:
            memo[id(original)] = copy
            mine = copy.__dict__
            for key, value in original.__dict__.copy().items():
                if key in _BOOKKEEPING_SET:
                    memo[id(value)] = mine[key]  # what handles and the like point at
        refused = {id(p): f"the parameter {n!r}" for n, p in zip(params.names, params.originals)}
        if own_buffers:
            memo.update(zip(map(id, buffers.originals), self.private_buffers))
        else:
            why = "with num_tasks" if batched else "under torch.compile"
            for n, b in zip(buffers.names, buffers.originals):
                refused[id(b)] = f"the buffer {n!r} ({why} the patch's buffer is another tensor)"
        if _diagnosis.active:
            _diagnose(shared, memo, refused)
        state, code = _roots(shared)
        decided = plan(state, code, lambda obj: id(obj) in memo or id(obj) in refused)
        rewrite = Rewriter(memo, self.copies, refused, tensors, decided)
        for copy, keys, path in shared:
            _own(rewrite, copy, keys, path)
        self._keep = rewrite.keep  # what the walk's ids refer to lives as long as the patch
        self._finish(compiling)

    def _finish(self, compiling: bool) -> None:
        self.buffer_slot_keys = {(id(d), k) for d, k, _ in self._buffer_slots}
        # The first slot of each distinct tensor, to read it back.
        self._first_buffer_slot = {i: (d, k) for d, k, i in reversed(self._buffer_slots)}
        # RNNBase reads its weights from a `_flat_weights` list, not from `_parameters`.
        self._rnns = [c for c in self.copies.values() if FLAT_WEIGHT_NAMES in c.__dict__]
        if not compiling:
            # Checkpointing recomputes a forward during backward on whatever the copies hold
            # by then: their weights refuse to be read inside it (see _GuardedParameters).
            # RNNs read their weights from a list torch's C++ code reads: a call-time hook.
            for rnn in self._rnns:
                rnn.register_forward_pre_hook(_refuse_checkpoint)

    def _copy(
        self,
        module: nn.Module,
        prefix: str,
        path: str,
        params: _Tensors,
        buffers: _Tensors,
        shared: List[Tuple[nn.Module, List[str], str]],
        pairs: List[Tuple[nn.Module, nn.Module]],
    ):
        # One pass in the order of module.named_parameters(remove_duplicate=False): the copy
        # of a submodule reachable under two names is made once, its names recorded twice.
        copy = self.copies.get(id(module))
        first = copy is None
        if first:
            copy, keys = _shallow_copy(module, guard=not self.buffers_as_attributes)
            self.copies[id(module)] = copy
            pairs.append((module, copy))
            if keys:
                shared.append((copy, keys, path))
        state = copy.__dict__
        # Read from the copy's own dictionaries when just made, else from snapshots: another
        # thread may be changing the module's (dict.copy() is atomic).
        seen = state if first else module.__dict__
        for key, p in list(seen["_parameters"].copy().items()):
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
        for key, b in list(seen["_buffers"].copy().items()):
            if b is not None:
                if first and self.buffers_as_attributes:
                    del state["_buffers"][key]
                    buffers.add(prefix + key, b, state, key)
                else:
                    buffers.add(prefix + key, b, state["_buffers"] if first else None, key)
        children = state["_modules"]
        for name, child in list(seen["_modules"].copy().items()):
            if child is not None:
                child_path = f"{path}[{name}]" if name.isdigit() else f"{path}.{name}"
                child_copy = self._copy(
                    child, prefix + name + ".", child_path, params, buffers, shared, pairs
                )
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
