"""Lend tensors to a module's slots for one call, and always take them back.

`torch.func.functional_call` does the same job, but re-resolves every dotted name and checks
for tied weights on every call (about 20 us per forward on a small MLP). A patched module calls
the same module thousands of times with the same names, so `SlotPlan` resolves each name to
the dictionary that holds it once, at patch time; a call is then a few dictionary writes.

Under `torch.compile` the plan steps aside for the reparametrization `functional_call` is made
of, which Dynamo traces natively (it cannot trace a lock or writes into a module's private
dictionaries).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)

# One lock per module whose slots are lent: two threads lending their own weights into the same
# module would otherwise see each other's tensors (functional_call has exactly this race). A
# call takes the locks of every submodule it lends into, so a patched model and a patched
# submodule of it (or two models sharing an encoder) exclude each other too.
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(module: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


_Slot = Tuple[Dict[str, Any], str, int]  # (the owner's _parameters or _buffers, key, index)


def _resolve_slots(
    module: nn.Module, named: Sequence[Tuple[str, torch.Tensor]], kind: str
) -> Tuple[List[str], List[torch.Tensor], List[_Slot]]:
    """Map every (possibly tied) name to the index of its tensor among the distinct tensors."""
    index_of: Dict[int, int] = {}
    names: List[str] = []
    originals: List[torch.Tensor] = []
    slots: List[_Slot] = []
    for name, tensor in named:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        index = index_of.get(id(tensor))
        if index is None:
            index = index_of[id(tensor)] = len(names)
            names.append(name)
            originals.append(tensor)
        slots.append((getattr(owner, kind), leaf, index))
    return names, originals, slots


class SlotPlan:
    """Where a module keeps its parameters, buffers and training flags, resolved once.

    Attributes:
        param_names: one name per distinct parameter, in ``module.parameters()`` order (a tied
            weight appears once, under its first name).
        buffer_names: the same for buffers.
        modules: the distinct submodules (the module itself first), whose training flags a
            patched module keeps on its own.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named_modules = list(module.named_modules())
        self.module_names = [name for name, _ in named_modules]
        self.modules = [m for _, m in named_modules]
        if _is_compiling():
            # Only names are needed: compiled calls go through functional_call, no slots.
            self.param_names = [name for name, _ in module.named_parameters()]
            self.params = [p for _, p in module.named_parameters()]
            self.buffer_names = [name for name, _ in module.named_buffers()]
            self.buffers = [b for _, b in module.named_buffers()]
            return
        # Sorted by id: every call acquires in the same order, so no two calls can deadlock.
        self._locks = sorted((_lock_for(m) for m in self.modules), key=id)
        with self.locked():  # the module's own tensors, not ones another thread lent it
            self.param_names, self.params, self._param_slots = _resolve_slots(
                module, list(module.named_parameters(remove_duplicate=False)), "_parameters"
            )
            self.buffer_names, self.buffers, self._buffer_slots = _resolve_slots(
                module, list(module.named_buffers(remove_duplicate=False)), "_buffers"
            )
        # RNNBase reads its weights from a `_flat_weights` list, not from `_parameters`.
        self._rnns = [m for m in self.modules if hasattr(m, "_flat_weights_names")]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold every lock of the module's slots: no thread lends into them meanwhile."""
        if _is_compiling():
            yield
            return
        with contextlib.ExitStack() as stack:
            for lock in self._locks:
                stack.enter_context(lock)
            yield

    def call(
        self,
        fn: Callable[..., Any],
        params: Sequence[torch.Tensor],
        buffers: List[torch.Tensor],
        modes: Sequence[bool],
        args: tuple,
        kwargs: dict,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` with ``params``, ``buffers`` and ``modes`` lent.

        In-place buffer updates (BatchNorm running stats) land in the lent ``buffers``; a
        buffer the forward *reassigns* is written back into ``buffers``. Everything the module
        held before is restored afterwards, also when ``fn`` raises.
        """
        if _is_compiling():
            return self._functional_call(fn, params, buffers, modes, args, kwargs)
        for lock in self._locks:
            lock.acquire()
        try:
            param_slots, buffer_slots = self._param_slots, self._buffer_slots
            saved_params = [owner[key] for owner, key, _ in param_slots]
            saved_buffers = [owner[key] for owner, key, _ in buffer_slots]
            flipped = [m for m, mode in zip(self.modules, modes) if m.training is not mode]
            saved_flat = [rnn._flat_weights for rnn in self._rnns]
            try:
                for owner, key, i in param_slots:
                    owner[key] = params[i]
                for owner, key, i in buffer_slots:
                    owner[key] = buffers[i]
                for m in flipped:
                    m.__dict__["training"] = not m.training
                for rnn in self._rnns:
                    rnn._flat_weights = [getattr(rnn, name) for name in rnn._flat_weights_names]
                out = fn(*args, **kwargs)
                for owner, key, i in buffer_slots:
                    if owner[key] is not buffers[i]:
                        buffers[i] = owner[key]
                return out
            finally:
                for (owner, key, _), tensor in zip(param_slots, saved_params):
                    owner[key] = tensor
                for (owner, key, _), tensor in zip(buffer_slots, saved_buffers):
                    owner[key] = tensor
                for m in flipped:
                    m.__dict__["training"] = not m.training
                for rnn, flat in zip(self._rnns, saved_flat):
                    rnn._flat_weights = flat
        finally:
            for lock in reversed(self._locks):
                lock.release()

    def _functional_call(self, fn, params, buffers, modes, args, kwargs):
        tensors = dict(zip(self.param_names, params))
        tensors.update(zip(self.buffer_names, buffers))
        flipped = [m for m, mode in zip(self.modules, modes) if m.training != mode]
        for m in flipped:
            m.training = not m.training
        try:
            # What torch.func.functional_call does inside, usable for any `fn` (a submodule or
            # a method of the module, not only its forward); Dynamo traces it natively.
            with _reparametrize_module(self.module, tensors, tie_weights=True):
                return fn(*args, **kwargs)
        finally:
            for m in flipped:
                m.training = not m.training
