"""Small helpers kept from ``higher.utils`` for legacy code that imports them.

``flatten`` and ``get_func_params`` are higher 0.2.1's public helpers; ``_recursive_map`` is
the private one that legacy code most often reaches for. All three behave as higher's do.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch

__all__ = ["flatten", "get_func_params"]


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
    params = []
    for p in module.parameters():
        q = p.detach().clone() if safe_copy else p.detach()
        q = q.requires_grad_(p.requires_grad)
        params.append(q if device is None else q.to(device))
    return params
