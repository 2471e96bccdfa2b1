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
    "ALLOW_RNN",
    "BatchNorm",
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
    "is_compiling",
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
