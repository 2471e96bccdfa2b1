"""The one global switch: whose rounding the differentiable optimizers reproduce.

``"torch"`` (the default) follows today's ``torch.optim``; ``"higher"`` follows higher 0.2.1
bit for bit, for porting users who must first reproduce their old numbers without editing
their code (hence also the environment variable ``HIGHER_FUNC_NUMERICS``, read at import).
``higher_func.optim`` re-exports ``numerics``, ``set_numerics`` and ``get_numerics``.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "MODES",
    "NumericsScope",
    "get_numerics",
    "numerics",
    "set_numerics",
]

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


class NumericsScope:
    """What ``numerics(mode)`` returns: a context manager that switches the mode when a ``with``
    block starts and restores the one it found there when the block ends. Nothing changes
    before the block starts, so a scope made ahead of time and entered later (or twice, or
    nested) switches when, and only while, it is in force."""

    def __init__(self, mode: str) -> None:
        self._mode = mode
        self._previous: list[str] = []  # a stack: the same scope may be re-entered

    def __enter__(self) -> NumericsScope:
        global _mode
        self._previous.append(_mode)
        _mode = self._mode
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _mode
        _mode = self._previous.pop()

    def __repr__(self) -> str:
        return f"numerics({self._mode!r})"


def numerics(mode: str) -> NumericsScope:
    """Choose, for a ``with`` block, whose numerics the differentiable optimizers reproduce.

    Args:
        mode: ``"torch"`` (the default): every step rounds as today's ``torch.optim`` does.
            ``"higher"``: every step of an optimizer that higher 0.2.1 shipped rounds as
            higher did (see ``UpdateRule.higher`` in ``higher_func._rules``), so unrolls and
            meta-gradients of a legacy program equal the old ones bit for bit.

    Returns:
        A context manager: the mode is ``mode`` inside the ``with`` block, and the previous
        one comes back at its end. Calling ``numerics`` alone changes nothing; to switch for
        the rest of the program, use ``set_numerics``.

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
    return NumericsScope(_checked_mode(mode, "numerics(mode)"))


def set_numerics(mode: str) -> str:
    """Switch whose numerics the differentiable optimizers reproduce, for the rest of the
    program (or until switched again); ``numerics(mode)`` does it for a ``with`` block.

    Args:
        mode: ``"torch"`` or ``"higher"``, as for ``numerics``.

    Returns:
        The mode before the switch.

    Raises:
        TypeError: ``mode`` is not a string.
        ValueError: ``mode`` is neither ``"torch"`` nor ``"higher"``.

    Example:
        >>> previous = set_numerics("higher")
        >>> get_numerics(), previous
        ('higher', 'torch')
        >>> _ = set_numerics(previous)
    """
    global _mode
    previous, _mode = _mode, _checked_mode(mode, "set_numerics(mode)")
    return previous


def get_numerics() -> str:
    """The current numerics mode, ``"torch"`` or ``"higher"`` (see ``numerics``).

    Example:
        >>> get_numerics()
        'torch'
    """
    return _mode
