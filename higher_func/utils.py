"""Small helpers kept from ``higher.utils`` for legacy code that imports them.

``flatten`` and ``get_func_params`` are higher 0.2.1's public helpers. Its private ones
(``_recursive_map``, ``_copy_tensor``, ``_find_param_in_list``...) are here too, with
higher's arguments and results, because optimizer subclasses and training scripts written
for higher call them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, TypeVar

import torch
from torch import nn

__all__ = ["flatten", "get_func_params"]

_T = TypeVar("_T")
_U = TypeVar("_U")


def _copy_tensor(
    t: torch.Tensor, safe_copy: bool, device: Optional[torch.device] = None
) -> torch.Tensor:
    """A detached copy of ``t`` (sharing its storage unless ``safe_copy``) that requires grad
    as ``t`` does, moved to ``device`` if given.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> c = _copy_tensor(w, safe_copy=True)
        >>> c.is_leaf, c.requires_grad, c.data_ptr() == w.data_ptr()
        (True, True, False)
    """
    copy = t.clone().detach() if safe_copy else t.detach()
    copy = copy.requires_grad_(t.requires_grad)
    return copy if device is None else copy.to(device)


def _recursive_copy_and_cast(target: Any, device: Optional[torch.device]) -> Any:
    """``target`` with every tensor in it (nested lists, tuples, dicts, sets) replaced by a
    safe ``_copy_tensor`` on ``device``; other leaves kept."""

    def copy(x: Any) -> Any:
        return _copy_tensor(x, True, device) if isinstance(x, torch.Tensor) else x

    return _recursive_map(target, copy)


def _is_container(target: Any) -> bool:
    """Whether ``target`` is a list, tuple, dict or set (the containers higher recurses into)."""
    return isinstance(target, (list, tuple, dict, set))


def _find_param_in_list(param: torch.Tensor, tensors: Iterable[torch.Tensor]) -> Optional[int]:
    """The index of ``param`` in ``tensors`` by identity (never by value), or None.

    Example:
        >>> a, b = torch.zeros(1), torch.zeros(1)
        >>> _find_param_in_list(b, [a, b]), _find_param_in_list(torch.zeros(1), [a, b])
        (1, None)
    """
    for i, p in enumerate(tensors):
        if p is param:
            return i
    return None


def _get_param_mapping(
    module: nn.Module, seen: List[torch.Tensor], mapping: List[int]
) -> List[int]:
    """For every parameter slot of ``module`` (submodules too, a tied weight under each of its
    names), the index of its tensor among the distinct ones; ``seen`` collects those tensors
    and ``mapping`` the indices (both extended in place and ``mapping`` returned).

    Example:
        >>> tied = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> tied[1].weight = tied[0].weight
        >>> _get_param_mapping(tied, [], [])
        [0, 1, 0, 2]
    """
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            found = len(seen)
            seen.append(param)
        mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """Apply ``map_fn`` to every leaf of nested lists, tuples, dicts and sets, keeping types.

    Dict keys are kept as they are; only values are mapped.

    Example:
        >>> _recursive_map({"a": [1, (2, 3)], "b": 4}, lambda x: 10 * x)
        {'a': [10, (20, 30)], 'b': 40}
    """
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(x, map_fn) for x in target)
    if isinstance(target, dict):
        return type(target)((k, _recursive_map(v, map_fn)) for k, v in target.items())
    return map_fn(target)


def flatten(x: Any) -> List[Any]:
    """The leaves of a nested structure of lists, tuples, sets and dict values, in order.

    Args:
        x: a leaf, or a list, tuple, set or dict nesting more of them.

    Returns:
        A flat list of the leaves (dicts contribute their values, in insertion order).

    Example:
        >>> flatten({"a": [1, (2, 3)], "b": 4})
        [1, 2, 3, 4]
    """
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple, set)):
        return [leaf for y in x for leaf in flatten(y)]
    return [x]


def get_func_params(
    module: torch.nn.Module, device: Optional[torch.device] = None, safe_copy: bool = True
) -> List[torch.Tensor]:
    """Detached copies of ``module``'s parameters, each requiring grad as its original does.

    Args:
        module: the module whose ``parameters()`` to copy (tied weights once).
        device: optional device to move the copies to.
        safe_copy: if False, the copies share storage with the parameters (detach only).

    Returns:
        One tensor per parameter, in ``module.parameters()`` order.

    Example:
        >>> params = get_func_params(nn.Linear(3, 2))
        >>> [tuple(p.shape) for p in params], all(p.is_leaf and p.requires_grad for p in params)
        ([(2, 3), (2,)], True)
    """
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
