"""Every private torch name and version-dependent lookup the library relies on, in one place.

torch does not promise to keep its underscore names, so each one used here is imported once,
with a note on why no public name does the job and since when it has existed. When a torch
release moves or renames one, this file is the only one to change, and the tests of the
modules that use it say which.

Tested with torch 2.13.0; ``MIN_TORCH`` is the oldest torch ``higher_func.compile`` can run on.
"""

from __future__ import annotations

import contextlib
from typing import Callable

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
    "MIN_TORCH",
    "TRACE_AUTOGRAD_OPS",
    "can_trace_autograd",
    "is_compiling",
    "pytree",
    "sdpa_math",
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


# -- attention and embeddings (higher_func._attention, issue 22) ------------------------------

#: torch's math kernel of scaled dot-product attention, built from differentiable ops (so
#: twice differentiable), and the kernel ``F.scaled_dot_product_attention`` falls back to. The
#: only public way to choose it, ``torch.nn.attention.sdpa_kernel``, sets process-wide flags
#: (another thread's attention would change kernel too). A private op since torch 2.0
#: (``scale=`` since 2.1, ``enable_gqa=`` since 2.5); returns ``(output, weights)``.
sdpa_math = torch.ops.aten._scaled_dot_product_attention_math
