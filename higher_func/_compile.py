"""``higher_func.compile``: torch.compile for whole meta-steps, inner gradients included."""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import _compat, _reroute
from ._graph import PatchRefused
from ._tree import diagnosing_compile

# A zero that requires grad, made outside any compiled region. Weights that eager code makes
# into new leaves (``detach().requires_grad_()``: the copies of copy_initial_weights=True, and
# every step of track_higher_grads=False) are made as ``detach() + _ZERO`` while compiling:
# the same values, and gradients with respect to them work, but Dynamo sees a tensor derived
# from an input of the graph, which it may return, instead of a leaf created inside the graph,
# which it may not ("returning intermediate with requires_grad_()"). A gradient that would
# have reached those new leaves reaches this zero instead; it is dropped as soon as it lands,
# so this process-wide tensor holds no ``.grad`` that every meta-step and thread would share.
_ZERO = torch.zeros((), requires_grad=True)
_compat.drop_accumulated_grad(_ZERO)


def new_leaf(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """``tensor.detach().requires_grad_(requires_grad)``, in a form Dynamo can return."""
    if not requires_grad:
        return tensor.detach()
    return tensor.detach() + _ZERO.to(tensor.dtype)


def compile(fn: Optional[Callable[..., Any]] = None, **compile_kwargs: Any) -> Callable[..., Any]:
    """Compile a function that runs inner loops (``innerloop_ctx``, ``diffopt.step``) as one
    graph, with ``torch.compile(fullgraph=True)``.

    The inner steps call ``torch.autograd.grad``, which Dynamo only traces when its
    ``trace_autograd_ops`` option is on; this turns it on while the compiled
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
            f"higher_func.compile needs torch >= {_compat.MIN_TORCH} (Dynamo's option "
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
        # trace. Attention and padded embeddings are rerouted for the whole call too, when the
        # step can reach a model that needs it: compiled code does not run the copies'
        # rerouting forwards (see _reroute.everywhere), and a mode over a whole compiled call
        # costs other models what Dynamo cannot trace under one (Tensor.unflatten's super()).
        try:
            with (
                _compat.tracing_autograd(),
                _compat.tracing_rnns(),
                _compat.attention_fastpath_off(),
            ):
                reroute = _reroute.everywhere() if _reaches_rerouted(fn, args, kwargs) else None
                with reroute or contextlib.nullcontext():
                    return compiled(*args, **kwargs)
        except PatchRefused:
            raise
        except Exception as error:
            _explain(fn, args, kwargs, error)
            raise

    return run


def _reaches_rerouted(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    """Whether a module the meta-step ``fn`` can reach needs attention or embeddings rerouted
    (``_reroute.wanted``). Reached without running ``fn``: its arguments, the variables it
    closes over, the globals its code names, a bound method's object, and one level into
    containers and plain objects among those. A model reached only some other way is not seen:
    its attention keeps torch's kernels (first order only; torch's error at the meta-backward
    says so)."""
    candidates = [*args, *kwargs.values()]
    function = inspect.unwrap(fn)
    if isinstance(function, types.MethodType):
        candidates.append(function.__self__)
        function = function.__func__
    code = getattr(function, "__code__", None)
    if code is not None:
        for cell in getattr(function, "__closure__", None) or ():
            try:
                candidates.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        namespace = getattr(function, "__globals__", {})
        candidates += [namespace.get(name) for name in code.co_names]
    for candidate in candidates:
        if isinstance(candidate, nn.Module):
            if _reroute.wanted(candidate):
                return True
            continue
        if isinstance(candidate, (list, tuple)):
            inner = list(candidate)
        elif isinstance(candidate, dict):
            inner = list(candidate.values())
        else:
            inner = list(getattr(candidate, "__dict__", {}).values())
        if any(isinstance(m, nn.Module) and _reroute.wanted(m) for m in inner):
            return True
    return False


def _explain(fn: Callable[..., Any], args: tuple, kwargs: dict, error: Exception) -> None:
    """Raise ``PatchRefused`` naming the model's attribute when a failed trace was one of a
    patch's rebuilds (see ``_tree.diagnosing_compile``); return otherwise. Runs ``fn`` eagerly
    until its first patch is built, and no further."""
    try:
        with diagnosing_compile(), torch.no_grad():
            fn(*args, **kwargs)
    except PatchRefused as refused:
        raise refused from error
    except Exception:  # noqa: BLE001 -- nothing to add: the original error stands
        return
