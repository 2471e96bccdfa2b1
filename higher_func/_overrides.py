"""Hyperparameter overrides: checking ``override={key: [value] or [value per group]}`` at the
boundary, and shaping tensor values so the elementwise update rules can use them.

A value is a number, a tensor (one value, elementwise values broadcastable to the weights of
its group, or with ``num_tasks`` one value per task), or a pair of those (``betas``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from ._checks import UnknownKeyError
from ._compat import pytree

__all__ = [
    "OverrideType",
    "as_list",
    "as_scalar_if_single",
    "broadcast_per_task",
    "check_override",
    "has_per_task",
    "is_number",
]

OverrideType = Dict[str, List[Any]]


def is_number(x: Any) -> bool:
    """Whether ``x`` is a Python int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def as_list(value: Any) -> Optional[List[Any]]:
    """``value`` as a list if it is a sequence (``len()`` and indexing, as higher required:
    a list, a tuple, an ``nn.ParameterList`` or a slice of one, or a 1-D tensor, whose
    entries are its 0-dim elements, on the tape), else None."""
    if isinstance(value, torch.Tensor):
        # torch.tensor([lr], requires_grad=True) in place of [tensor(lr)], as legacy programs
        # pass it; other shapes would be read along their first dim, which is never meant.
        return list(value.unbind(0)) if value.dim() == 1 else None
    if isinstance(value, (str, bytes, dict)):
        return None
    if not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        return None
    return [value[i] for i in range(len(value))]


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def check_override(
    override: Any,
    groups: List[Dict[str, Any]],
    num_tasks: Optional[int] = None,
    group_shapes: Optional[List[List[torch.Size]]] = None,
) -> OverrideType:
    """Validate ``{key: [value] or [value per group]}`` against the optimizer's groups.

    Args:
        override: what the user passed.
        groups: the optimizer's parameter groups (their current values fix each key's type).
        num_tasks: the number of stacked tasks, or None.
        group_shapes: the (unstacked) shapes of each group's weights, against which tensor
            values may be elementwise; None allows only one value per tensor.

    Returns:
        A new dict with every sequence turned into a list, and pair values (``betas``) into
        the type of the group's current value, so no ``nn.ParameterList`` reaches a group.

    Raises:
        TypeError: ``override`` is not a dict, a value list is not a sequence, or a value has
            the wrong type.
        KeyError: a key is not a hyperparameter of the groups.
        ValueError: the wrong number of values, a non-finite number, or a tensor whose shape
            fits no weight of its group.
    """
    if not isinstance(override, dict):
        raise TypeError(f"override must be a dict of lists, got {type(override).__name__}")
    checked: OverrideType = {}
    for key, values in override.items():
        if key == "params" or key not in groups[0]:
            known = sorted(k for k in groups[0] if k != "params")
            raise UnknownKeyError(
                f"override names {key!r}, which is not a hyperparameter of this optimizer; "
                f"its hyperparameters are {known}"
            )
        values_list = as_list(values)
        if values_list is None:
            raise TypeError(
                f"override[{key!r}] must be a list (or any sequence, e.g. an "
                "nn.ParameterList or a 1-D tensor): [value] for all groups or one value per "
                f"group, got {_described(values)}"
            )
        if len(values_list) not in (1, len(groups)):
            raise ValueError(
                f"override[{key!r}] has {len(values_list)} values; expected 1 or one per "
                f"parameter group ({len(groups)})"
            )
        checked[key] = []
        for g, value in enumerate(values_list):
            if group_shapes is None:
                shapes = None
            elif len(values_list) == 1:
                shapes = [shape for group in group_shapes for shape in group]
            else:
                shapes = group_shapes[g]
            current = _current(groups, key, g if len(values_list) > 1 else None)
            checked[key].append(_check_value(key, value, current, num_tasks, shapes))
    return checked


def _current(groups: List[Dict[str, Any]], key: str, g: Optional[int]) -> Any:
    """The value an override of ``key`` replaces, which fixes its type: group ``g``'s, or,
    for one value for all groups (``g`` None), the first group's that is not None."""
    if g is not None:
        return groups[g].get(key)
    return next((group[key] for group in groups if group.get(key) is not None), None)


def _check_value(
    key: str,
    value: Any,
    current: Any,
    num_tasks: Optional[int],
    shapes: Optional[List[torch.Size]],
) -> Any:
    """Check one override value against the group's current one; return it normalised.

    A current value of None is a placeholder (``lr=None`` in a group, filled in by the
    override, as higher allowed): any number, tensor or pair of them replaces it.
    """
    if current is None and value is not None:
        items = as_list(value)
        if items is not None:  # a pair, such as betas
            return tuple(_check_value(key, v, 0.0, num_tasks, shapes) for v in items)
        return _check_value(key, value, 0.0, num_tasks, shapes)
    if isinstance(current, bool) or current is None or isinstance(current, str):
        if type(value) is not type(current):
            raise TypeError(f"override[{key!r}] must be a {type(current).__name__}, got {value!r}")
    elif isinstance(current, (tuple, list)):
        items = as_list(value)
        if items is None or len(items) != len(current):
            raise TypeError(
                f"override[{key!r}] must be a sequence of {len(current)} numbers or tensors, "
                f"got {value!r}"
            )
        return type(current)(
            _check_value(key, v, c, num_tasks, shapes) for v, c in zip(items, current)
        )
    elif isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"override[{key!r}] must be a floating-point tensor, got {value.dtype}")
        if value.numel() != 1:
            _check_elementwise(key, value, num_tasks, shapes)
    elif not is_number(value):
        raise TypeError(f"override[{key!r}] must be a number or a tensor, got {value!r}")
    elif not math.isfinite(value):
        raise ValueError(f"override[{key!r}] must be finite, got {value!r}")
    return value


def _check_elementwise(
    key: str, value: torch.Tensor, num_tasks: Optional[int], shapes: Optional[List[torch.Size]]
) -> None:
    """A tensor hyperparameter of more than one value must broadcast to every weight it
    scales without changing that weight's shape (see ``DifferentiableOptimizer``)."""
    if num_tasks is not None and value.shape == (num_tasks,):
        return
    if shapes is None:
        raise ValueError(
            f"override[{key!r}] has shape {tuple(value.shape)}; expected one value here"
        )
    for shape in shapes:
        target = tuple(shape)
        if num_tasks is not None and value.dim() == len(shape) + 1:
            target = (num_tasks, *shape)
        try:
            fits = (
                value.dim() <= len(target) and torch.broadcast_shapes(value.shape, target) == target
            )
        except RuntimeError:
            fits = False
        if not fits:
            expected = f"one value or a shape broadcastable to {tuple(shape)}"
            if num_tasks is not None:
                expected += f", ({num_tasks},) or ({num_tasks}, *{tuple(shape)})"
            raise ValueError(
                f"override[{key!r}] has shape {tuple(value.shape)}, which does not fit a "
                f"weight of shape {tuple(shape)} in its group; expected {expected}"
            )


def _scalar_if_single(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dim() > 0:
        return x.reshape(())
    return x


def as_scalar_if_single(value: Any) -> Any:
    """``value`` with every one-element tensor made 0-dim: one value broadcasts without
    changing the shape of the weights it scales, whatever shape it came in."""
    return pytree.tree_map(_scalar_if_single, value)


def _is_per_task(x: Any, num_tasks: int) -> bool:
    return isinstance(x, torch.Tensor) and x.shape == (num_tasks,)


def has_per_task(hyper: Dict[str, Any], num_tasks: int) -> bool:
    """Whether any hyperparameter (or part of a pair) holds one value per task."""
    return any(_is_per_task(leaf, num_tasks) for leaf in pytree.tree_leaves(hyper))


def broadcast_per_task(hyper: Dict[str, Any], ndim: int, num_tasks: int) -> Dict[str, Any]:
    """Reshape ``[T]`` hyperparameters to ``[T, 1, ...]`` to broadcast over a weight's dims.

    Elementwise ones (``[*shape]``, ``[T, *shape]``) already broadcast against the stacked
    ``[T, *shape]`` weight as they are.
    """

    def reshape(x: Any) -> Any:
        if _is_per_task(x, num_tasks):
            return x.reshape(-1, *([1] * (ndim - 1)))
        return x

    return {k: pytree.tree_map(reshape, v) for k, v in hyper.items()}
