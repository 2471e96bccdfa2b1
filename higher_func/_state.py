"""Optimizer state across the boundary with ``torch.optim``.

Imported state (``get_diff_optim`` on an optimizer that has already trained) is copied and
detached, with ``step`` as a Python int, which the rules branch on; under higher's numerics
``step`` stays the float32 tensor torch.optim keeps, as higher imported it (its bias
corrections are then float32 tensor arithmetic, which the higher variants of the rules
reproduce). Exported state
(``DifferentiableOptimizer.state_dict``) is in ``torch.optim``'s format: ``step`` a float32
tensor, every tensor a detached copy, learned hyperparameters plain Python numbers.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._compat import pytree

__all__ = ["export_state", "import_state", "select_task", "to_python", "unstacked_shape"]


def import_state(
    state: Dict[str, Any],
    device: Optional[torch.device],
    num_tasks: Optional[int],
    tensor_step: bool = False,
) -> Dict[str, Any]:
    """A detached copy of one parameter's ``torch.optim`` state, with ``step`` as an int (a
    tensor copy instead with ``tensor_step``, where torch.optim keeps a tensor), and every
    tensor repeated per task when batched."""
    copied = {}
    for key, value in state.items():
        if value is None:
            continue
        if key == "step" and not (tensor_step and isinstance(value, torch.Tensor)):
            value = int(value.item()) if isinstance(value, torch.Tensor) else int(value)
        elif isinstance(value, torch.Tensor):
            value = value.detach()
            if num_tasks is not None and value.dim() > 0:
                # Per-weight state is repeated per task; 0-dim state (ASGD's eta and mu,
                # NAdam's mu_product) is one value that broadcasts to every task as it is.
                value = value.expand(num_tasks, *value.shape)
            value = value.clone() if device is None else value.to(device, copy=True)
        copied[key] = value
    return copied


def unstacked_shape(param: Any, num_tasks: Optional[int]) -> Optional[torch.Size]:
    """The shape of one task's weight (``param`` itself when not batched)."""
    if not isinstance(param, torch.Tensor):
        return None
    return param.shape if num_tasks is None else param.shape[1:]


def export_state(
    state: Dict[str, Any],
    task: Optional[int],
    num_tasks: Optional[int],
    param_shape: Optional[torch.Size],
) -> Dict[str, Any]:
    """One parameter's state in ``torch.optim``'s format (one task's, when ``task`` is given)."""
    exported = {}
    for key, value in state.items():
        if key == "step":
            value = torch.tensor(float(value), dtype=torch.float32)
        elif isinstance(value, torch.Tensor):
            value = select_task(value, task, num_tasks) if task is not None else value
            if value.shape != param_shape and value.numel() == 1:
                value = value.reshape(())  # a scalar state broadcast per task, e.g. ASGD's eta
            value = value.detach().clone()
        else:
            value = torch.tensor(value)
        exported[key] = value
    return exported


def _item_if_single(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def to_python(value: Any) -> Any:
    """``value`` with every one-element tensor (a learned hyperparameter) as a Python number."""
    return pytree.tree_map(_item_if_single, value)


def select_task(value: Any, task: int, num_tasks: Optional[int]) -> Any:
    """Task ``task``'s part of every per-task tensor in ``value``; other leaves unchanged."""

    def select(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == num_tasks:
            return x[task]
        return x

    return pytree.tree_map(select, value)
