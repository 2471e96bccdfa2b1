"""Small helpers kept from ``higher.utils`` for legacy code that imports them."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch

__all__ = ["flatten", "get_func_params"]


def _recursive_map(target: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every leaf of nested lists, tuples, dicts and sets, keeping their types."""
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(x, fn) for x in target)
    if isinstance(target, dict):
        return type(target)((k, _recursive_map(v, fn)) for k, v in target.items())
    return fn(target)


def flatten(x: Any) -> List[Any]:
    """The leaves of a nested structure of lists, tuples, sets and dict values, in order.

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
    """
    params = []
    for p in module.parameters():
        q = p.detach().clone() if safe_copy else p.detach()
        q = q.requires_grad_(p.requires_grad)
        params.append(q if device is None else q.to(device))
    return params
