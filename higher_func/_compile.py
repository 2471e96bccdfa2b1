"""``higher_func.compile``: torch.compile for whole meta-steps, inner gradients included."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional

import torch

from . import _compat

# A zero that requires grad, made outside any compiled region. Weights that eager code makes
# into new leaves (``detach().requires_grad_()``: the copies of copy_initial_weights=True, and
# every step of track_higher_grads=False) are made as ``detach() + _ZERO`` while compiling:
# the same values, and gradients with respect to them work, but Dynamo sees a tensor derived
# from an input of the graph, which it may return, instead of a leaf created inside the graph,
# which it may not ("returning intermediate with requires_grad_()"). A gradient that would
# have reached those leaves reaches this zero instead, where nobody reads it.
_ZERO = torch.zeros((), requires_grad=True)


def new_leaf(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """``tensor.detach().requires_grad_(requires_grad)``, in a form Dynamo can return."""
    if not requires_grad:
        return tensor.detach()
    return tensor.detach() + _ZERO.to(tensor.dtype)


def compile(fn: Optional[Callable[..., Any]] = None, **compile_kwargs: Any) -> Callable[..., Any]:
    """Compile a function that runs inner loops (``innerloop_ctx``, ``diffopt.step``) as one
    graph, with ``torch.compile(fullgraph=True)``.

    The inner steps call ``torch.autograd.grad``, which Dynamo only traces when
    ``torch._dynamo.config.trace_autograd_ops`` is on; this turns it on while the compiled
    function runs, never globally. ``fullgraph=True`` is not optional: without it Dynamo may
    quietly run a frame that calls ``torch.autograd.grad`` eagerly, so a graph break is an error
    here instead of a silent slowdown.

    Args:
        fn: the function to compile (or use ``@higher_func.compile(mode=...)`` as a decorator
            factory).
        **compile_kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``...).

    Returns:
        The compiled function. Calls with new data of the same shapes reuse the compiled graph.

    Recurrent modules (RNN/LSTM/GRU) compile with Dynamo's ``allow_rnn``, which this turns on
    for the compiled call too. ``track_higher_grads=False`` and ``copy_initial_weights=True``
    compile: the new leaves they make in eager code are made, while compiling, in a form
    Dynamo can return (see ``new_leaf``). What does not compile is listed in
    docs/compiling.md.

    Raises:
        RuntimeError: the installed torch cannot trace ``torch.autograd.grad`` (needs torch >=
            2.11).
        ValueError: ``fullgraph=False`` was asked for.

    Example:
        >>> model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> T = 4
        >>> @higher_func.compile
        ... def meta_loss(xs, ys, xq, yq):
        ...     with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False,
        ...                                    num_tasks=T) as (fmodel, diffopt):
        ...         for _ in range(2):
        ...             fast_weights = diffopt.step(torch.vmap(F.mse_loss)(fmodel(xs), ys))
        ...         return torch.vmap(F.mse_loss)(fmodel(xq), yq).mean()
        >>> xs, ys, xq, yq = (torch.randn(T, 10, 1) for _ in range(4))
        >>> meta_loss(xs, ys, xq, yq).backward()  # compiles on the first call
        >>> model[0].weight.grad.shape
        torch.Size([8, 1])
    """
    if fn is None:
        return functools.partial(compile, **compile_kwargs)
    if not _compat.can_trace_autograd():
        raise RuntimeError(
            f"higher_func.compile needs torch >= {_compat.MIN_TORCH} (torch._dynamo.config."
            f"{_compat.TRACE_AUTOGRAD_OPS}, to trace torch.autograd.grad); the installed torch "
            f"is {torch.__version__}"
        )
    if compile_kwargs.pop("fullgraph", True) is not True:
        raise ValueError(
            "higher_func.compile always uses fullgraph=True: a graph break around "
            "torch.autograd.grad would otherwise run the inner loop eagerly without warning"
        )
    compiled = torch.compile(fn, fullgraph=True, **compile_kwargs)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        # The attention fast path is off for the whole compiled call: batched patches turn
        # it off around each vmapped call in eager code (see _batching), which Dynamo does not
        # trace.
        with _compat.tracing_autograd(), _tracing_rnns(), _compat.attention_fastpath_off():
            return compiled(*args, **kwargs)

    return run


def _tracing_rnns() -> contextlib.AbstractContextManager[Any]:
    # Dynamo refuses nn.RNN/GRU/LSTM ("Attempted to wrap RNN, GRU, or LSTM") unless this
    # option is on; with it, it traces their forward op by op. The zoo's recurrent models
    # compile with it and match eager (tests/test_compile.py).
    if hasattr(torch._dynamo.config, "allow_rnn"):
        return torch._dynamo.config.patch(allow_rnn=True)
    return contextlib.nullcontext()
