"""Every private torch name and version-dependent lookup the library relies on, in one place.

torch does not promise to keep its underscore names, so each one used here is imported once,
with a note on why no public name does the job and since when it has existed. When a torch
release moves or renames one, this file is the only one to change, and the tests of the
modules that use it say which.

Tested with torch 2.13.0; ``MIN_TORCH`` is the oldest torch ``higher_func.compile`` can run on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Any, Callable, Optional, Tuple

import torch
import torch.utils.checkpoint as _checkpoint

# The common base of BatchNorm1d/2d/3d, their lazy variants and SyncBatchNorm, which share
# running statistics and the ``momentum=None`` cumulative average. There is no public base
# class; ``_NormBase`` above it would also catch InstanceNorm. Private since torch 1.0.
from torch.nn.modules.batchnorm import _BatchNorm as BatchNorm

# torch's pytree (tree_flatten, tree_unflatten, tree_map), which vmap and Dynamo understand.
# Private since torch 1.x; torch 2.13 still has no public ``torch.utils.pytree``.
from torch.utils import _pytree as pytree

__all__ = [
    "ALLOW_RNN",
    "BatchNorm",
    "ConvNd",
    "VMAP_LIMITS",
    "user_stacklevel",
    "MIN_TORCH",
    "TRACE_AUTOGRAD_OPS",
    "can_trace_autograd",
    "drop_accumulated_grad",
    "foreach_add",
    "foreach_addcmul",
    "foreach_div",
    "foreach_lerp",
    "foreach_maximum",
    "foreach_mul",
    "foreach_neg",
    "foreach_sqrt",
    "inside_checkpoint",
    "is_compiling",
    "lazy_clone",
    "storage_key",
    "top_saved_tensors_hooks",
    "pytree",
    "sdpa_math",
    "tracing_autograd",
    "tracing_rnns",
]

# Dynamo traces torch.autograd.grad (the inner steps) only with this config option on. It was
# added in torch 2.11; before it, a compiled inner loop breaks the graph at every step.
TRACE_AUTOGRAD_OPS = "trace_autograd_ops"
MIN_TORCH = "2.11"


def can_trace_autograd() -> bool:
    """Whether the installed torch's Dynamo can trace ``torch.autograd.grad``.

    Example:
        >>> can_trace_autograd()  # torch 2.13
        True
    """
    return hasattr(torch._dynamo.config, TRACE_AUTOGRAD_OPS)


def tracing_autograd() -> contextlib.AbstractContextManager[None]:
    """A context in which Dynamo traces ``torch.autograd.grad``; the option is restored on exit.

    Example:
        >>> with tracing_autograd():
        ...     torch._dynamo.config.trace_autograd_ops
        True
    """
    return torch._dynamo.config.patch(TRACE_AUTOGRAD_OPS, True)


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
    return torch._dynamo.config.patch(ALLOW_RNN, True)


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


def _not_compiling() -> bool:
    return False


def _find_is_compiling() -> Callable[[], bool]:
    # Public as torch.compiler.is_compiling since torch 2.3; torch 2.0 to 2.2 had it only as
    # torch._dynamo.is_compiling. Without either there is no Dynamo, so nothing is compiling.
    public = getattr(torch.compiler, "is_compiling", None)
    if public is not None:
        return public
    return getattr(getattr(torch, "_dynamo", None), "is_compiling", _not_compiling)


#: Whether the code calling it is being traced by ``torch.compile``: the eager fast paths
#: (locks, weak dictionaries, Python-float shortcuts) step aside while tracing.
is_compiling: Callable[[], bool] = _find_is_compiling()


# -- attention and embeddings (higher_func._attention, issue 22) ------------------------------

#: torch's math kernel of scaled dot-product attention, built from differentiable ops (so
#: twice differentiable), and the kernel ``F.scaled_dot_product_attention`` falls back to. The
#: only public way to choose it, ``torch.nn.attention.sdpa_kernel``, sets process-wide flags
#: (another thread's attention would change kernel too). A private op since torch 2.0
#: (``scale=`` since 2.1, ``enable_gqa=`` since 2.5); returns ``(output, weights)``.
sdpa_math = torch.ops.aten._scaled_dot_product_attention_math


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
# torch._C._autograd._top_saved_tensors_default_hooks (private, torch >= 2.0). Reentrant
# checkpointing runs the forward under no_grad inside CheckpointFunction.forward, found on the
# Python stack with sys._getframe (CPython's, no public way).
_CHECKPOINT_HOOKS = ("_checkpoint_hook.", "_recomputation_hook.")


#: The innermost saved-tensors hooks, or None: a C call, cheap enough to make per weight read.
top_saved_tensors_hooks: Callable[[bool], Any] = torch._C._autograd._top_saved_tensors_default_hooks


def inside_checkpoint() -> bool:
    """Whether the caller runs inside ``torch.utils.checkpoint`` (forward or recomputation).

    Cheap when the answer is no and gradients are on: one C call (hot paths test
    ``top_saved_tensors_hooks(False) is None and torch.is_grad_enabled()`` first).

    Example:
        >>> inside_checkpoint()
        False
    """
    hooks = top_saved_tensors_hooks(False)
    if hooks is not None:
        return hooks[0].__qualname__.startswith(_CHECKPOINT_HOOKS)
    if torch.is_grad_enabled():  # the reentrant forward runs under no_grad: refused there
        return False
    reentrant = _checkpoint.CheckpointFunction.forward.__code__
    frame: Optional[types.FrameType] = sys._getframe(1)
    while frame is not None:
        if frame.f_code is reentrant:
            return True
        frame = frame.f_back
    return False


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
