"""Reroute a few torch functions inside a patch's own module copies, for one thread.

Two torch functions give wrong or failing results in a patched forward that plain code
never meets:

- ``F.scaled_dot_product_attention`` (and ``F.multi_head_attention_forward``, which calls
  it) take a fused kernel that cannot be differentiated twice: while a patch tracks
  higher-order gradients (``track_higher_grads`` and grad mode on, decided per call) they are
  computed by torch's math kernel instead (``higher_func._attention``).
- ``F.embedding`` with ``padding_idx`` under ``torch.vmap`` gives every task but the first a
  gradient in its padding row: in batched patches it is computed by
  ``higher_func._embedding.embedding`` instead.

How: at patch time, the copies whose class's code could reach those functions (it names them,
or, for attention, the words attention code is written with, see ``_attention.WORDS``; global
functions the methods call are read too) get their own ``forward``: the class's forward,
run inside a ``TorchFunctionMode`` that swaps the function for the length of the call. Torch
function modes are per thread, so another thread's attention keeps torch's kernels; torch's
``sdpa_kernel`` switches would have been process-wide. Modules whose code never mentions
attention or embeddings (an MLP) are left alone and pay nothing; under a rerouted forward
each torch call costs one Python call more, which is why the mode covers the innermost
attention modules only when an outer module merely mentions the words.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from typing import Any, Callable, Dict, FrozenSet, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _attention, _embedding
from ._compat import is_compiling

__all__ = ["Reroute", "install", "mentions"]

_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
_EMBEDDING = F.embedding
_ATTENTION_NAMES = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward"})


class Reroute:
    """What one patch reroutes; the patch keeps ``tracked`` up to date."""

    __slots__ = ("tracked", "batched")

    def __init__(self, batched: bool) -> None:
        self.tracked = True
        self.batched = batched


class _Mode(TorchFunctionMode):
    def __init__(
        self, attention: bool, embedding: bool, padded: bool = False, mha: bool = True
    ) -> None:
        super().__init__()
        self.attention = attention
        self.mha = attention and mha
        self.embedding = embedding  # every F.embedding (batched patches)
        self.padded = padded  # F.embedding with padding_idx only (compiled calls)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.attention:
            if func is _SDPA:
                return _attention.scaled_dot_product_attention(*args, **kwargs)
            if func is _MHA and self.mha:
                return _attention.multi_head_attention_forward(*args, **kwargs)
        if func is _EMBEDDING and (self.embedding or (self.padded and _padded(args, kwargs))):
            return _embedding.embedding(*args, **kwargs)
        return func(*args, **kwargs)


def _padded(args: tuple, kwargs: dict) -> bool:
    return (args[2] if len(args) > 2 else kwargs.get("padding_idx")) is not None


# What the modes this thread runs under reroute now: (attention, embedding).
_current = threading.local()


class _Forward:
    """A copy's ``forward``: its class's forward, run with the functions rerouted that this
    call needs (nothing new when an outer rerouted forward already covers them)."""

    def __init__(self, copy: nn.Module, state: Reroute, attention: bool, embedding: bool) -> None:
        own = copy.__dict__.get("forward")  # a forward the user set on the instance
        if own is None:
            # The class's function and a weak reference: a bound method kept in the copy's
            # own __dict__ would be a reference cycle, keeping the patch's tensors alive
            # until the cycle collector runs.
            function, copy_ref = type(copy).forward, weakref.ref(copy)
            self._forward = lambda *args, **kwargs: function(copy_ref(), *args, **kwargs)
        else:
            self._forward = own
        self._state = state
        self._attention = attention
        self._embedding = embedding
        functools.update_wrapper(self, own if own is not None else type(copy).forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        attention = self._attention and self._state.tracked and torch.is_grad_enabled()
        embedding = self._embedding
        outer = getattr(_current, "kinds", (False, False))
        if (not attention or outer[0]) and (not embedding or outer[1]):
            return self._forward(*args, **kwargs)
        kinds = (attention or outer[0], embedding or outer[1])
        _current.kinds = kinds
        try:
            with _Mode(*kinds):
                return self._forward(*args, **kwargs)
        finally:
            _current.kinds = outer


def everywhere() -> TorchFunctionMode:
    """A mode that reroutes attention and padded embeddings in every call it covers, for
    ``higher_func.compile``: Dynamo traces the functions it swaps in, and compiled code does
    not run the copies' own ``forward`` wrappers (the math kernel computes the same function,
    and Inductor fuses it).

    Not ``F.multi_head_attention_forward``: Dynamo cannot guard the globals of the copy that
    reroutes it ("'builtin_function_or_method' object has no attribute '__defaults__'"), so
    compiled ``nn.MultiheadAttention`` keeps torch's kernels (first order only)."""
    return _Mode(attention=True, embedding=False, padded=True, mha=False)


def wanted(module: nn.Module) -> bool:
    """Whether any module of ``module``'s tree would be rerouted by a patch (attention, or an
    embedding in a batched one): what ``higher_func.compile`` asks before it covers a
    compiled call with ``everywhere()``, which only such models need.

    Example:
        >>> wanted(torch.nn.Linear(2, 2)), wanted(torch.nn.MultiheadAttention(4, 2))
        (False, True)
    """
    for cls in {type(m) for m in module.modules()}:
        # (the ignore: as in install, torch's stubs hide that a module class is Hashable)
        direct, weak, embedding = _kinds(cls)  # type: ignore[arg-type]
        if weak or embedding:
            return True
    return False


def install(copies: Dict[int, nn.Module], batched: bool) -> Optional[Reroute]:
    """Give the copies that could reach attention (and, when ``batched``, an embedding
    lookup) a rerouting ``forward``.

    Args:
        copies: the patch's module copies (``ModuleTree.copies``), owned by the patch.
        batched: whether the patch has ``num_tasks``.

    Returns:
        The patch's switch (set ``tracked`` when ``track_higher_grads`` changes), or None
        when no copy needed one.
    """
    if is_compiling():
        return None  # see _compile: compiled meta-steps run attention in their own way
    state = None
    for copy in copies.values():  # runs per patch: most modules stop at the first test
        # (torch's stubs declare nn.Module.__hash__ with a self type: mypy does not see that
        # a class of modules is Hashable for lru_cache, as in _tree.)
        direct, weak, embedding = _kinds(type(copy))  # type: ignore[arg-type]
        embedding = batched and embedding
        if not (weak or embedding):
            continue
        # A module that only mentions attention (``attention_mask=``) while a submodule does
        # the attention: the submodule's forward is the narrower place for the mode.
        attention = direct or (weak and not _attends_below(copy))
        if attention or embedding:
            state = state or Reroute(batched)
            copy.__dict__["forward"] = _Forward(copy, state, attention, embedding)
    return state


def _attends_below(module: nn.Module) -> bool:
    modules = module.modules()
    next(modules)
    return any(any(_kinds(type(m))[:2]) for m in modules)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4096)
def _kinds(cls: type) -> Tuple[bool, bool, bool]:
    """(names attention's functions, mentions attention, names ``embedding``) for the code
    of ``cls``."""
    names = mentions(cls)
    lower = [name.lower() for name in names]
    direct = bool(names & _ATTENTION_NAMES)
    weak = direct or any(word in name for name in lower for word in _attention.WORDS)
    weak = weak or any(word in cls.__name__.lower() for word in _attention.WORDS)
    return direct, weak, "embedding" in names


@functools.lru_cache(maxsize=4096)
def mentions(cls: type) -> FrozenSet[str]:
    """Every name the methods of ``cls`` (not ``nn.Module``'s own) use, with the names of
    the global Python functions they call, to two levels.

    Example:
        >>> "embedding" in mentions(torch.nn.Embedding)
        True
    """
    found: set = set()
    seen: set = set()
    for klass in cls.__mro__:
        if klass is object or klass is nn.Module:
            continue
        for attr in vars(klass).values():
            for function in _functions(attr):
                _read(function, found, seen, depth=2)
    return frozenset(found)


def _functions(attr: Any) -> Iterator[types.FunctionType]:
    if isinstance(attr, (staticmethod, classmethod)):
        attr = attr.__func__
    if isinstance(attr, property):
        yield from (f for f in (attr.fget, attr.fset) if isinstance(f, types.FunctionType))
    elif isinstance(attr, types.FunctionType):
        yield attr


def _read(function: types.FunctionType, found: set, seen: set, depth: int) -> None:
    if id(function) in seen:
        return
    seen.add(id(function))
    names = set(_code_names(function.__code__))
    found |= names
    if depth == 0:
        return
    for name in names:
        value = function.__globals__.get(name)
        torch_own = (getattr(value, "__module__", None) or "").startswith("torch")
        if isinstance(value, types.FunctionType) and not torch_own:
            _read(value, found, seen, depth - 1)


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)
