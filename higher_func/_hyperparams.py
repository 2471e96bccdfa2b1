"""Trainable hyperparameters: an optimizer's numbers as tensors to learn, and back.

``get_trainable_opt_params`` turns every numeric hyperparameter of a ``torch.optim``
optimizer into a tensor requiring grad, in the ``override=`` format; after meta-training,
``apply_trainable_opt_params`` writes the learned values back into the optimizer. Both are
re-exported by ``higher_func.optim``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._compat import pytree
from ._overrides import OverrideType, check_override, is_number
from ._state import to_python

__all__ = ["apply_trainable_opt_params", "get_trainable_opt_params"]


def _is_numeric(x: Any) -> bool:
    if isinstance(x, (tuple, list)):
        return len(x) > 0 and all(_is_numeric(v) for v in x)
    return is_number(x) or (isinstance(x, torch.Tensor) and x.is_floating_point())


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: Optional[torch.device] = None
) -> OverrideType:
    """An ``override`` dict making every numeric hyperparameter of ``opt`` a learnable tensor.

    Only numbers (and tuples of numbers, like ``betas``) become float tensors requiring grad;
    flags such as ``maximize``, ``nesterov`` or ``capturable`` never do.

    Args:
        opt: any ``torch.optim`` optimizer.
        device: where to put the tensors (default: the CPU, or a tensor value's own device).

    Returns:
        ``{name: [tensor per group]}``, ready for ``override=``.

    Examples:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
        >>> override = get_trainable_opt_params(opt)
        >>> override["lr"]
        [tensor(0.1000, requires_grad=True)]
        >>> "nesterov" in override
        False

    Differs from higher: booleans are not turned into trainable tensors.
    """

    def learnable(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.detach().clone().float().to(device).requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    override: OverrideType = {}
    for group in opt.param_groups:
        for key, value in group.items():
            if key != "params" and _is_numeric(value):
                override.setdefault(key, []).append(pytree.tree_map(learnable, value))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: OverrideType) -> None:
    """Write learned hyperparameters (an ``override`` dict) back into ``opt``'s groups.

    Args:
        opt: the optimizer ``override`` was made for.
        override: ``{name: [value] or [value per group]}``, e.g. from
            ``get_trainable_opt_params`` after meta-training.

    Raises:
        TypeError: ``override`` or one of its values has the wrong type.
        KeyError: it names a key ``opt``'s groups do not have.
        ValueError: it has the wrong number of values for ``opt``'s groups.

    Examples:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> apply_trainable_opt_params(opt, {"lr": [torch.tensor(0.25)]})
        >>> opt.param_groups[0]["lr"]
        0.25

    Differs from higher: a learned value replaces an integer default as a float (higher
    truncated a learned momentum of 0.9 into ``int`` 0).
    """
    for key, values in check_override(override, opt.param_groups).items():
        for g, group in enumerate(opt.param_groups):
            value = values[0] if len(values) == 1 else values[g]
            group[key] = pytree.tree_map(_written_back, value, group[key])


def _written_back(value: Any, target: Any) -> Any:
    """One learned leaf as the group should hold it: copied into a tensor the group already
    holds (a tensor ``lr`` stays that same tensor), or as a Python number otherwise."""
    if isinstance(target, torch.Tensor):
        with torch.no_grad():
            target.copy_(value)
        return target
    return to_python(value) if isinstance(value, torch.Tensor) else value
