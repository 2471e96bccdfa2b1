"""higher_func: differentiable inner loops with higher's API, on torch.func.

Legacy code keeps working with one changed line::

    import higher_func as higher

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in support:
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xq), yq).backward()  # meta-gradients in model's .grad
"""

from contextlib import contextmanager as _contextmanager
from typing import Iterator as _Iterator
from typing import Optional as _Optional
from typing import Tuple as _Tuple

import torch as _torch

from . import optim, patch, utils
from ._batching import BatchingFallbackWarning
from ._checks import UnknownKeyError
from ._compile import compile
from ._task_state import PerTaskError
from .optim import create_diff_optim, get_diff_optim, register_optim
from .patch import monkeypatch

__version__ = "0.1.0"  # the package's only version number: pyproject.toml reads it

__all__ = [
    "__version__",
    "innerloop_ctx",
    "compile",
    "BatchingFallbackWarning",
    "UnknownKeyError",
    "PerTaskError",
    "monkeypatch",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "optim",
    "patch",
    "utils",
]


@_contextmanager
def innerloop_ctx(
    model: _torch.nn.Module,
    opt: _torch.optim.Optimizer,
    device: _Optional[_torch.device] = None,
    copy_initial_weights: bool = True,
    override: _Optional[optim._OverrideType] = None,
    track_higher_grads: bool = True,
    first_order: bool = False,
    num_tasks: _Optional[int] = None,
    randomness: str = "different",
    batching: str = "auto",
) -> _Iterator[_Tuple[patch._MonkeyPatchBase, optim.DifferentiableOptimizer]]:
    """A patched ``model`` and a differentiable ``opt``, for writing an unrolled inner loop.

    Args:
        model: the module to adapt; it is never modified (gradients reach its parameters only
            through ``copy_initial_weights=False``).
        opt: an optimizer over ``model``'s parameters (or a subset), of a supported or
            registered type; its hyperparameters, groups and state are copied.
        device: optional device for the fast weights, buffers and optimizer state.
        copy_initial_weights: if True (higher's default), the inner loop starts from detached
            copies of the weights: no gradient reaches ``model``. Set False for MAML, so that
            the meta-loss backpropagates into ``model``'s parameters.
        override: optional learnable hyperparameters, ``{"lr": [tensor]}`` (see
            ``higher_func.optim.DifferentiableOptimizer``).
        track_higher_grads: if False, nothing is kept for differentiating through the loop
            (test-time adaptation, constant memory).
        first_order: if True, first-order MAML: inner gradients are constants, the updates
            stay on the tape.
        num_tasks: if given, ``num_tasks`` inner loops run as one vmapped computation: inputs
            carry a leading task dim, ``diffopt.step(losses)`` takes one loss per task (shape
            ``[num_tasks]``), and the meta-gradients of all tasks sum into ``model``. Models
            vmap cannot run (or runs slower, on a CPU) loop over tasks instead, with the same
            results (``higher_func.patch.batching(fmodel)``; see ``monkeypatch``).
        randomness: with ``num_tasks``, how random ops such as dropout draw across tasks
            (``torch.vmap``'s meanings): ``"different"`` (default, as a loop over tasks),
            ``"same"`` or ``"error"``.
        batching: with ``num_tasks``, ``"auto"`` (default), ``"vmap"`` or ``"loop"``: how
            the tasks run (see ``monkeypatch``).

    Yields:
        ``(fmodel, diffopt)``: the patched model, and the optimizer whose ``step(loss)``
        updates ``fmodel``'s fast weights.

    Example:
        >>> model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y, xq, yq = (torch.randn(10, 1) for _ in range(4))
        >>> with innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     for _ in range(5):
        ...         fast_weights = diffopt.step(F.mse_loss(fmodel(x), y))
        ...     F.mse_loss(fmodel(xq), yq).backward()
        >>> model[0].weight.grad.shape  # the meta-gradient
        torch.Size([8, 1])

    Example (T tasks at once, ``xs: [T, K, ...]``):
        >>> T = 4
        >>> xs, ys, xq, yq = (torch.randn(T, 10, 1) for _ in range(4))
        >>> with innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=T) as (f, d):
        ...     for _ in range(5):
        ...         fast_weights = d.step(torch.vmap(F.mse_loss)(f(xs), ys))  # a loss per task
        ...     torch.vmap(F.mse_loss)(f(xq), yq).mean().backward()
    """
    fmodel = monkeypatch(
        model,
        device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
        num_tasks=num_tasks,
        randomness=randomness,
        batching=batching,
    )
    diffopt = optim.get_diff_optim(
        opt,
        fmodel._hf_tree.params,  # model.parameters(), as resolved when patching it
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        first_order=first_order,
        num_tasks=num_tasks,
    )
    yield fmodel, diffopt
