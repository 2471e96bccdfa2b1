"""Canaries for the private torch names and torch behaviours in ``higher_func._compat``: when
a torch release moves one, these say which."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from higher_func import _compat

# -- attention and embeddings (higher_func._attention, _embedding, _reroute; issue 22) --------


def test_sdpa_math_kernel_takes_sdpa_arguments():
    schema = str(_compat.sdpa_math.default._schema)
    for argument in ("attn_mask", "dropout_p", "is_causal", "dropout_mask"):
        assert argument in schema
    q = torch.randn(1, 1, 3, 2)
    out, weights = _compat.sdpa_math(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


def test_multi_head_attention_calls_sdpa_by_its_global_name():
    # _attention.multi_head_attention_forward rebinds that name in a copy of the function.
    assert "scaled_dot_product_attention" in F.multi_head_attention_forward.__code__.co_names


def test_torch_function_modes_see_sdpa_and_embedding_as_themselves():
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 1, 3, 2)
    with Record():
        F.scaled_dot_product_attention(q, q, q)
        F.embedding(torch.tensor([0, 1]), torch.randn(3, 2), padding_idx=0)
    assert F.scaled_dot_product_attention in seen and F.embedding in seen


def test_vmap_still_gives_other_tasks_padding_rows_a_gradient():
    # When this fails, torch fixed its vmap rule and higher_func._embedding can go.
    weight = torch.randn(2, 4, 3, requires_grad=True)
    ids = torch.tensor([[0, 1, 0], [0, 2, 0]])  # per task, as a batched patch's inputs are
    out = torch.vmap(lambda i, w: F.embedding(i, w, padding_idx=0))(ids, weight)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert torch.count_nonzero(grad[0, 0]) == 0 and torch.count_nonzero(grad[1, 0]) > 0
