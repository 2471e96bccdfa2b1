"""Argument checks that ``patch`` and ``optim`` share, so both say the same thing."""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["UnknownKeyError", "check_bool", "check_task", "same_device"]


class UnknownKeyError(KeyError):
    """A key that names nothing it should: a ``params`` dict whose names are not the module's
    parameters, a buffer name the patched module does not have, an ``override`` key that is not
    a hyperparameter of the optimizer.

    A ``KeyError``, what callers catch for a wrong key (as with higher), whose message prints
    as written: a plain ``KeyError`` prints the quoted repr of its argument.

    Example:
        >>> import higher_func
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = higher_func.monkeypatch(model)
        >>> try:
        ...     fmodel(torch.ones(2), params={"weight": model.weight, "scale": model.bias})
        ... except KeyError as error:
        ...     print(type(error).__name__, error)  # doctest: +ELLIPSIS
        UnknownKeyError params dict does not match the module's parameters: unknown ['scale'], ...
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Tracebacks name the class where users import it from, not this private module.
UnknownKeyError.__module__ = "higher_func"


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool.

    Raises:
        TypeError: it is not (``1`` or ``"yes"`` are refused: a flag is meant).
    """
    if not isinstance(value, bool):
        raise TypeError(
            f"{name} must be a bool, got {type(value).__name__} {value!r} (a flag: pass True "
            "or False)"
        )
    return value


def check_task(task: Any, num_tasks: Optional[int], what: str) -> None:
    """Check ``state_dict(task=)`` of a patched module or optimizer (``what``).

    Raises:
        ValueError: ``task`` is missing for a batched ``what``, given for one that is not,
            or out of range.
        TypeError: ``task`` is not an int.
    """
    if (task is None) != (num_tasks is None):
        raise ValueError(
            f"state_dict(task=t) selects one task of a batched {what}; it is required with "
            "num_tasks and meaningless without"
        )
    if task is None or num_tasks is None:
        return
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"state_dict(task=) must be an int, got {type(task).__name__}")
    if not 0 <= task < num_tasks:
        raise ValueError(f"task {task} is out of range for num_tasks={num_tasks}")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether tensors on ``a`` and ``b`` may be mixed: ``"cuda"`` (no index) stands for the
    current device, so it matches any index of its type."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
