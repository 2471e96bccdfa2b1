"""Scaled dot-product attention that can be differentiated twice.

``torch.nn.functional.scaled_dot_product_attention`` picks a fused kernel (flash attention on
a CPU; flash, memory-efficient or cuDNN attention on a GPU) whose backward has no derivative
of its own: second-order MAML through it fails at the meta-backward with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". torch's math
kernel computes the same function from differentiable ops. ``scaled_dot_product_attention``
here calls it with ``F.scaled_dot_product_attention``'s own signature and meaning, every
option included (boolean or additive ``attn_mask``, ``is_causal``, ``dropout_p``, ``scale``,
``enable_gqa`` where the installed torch has them); ``multi_head_attention_forward`` is
``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` and the ``nn.Transformer``
layers call) computing its attention the same way.

Patched modules use them in place of torch's while their gradients are tracked (see
``higher_func._reroute``); everything else keeps the fused kernels.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ._compat import SDPA_OPTIONS, sdpa_math_call

__all__ = ["multi_head_attention_forward", "scaled_dot_product_attention", "WORDS"]

#: Names whose presence in a module's code means its forward may reach attention (see
#: ``higher_func._reroute.mentions``): torch's functions, and the words attention code is
#: written with (Hugging Face models reach torch's function through a table of attention
#: functions, ``ALL_ATTENTION_FUNCTIONS``, not by its name).
WORDS = ("attention", "attn", "sdpa", "scaled_dot_product")


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` computed by torch's math kernel, which supports
    double backward.

    Args:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa: as in
            ``torch.nn.functional.scaled_dot_product_attention`` (a boolean ``attn_mask``
            marks the positions that take part; ``scale`` and ``enable_gqa`` need the torch
            versions that introduced them).

    Returns:
        The attention output, shaped like ``query`` with ``value``'s last dim.

    Raises:
        RuntimeError: as torch's function does, e.g. for both ``attn_mask`` and
            ``is_causal``.
        TypeError: for ``scale`` or ``enable_gqa`` on a torch older than the release that
            added them (2.1, 2.5), where torch's function does not take them either.

    Example:
        >>> q = torch.randn(2, 4, 5, 8, requires_grad=True)
        >>> out = scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> g, = torch.autograd.grad(out.sum(), q, create_graph=True)
        >>> g.pow(2).sum().backward()  # second order: fails with torch's CPU kernel
    """
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # As F.scaled_dot_product_attention does before its math kernel: the kernel itself
        # would add a boolean mask as 0/1.
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(
            attn_mask.logical_not(), float("-inf")
        )
    newer: dict = {}  # only when asked for, so that older torch (no scale=, no GQA) runs
    if scale is not None:
        newer["scale"] = scale
    if enable_gqa:
        newer["enable_gqa"] = True
    unknown = sorted(newer.keys() - SDPA_OPTIONS)
    if unknown:
        option = unknown[0]
        raise TypeError(
            f"scaled_dot_product_attention: {option}= needs torch >= {_SINCE[option]} (as "
            f"F.scaled_dot_product_attention does), this is torch {torch.__version__}; "
            f"{_INSTEAD[option]}"
        )
    return sdpa_math_call(query, key, value, attn_mask, dropout_p, is_causal, **newer)[0]


#: The torch release that gave the math kernel (and torch's function) each newer option, and
#: what to write on an older torch.
_SINCE = {"scale": "2.1", "enable_gqa": "2.5"}
_INSTEAD = {
    "scale": "multiply the query by scale * sqrt(query.shape[-1]) instead",
    "enable_gqa": "repeat key and value along the head dim (repeat_interleave) instead",
}


def _with_math_attention(function: Any) -> types.FunctionType:
    """``function`` (a Python function of ``torch.nn.functional``) whose calls to
    ``scaled_dot_product_attention`` by its global name reach the math kernel instead.

    A copy of the function with its own globals, not a change to torch: other threads and
    other callers keep torch's function.
    """
    namespace = dict(function.__globals__)
    namespace["scaled_dot_product_attention"] = scaled_dot_product_attention
    copy = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, None
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__doc__ = function.__doc__
    return copy


#: ``F.multi_head_attention_forward`` with the math kernel (``nn.MultiheadAttention`` called
#: with ``need_weights=False``, as the ``nn.Transformer`` layers do, reaches the fused one).
multi_head_attention_forward: Any = _with_math_attention(F.multi_head_attention_forward)
