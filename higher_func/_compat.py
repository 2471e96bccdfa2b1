"""Every private torch name and version-dependent lookup the library relies on, in one place.

torch does not promise to keep its underscore names, so each one used here is imported once,
with a note on why no public name does the job and since when it has existed. When a torch
release moves or renames one, this file is the only one to change, and the tests of the
modules that use it say which.

It is also where the library meets older and newer torch releases: every check of what the
installed torch can do, and every shim for a torch that does it differently, lives here,
with the release that changed it. Supported: torch 2.0 to the newest release (``nox -s
compat``; the canaries are in ``tests/test_compat.py``). ``MIN_TORCH`` is the oldest torch
``higher_func.compile`` can run on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import types
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    FrozenSet,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
)

import torch
import torch.backends
import torch.utils.checkpoint

# The common base of BatchNorm1d/2d/3d, their lazy variants and SyncBatchNorm, which share
# running statistics and the ``momentum=None`` cumulative average. There is no public base
# class; ``_NormBase`` above it would also catch InstanceNorm. Private since torch 1.0.
from torch.nn.modules.batchnorm import _BatchNorm as BatchNorm
from torch.overrides import TorchFunctionMode

# torch's pytree (tree_flatten, tree_unflatten, tree_map, tree_leaves), which vmap and Dynamo
# understand. Private since torch 1.x; torch 2.13 still has no public ``torch.utils.pytree``.
from torch.utils import _pytree
from torch.utils.hooks import RemovableHandle

__all__ = [
    "BatchNorm",
    "attention_fastpath_off",
    "autocast_enabled",
    "MIN_TORCH",
    "TRACE_AUTOGRAD_OPS",
    "can_trace_autograd",
    "foreach_differentiable",
    "handle_extra_dicts",
    "inside_checkpoint",
    "is_compiling",
    "pytree",
    "set_handle_extra_dicts",
    "tracing_autograd",
]

# Dynamo traces torch.autograd.grad (the inner steps) only with this config option on. It was
# added in torch 2.11; before it, a compiled inner loop breaks the graph at every step.
TRACE_AUTOGRAD_OPS = "trace_autograd_ops"
MIN_TORCH = "2.11"


def _dynamo() -> types.ModuleType:
    # ``import torch`` does not import Dynamo in torch 2.0, so ``torch._dynamo`` may not be an
    # attribute yet; importing it is cheap once torch has.
    import torch._dynamo

    return torch._dynamo


def can_trace_autograd() -> bool:
    """Whether the installed torch's Dynamo can trace ``torch.autograd.grad``.

    Example:
        >>> can_trace_autograd()  # torch 2.13
        True
    """
    return hasattr(_dynamo().config, TRACE_AUTOGRAD_OPS)


def tracing_autograd() -> contextlib.AbstractContextManager[None]:
    """A context in which Dynamo traces ``torch.autograd.grad``; the option is restored on exit.

    Example:
        >>> with tracing_autograd():
        ...     torch._dynamo.config.trace_autograd_ops
        True
    """
    return _dynamo().config.patch(TRACE_AUTOGRAD_OPS, True)


def _find_is_compiling() -> Callable[[], bool]:
    # Public as torch.compiler.is_compiling since torch 2.3; torch 2.0 to 2.2 have it only as
    # torch._dynamo.is_compiling (and torch 2.0 has no torch.compiler at all).
    public = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if public is not None:
        return public
    return _dynamo().is_compiling


def _tree_leaves(tree: Any) -> List[Any]:
    return _pytree.tree_flatten(tree)[0]


def _tree_map(fn: Callable[..., Any], tree: Any, *rests: Any) -> Any:
    leaves, spec = _pytree.tree_flatten(tree)
    columns = [leaves]
    for rest in rests:
        rest_leaves, rest_spec = _pytree.tree_flatten(rest)
        if rest_spec != spec:
            raise ValueError(f"tree_map: trees of different structure: {spec} and {rest_spec}")
        columns.append(rest_leaves)
    return _pytree.tree_unflatten([fn(*xs) for xs in zip(*columns)], spec)


# torch 2.0's pytree has no ``tree_leaves`` and maps over one tree only (``tree_map(fn, tree,
# *rests)`` and ``tree_leaves`` came in torch 2.1); the rest of what the library uses is there.
if TYPE_CHECKING or hasattr(_pytree, "tree_leaves"):
    pytree = _pytree
else:
    pytree = types.SimpleNamespace(
        **{**vars(_pytree), "tree_leaves": _tree_leaves, "tree_map": _tree_map}
    )


def _autocast_enabled_before_2_4(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.is_autocast_enabled()
    switch = getattr(torch, f"is_autocast_{device_type}_enabled", None)
    return bool(switch()) if switch is not None else False


def _find_autocast_enabled() -> Callable[[str], bool]:
    # torch.is_autocast_enabled(device_type) since torch 2.4; before, the bare call answered
    # for CUDA only and each other device type had its own is_autocast_<type>_enabled().
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:
        return _autocast_enabled_before_2_4
    return torch.is_autocast_enabled


class _NoAttentionFastpath(TorchFunctionMode):
    """Passes every call through unchanged; while it is active, torch's attention modules see
    a torch function override and take their general path instead of the fused kernel."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def attention_fastpath_off() -> Iterator[None]:
    """Makes nn.MultiheadAttention and nn.TransformerEncoderLayer skip their fused inference
    kernel, which has no derivative, while the context is active.

    ``torch.backends.mha.set_fastpath_enabled`` (torch 2.2) is process-wide: while it is off,
    other threads' attention modules take their general path too (same results, not the fused
    kernel). torch 2.0 and 2.1 have no switch; their modules skip the kernel whenever a torch
    function override is active, so a pass-through mode does it there (for this thread only,
    at the price of a Python call per torch call inside the context).

    Example:
        >>> with attention_fastpath_off():
        ...     pass
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        with _NoAttentionFastpath():
            yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


# The pack hooks of non-reentrant checkpointing (torch.utils.checkpoint's _checkpoint_hook,
# and _recomputation_hook during its recomputation), matched by qualified name.
_CHECKPOINT_HOOKS = ("_checkpoint_hook.", "_recomputation_hook.")


def _code_objects(namespace: Mapping[str, Any]) -> Iterator[types.CodeType]:
    def nested(code: types.CodeType) -> Iterator[types.CodeType]:
        yield code
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield from nested(const)

    for value in namespace.values():
        function = inspect.unwrap(value) if callable(value) else value
        code = getattr(function, "__code__", None)
        if code is not None:
            yield from nested(code)
        elif isinstance(value, type) and value.__module__ == torch.utils.checkpoint.__name__:
            yield from _code_objects(vars(value))


@functools.lru_cache(maxsize=None)
def _checkpoint_code() -> FrozenSet[types.CodeType]:
    return frozenset(_code_objects(vars(torch.utils.checkpoint)))


def inside_checkpoint() -> bool:
    """Whether the caller runs inside ``torch.utils.checkpoint`` (a checkpointed forward, or
    its recomputation during backward), reentrant or not.

    Example:
        >>> inside_checkpoint()
        False
    """
    # torch >= 2.8 can name the innermost saved-tensor hooks (private: there is no public
    # reader of the default-hook stack); non-reentrant checkpointing packs with its own.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is not None:
        hooks = top(False)
        if hooks is not None:
            return hooks[0].__qualname__.startswith(_CHECKPOINT_HOOKS)
        if torch.is_grad_enabled():
            return False
        # Reentrant checkpointing runs the forward under no_grad inside its autograd.Function.
    # Older torch cannot name the hooks: both kinds of checkpointing call the forward from a
    # function of torch.utils.checkpoint, which is then on the stack. sys._getframe: the only
    # way to see the callers without building a traceback.
    codes = _checkpoint_code()
    frame: Optional[types.FrameType] = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


@functools.lru_cache(maxsize=None)
def foreach_differentiable() -> bool:
    """Whether autograd can differentiate torch's multi-tensor ``torch._foreach_*`` ops.

    torch 2.0 runs them on tensors that require grad but has no derivative for them ("derivative
    for aten::_foreach_add is not implemented" at backward); torch 2.1 added them. Asked once,
    of the op itself.

    Example:
        >>> foreach_differentiable()  # torch 2.13
        True
    """
    x = torch.ones(1, requires_grad=True)
    try:
        torch.autograd.grad(torch._foreach_mul([x], 2.0)[0].sum(), x)
    except RuntimeError:
        return False
    return True


def handle_extra_dicts(handle: RemovableHandle) -> Tuple[Any, ...]:
    """The weak references to the extra dicts ``handle.remove()`` also deletes its hook from.

    torch 2.0 keeps one weak reference (or None) in ``extra_dict_ref``; newer releases keep a
    tuple of them. Read and written only through this and ``set_handle_extra_dicts``.

    Example:
        >>> layer = torch.nn.Linear(1, 1)
        >>> handle = layer.register_forward_hook(lambda *args: None)
        >>> all(ref() is not None for ref in handle_extra_dicts(handle))
        True
    """
    refs = handle.extra_dict_ref
    if isinstance(refs, tuple):
        return refs
    return () if refs is None else (refs,)


def set_handle_extra_dicts(handle: RemovableHandle, refs: Tuple[Any, ...]) -> None:
    """Store ``refs`` (weak references) as ``handle``'s extra dicts, in its torch's form."""
    if isinstance(handle.extra_dict_ref, tuple):
        handle.extra_dict_ref = tuple(refs)
    else:  # torch 2.0: at most one
        handle.extra_dict_ref = refs[0] if refs else None


#: ``autocast_enabled(device_type)``: whether autocast is on for that device type.
autocast_enabled: Callable[[str], bool] = _find_autocast_enabled()

#: Whether the code calling it is being traced by ``torch.compile``: the eager fast paths
#: (locks, weak dictionaries, Python-float shortcuts) step aside while tracing.
is_compiling: Callable[[], bool] = _find_is_compiling()
