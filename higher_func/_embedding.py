"""An embedding lookup whose padding rows get no gradient under ``torch.vmap``.

torch's vmap rule for ``F.embedding`` looks every task up in one table of ``T * rows`` rows
with the same ``padding_idx``: only the first task's padding row is kept out of the gradient,
every other task's padding row silently gets one. ``embedding`` here looks up without
``padding_idx`` and cuts the gradient at the padding positions itself, which is what
``padding_idx`` means: the output is the same, and the padding row never gets a gradient.
Batched patched modules use it in place of ``F.embedding`` (see ``higher_func._reroute``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["embedding"]


def embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: Optional[int] = None,
    max_norm: Optional[float] = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """``F.embedding`` with a ``padding_idx`` that stays right under ``torch.vmap``.

    Args:
        input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq: as in
            ``torch.nn.functional.embedding``.
        sparse: must be False.

    Returns:
        ``weight``'s rows at ``input``; the rows at ``padding_idx`` positions do not
        depend on ``weight`` for autograd.

    Raises:
        ValueError: ``sparse=True`` (sparse gradients of stacked per-task weights are not
            supported: use ``sparse=False``, or a patch without ``num_tasks``).

    Example:
        >>> w = torch.randn(3, 5, 2, requires_grad=True)  # 3 tasks
        >>> ids = torch.tensor([0, 1, 0])
        >>> out = torch.vmap(lambda w: embedding(ids, w, padding_idx=0))(w)
        >>> g, = torch.autograd.grad(out.sum(), w)
        >>> g[:, 0].abs().sum().item()  # no task's padding row gets a gradient
        0.0
    """
    if sparse:
        raise ValueError(
            "Embedding(sparse=True) in a patched module with num_tasks (or with padding_idx "
            "under higher_func.compile): sparse gradients are not supported there; use "
            "sparse=False, or patch without num_tasks"
        )
    out = F.embedding(input, weight, None, max_norm, norm_type, scale_grad_by_freq)
    if padding_idx is None:
        return out
    if padding_idx < 0:  # as F.embedding counts it
        padding_idx += weight.size(0)
    padding = (input == padding_idx).unsqueeze(-1)
    return torch.where(padding, out.detach(), out)
