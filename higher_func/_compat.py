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
from typing import Callable, Optional, Tuple

import torch

# The common base of BatchNorm1d/2d/3d, their lazy variants and SyncBatchNorm, which share
# running statistics and the ``momentum=None`` cumulative average. There is no public base
# class; ``_NormBase`` above it would also catch InstanceNorm. Private since torch 1.0.
from torch.nn.modules.batchnorm import _BatchNorm as BatchNorm

# torch's pytree (tree_flatten, tree_unflatten, tree_map), which vmap and Dynamo understand.
# Private since torch 1.x; torch 2.13 still has no public ``torch.utils.pytree``.
from torch.utils import _pytree as pytree

__all__ = [
    "BatchNorm",
    "ConvNd",
    "VMAP_LIMITS",
    "user_stacklevel",
    "MIN_TORCH",
    "TRACE_AUTOGRAD_OPS",
    "can_trace_autograd",
    "is_compiling",
    "pytree",
    "tracing_autograd",
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
