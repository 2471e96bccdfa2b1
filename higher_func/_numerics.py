"""The one global switch: whose rounding the differentiable optimizers reproduce.

``"torch"`` (the default) follows today's ``torch.optim``; ``"higher"`` follows higher 0.2.1
bit for bit, for porting users who must first reproduce their old numbers without editing
their code (hence also the environment variable ``HIGHER_FUNC_NUMERICS``, read at import).
``higher_func.optim`` re-exports ``numerics`` and ``get_numerics``.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ENVIRONMENT_VARIABLE", "MODES", "get_numerics", "numerics"]

MODES = ("torch", "higher")
ENVIRONMENT_VARIABLE = "HIGHER_FUNC_NUMERICS"


def _checked_mode(mode: Any, where: str) -> str:
    if not isinstance(mode, str):
        raise TypeError(
            f"{where} must be the string 'torch' or 'higher', got a {type(mode).__name__}"
        )
    if mode not in MODES:
        raise ValueError(
            f"{where} must be 'torch' (today's torch.optim numerics, the default) or 'higher' "
            f"(higher 0.2.1's, to reproduce old results), got {mode!r}"
        )
    return mode


def _from_environment() -> str:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "")
    return (
        "torch"
        if value == ""
        else _checked_mode(value, f"environment variable {ENVIRONMENT_VARIABLE}")
    )


# One process-wide mode (not per thread): it describes which results a program reproduces.
_mode = _from_environment()


class _NumericsScope:
    """What ``numerics(mode)`` returns: the mode is already set; leaving a ``with`` block
    restores the one before."""

    def __init__(self, previous: str, mode: str) -> None:
        self._previous = previous
        self._mode = mode

    def __enter__(self) -> _NumericsScope:
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _mode
        _mode = self._previous

    def __repr__(self) -> str:
        return f"numerics({self._mode!r})"


def numerics(mode: str) -> _NumericsScope:
    """Choose whose numerics the differentiable optimizers reproduce.

    Args:
        mode: ``"torch"`` (the default): every step rounds as today's ``torch.optim`` does.
            ``"higher"``: every step of an optimizer that higher 0.2.1 shipped rounds as
            higher did (see ``UpdateRule.higher`` in ``higher_func._rules``), so unrolls and
            meta-gradients of a legacy program equal the old ones bit for bit.

    Returns:
        A context manager. The mode is set at once (a plain call changes it for good); used
        in a ``with`` statement, the previous mode comes back at the end of the block.

    Raises:
        TypeError: ``mode`` is not a string.
        ValueError: ``mode`` is neither ``"torch"`` nor ``"higher"``.

    Example:
        >>> with numerics("higher"):
        ...     get_numerics()
        'higher'
        >>> get_numerics()
        'torch'

    The environment variable ``HIGHER_FUNC_NUMERICS`` sets the initial mode at import, for
    programs that cannot be edited. The mode is process-wide, not per thread, and is read at
    every ``step``.
    """
    global _mode
    scope = _NumericsScope(_mode, _checked_mode(mode, "numerics(mode)"))
    _mode = mode
    return scope


def get_numerics() -> str:
    """The current numerics mode, ``"torch"`` or ``"higher"`` (see ``numerics``).

    Example:
        >>> get_numerics()
        'torch'
    """
    return _mode
