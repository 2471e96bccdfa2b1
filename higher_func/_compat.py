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
import os
import sys
import threading
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

__all__ = [
    "ALLOW_RNN",
    "attention_fastpath_off",
    "autocast_enabled",
    "BatchNorm",
    "can_trace_autograd",
    "ConvNd",
    "drop_accumulated_grad",
    "foreach_add",
    "foreach_addcmul",
    "foreach_differentiable",
    "foreach_div",
    "foreach_lerp",
    "foreach_maximum",
    "foreach_mul",
    "foreach_neg",
    "foreach_sqrt",
    "inside_checkpoint",
    "is_compiling",
    "lazy_clone",
    "MIN_TORCH",
    "pytree",
    "sdpa_math",
    "sdpa_math_call",
    "SDPA_OPTIONS",
    "storage_key",
    "top_saved_tensors_hooks",
    "TRACE_AUTOGRAD_OPS",
    "tracing_autograd",
    "tracing_rnns",
    "user_stacklevel",
    "VMAP_LIMITS",
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


# Dynamo refuses nn.RNN/GRU/LSTM ("Attempted to wrap RNN, GRU, or LSTM") unless this config
# option is on; with it, it traces their forward op by op. No public switch exists; the option
# is in every torch that has ``TRACE_AUTOGRAD_OPS`` (so in every torch ``higher_func.compile``
# runs on).
ALLOW_RNN = "allow_rnn"


def tracing_rnns() -> contextlib.AbstractContextManager[None]:
    """A context in which Dynamo traces recurrent modules; the option is restored on exit.

    Example:
        >>> with tracing_rnns():
        ...     getattr(torch._dynamo.config, ALLOW_RNN)
        True
    """
    return _dynamo().config.patch(ALLOW_RNN, True)


# torch.optim's multi-tensor kernels (``foreach=True``): one op, and one autograd node, over a
# list of tensors. There is no public name for them. Most exist since torch 1.7, ``lerp``
# since 2.0; their derivatives came later than the ops, so tests/test_compat.py checks both
# the values and the gradients of each on the installed torch. Out-of-place forms only: the
# rules never write into their inputs.
foreach_add = torch._foreach_add
foreach_addcmul = torch._foreach_addcmul
foreach_div = torch._foreach_div
foreach_lerp = torch._foreach_lerp
foreach_maximum = torch._foreach_maximum
foreach_mul = torch._foreach_mul
foreach_neg = torch._foreach_neg
foreach_sqrt = torch._foreach_sqrt


def drop_accumulated_grad(leaf: torch.Tensor) -> None:
    """Make every gradient that backward accumulates into ``leaf`` vanish as it lands.

    Example:
        >>> leaf = torch.zeros((), requires_grad=True)
        >>> drop_accumulated_grad(leaf)
        >>> (leaf * 2).backward()
        >>> leaf.grad is None
        True
    """
    # Public since torch 2.1; torch 2.0 has no hook after accumulation, and there its only
    # user (higher_func.compile's zero) is never reached, since compiling needs torch 2.11.
    if hasattr(leaf, "register_post_accumulate_grad_hook"):
        leaf.register_post_accumulate_grad_hook(_forget_grad)


def _forget_grad(leaf: torch.Tensor) -> None:
    leaf.grad = None


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


class _FastpathSwitch:
    """Turns torch's attention fast path off while at least one caller, in any thread, needs
    it off.

    torch's switch (``torch.backends.mha.set_fastpath_enabled``, torch 2.2) is process-wide and
    has no per-thread form. Each caller saving the old value and restoring it on exit races with
    another thread doing the same (the second saves "off" and restores it last, leaving the fast
    path off for good), so callers count themselves in under a lock instead: the first turns the
    path off, the last one out restores what the user had. Meanwhile other threads' attention
    modules take their general path too (same results, not the fused kernel).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._before = True

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        mha = getattr(torch.backends, "mha", None)
        if mha is None:
            # torch 2.0 and 2.1 have no switch; their modules skip the kernel whenever a torch
            # function override is active, so a pass-through mode does it there (this thread
            # only, at a Python call per torch call inside the context).
            with _NoAttentionFastpath():
                yield
            return
        with self._lock:
            if self._users == 0:
                self._before = mha.get_fastpath_enabled()
                mha.set_fastpath_enabled(False)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    mha.set_fastpath_enabled(self._before)


_FASTPATH = _FastpathSwitch()


def attention_fastpath_off() -> contextlib.AbstractContextManager[None]:
    """Makes nn.MultiheadAttention and nn.TransformerEncoderLayer skip their fused inference
    kernel, which has no derivative, while the context is active (see ``_FastpathSwitch``);
    restored when the last such context in any thread ends.

    Example:
        >>> with attention_fastpath_off():
        ...     pass
    """
    return _FASTPATH.off()


# -- attention and embeddings (higher_func._attention, issue 22) ------------------------------

#: torch's math kernel of scaled dot-product attention, built from differentiable ops (so
#: twice differentiable), and the kernel ``F.scaled_dot_product_attention`` falls back to. The
#: only public way to choose it, ``torch.nn.attention.sdpa_kernel``, sets process-wide flags
#: (another thread's attention would change kernel too). A private op since torch 2.0
#: (``scale=`` since 2.1, ``enable_gqa=`` since 2.5); returns ``(output, weights)``.
sdpa_math = torch.ops.aten._scaled_dot_product_attention_math

#: The keyword options of ``F.scaled_dot_product_attention`` the installed math kernel takes
#: beyond torch 2.0's: ``scale`` (torch 2.1), ``enable_gqa`` (torch 2.5). Read from the op's
#: schema, not from the version number; torch's own function gained them in the same releases.
SDPA_OPTIONS: FrozenSet[str] = frozenset(
    argument.name
    for argument in sdpa_math.default._schema.arguments
    if argument.name in ("scale", "enable_gqa")
)


def _vmap_has_rule(op: Any) -> bool:
    # Whether torch.vmap batches ``op`` itself rather than by its slow per-sample fallback
    # (which warns "There is a performance drop"). No public query; these dispatch keys are
    # functorch's since torch 2.0.
    name = op.name()
    return any(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
        for key in ("FuncTorchBatched", "FuncTorchBatchedDecomposition")
    )


def _sdpa_math_decomposed(*args: Any, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    return sdpa_math.default.decompose(*args, **kwargs)


#: Calls the math kernel, same arguments as ``sdpa_math``. torch 2.0 to at least 2.4 (checked:
#: 2.0.1, 2.4.1; 2.13 has the rule) have no vmap rule for it: a batched patch's attention
#: would run task by task, with torch's performance warning. There it is called through its
#: own decomposition (the op is CompositeImplicitAutograd: the same ops, the same values and
#: dropout draws), which vmap batches.
sdpa_math_call: Callable[..., Tuple[torch.Tensor, torch.Tensor]] = (
    sdpa_math if _vmap_has_rule(sdpa_math.default) else _sdpa_math_decomposed
)


# -- the patch's private copies (issue 19: _tree, _graph, _tensors) --------------------------


def _eager_clone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


#: A copy-on-write clone: no memory is copied until one side is written. ``torch._lazy_clone``
#: exists since torch 2.3 and has no public name (``clone`` always copies). Before it, a
#: plain clone: right, only slower for large tensors a forward never writes.
lazy_clone: Callable[[torch.Tensor], torch.Tensor] = getattr(torch, "_lazy_clone", _eager_clone)


def storage_key(storage: Any) -> int:
    """An identity for a tensor's storage (``tensor.untyped_storage()``), the same for every
    view of it.

    ``data_ptr()`` would do, but reading it materializes a copy-on-write storage (a full copy
    of a lazily cloned tensor); ``_cdata`` is the storage object's own address, private since
    torch 1.x, with no public equivalent.

    Example:
        >>> t = torch.zeros(3)
        >>> storage_key(t.untyped_storage()) == storage_key(t[1:].untyped_storage())
        True
    """
    return storage._cdata


# torch.utils.checkpoint has no public way to ask "is this code running inside a checkpointed
# region (or its recomputation)?". Non-reentrant checkpointing (torch >= 2.0) packs saved
# tensors with hooks whose classes are named below; the innermost default hooks are read with

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


def _unknown_hooks(_: bool) -> Any:
    return True  # cannot tell: let inside_checkpoint() look


#: The innermost saved-tensors hooks, or None: a C call, cheap enough to make per weight read
#: (torch._C._autograd._top_saved_tensors_default_hooks, private, torch >= 2.8). On an older
#: torch it answers "maybe" and the readers ask ``inside_checkpoint()``, which walks the stack.
top_saved_tensors_hooks: Callable[[bool], Any] = getattr(
    torch._C._autograd, "_top_saved_tensors_default_hooks", _unknown_hooks
)


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


#: nn.Module.compile() (torch >= 2.2) keeps the compiled call under this private name; a
#: patch's copy must run its own forward instead.
COMPILED_CALL = "_compiled_call_impl"
#: RNNBase's list of its weight tensors (rebuilt by the patch from its own parameter slots),
#: the names it reads them by, and (torch >= 2.2) weakrefs it compares them with to notice a
#: replaced parameter (the copy then rebuilds its own list). Private to torch.nn.RNNBase.
FLAT_WEIGHTS, FLAT_WEIGHT_NAMES = "_flat_weights", "_flat_weights_names"
RNN_WEIGHT_LISTS = frozenset({FLAT_WEIGHTS, "_flat_weight_refs"})


# -- batching over tasks (issue 20: higher_func/_batching.py) ------------------------------------

# The common base of Conv1d/2d/3d and the transposed convolutions (the kinds vmap turns into
# one grouped convolution). No public base class; private since torch 1.0.
from torch.nn.modules.conv import _ConvNd as ConvNd  # noqa: E402

# Messages of the errors torch.vmap raises where a loop over tasks runs fine: a missing
# batching rule, an autograd.Function written for plain autograd only, data-dependent Python
# (``.item()``, ``if tensor:``), outputs of data-dependent shape, an in-place write into a
# tensor that is not per task. torch raises them as plain RuntimeErrors with no public error
# type to catch; each has read this way since torch 2.0 (checked in tests/test_compat.py).
VMAP_LIMITS: Tuple[str, ...] = (
    "Batching rule not implemented",
    "autograd.Function with functorch transforms",
    "vmap: It looks like you're calling .item()",
    "data-dependent control flow",
    "vmap: We do not support batching operators that can output dynamic shape",
    "vmap: inplace arithmetic",
)

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` at which ``warnings.warn``, called by this function's caller,
    points at the first frame outside higher_func: the user's line.

    ``warnings.warn(skip_file_prefixes=)`` does this publicly only from Python 3.12; before,
    walking the frames takes ``sys._getframe`` (CPython, every version).

    Example:
        >>> user_stacklevel() >= 1
        True
    """
    frame: Optional[types.FrameType] = sys._getframe(1)  # the caller of warnings.warn: level 1
    level = 1
    while (
        frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE
    ):
        frame = frame.f_back
        level += 1
    return level


#: ``autocast_enabled(device_type)``: whether autocast is on for that device type.
autocast_enabled: Callable[[str], bool] = _find_autocast_enabled()

#: Whether the code calling it is being traced by ``torch.compile``: the eager fast paths
#: (locks, weak dictionaries, Python-float shortcuts) step aside while tracing.
is_compiling: Callable[[], bool] = _find_is_compiling()
