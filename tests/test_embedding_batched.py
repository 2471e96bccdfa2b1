"""Embeddings with ``padding_idx`` under ``num_tasks``: vmapped, and equal to a loop over tasks.

torch's vmap rule for ``F.embedding`` keeps only the first task's padding row out of the
gradient; batched patches compute the lookup themselves (``higher_func._embedding``), so every
task's padding row gets no gradient, inner steps and meta-gradients included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher_func
from higher_func import _embedding

DTYPE = torch.float64
T = 3
OPTIONS = {
    "padding": {"padding_idx": 0},
    "negative_padding": {"padding_idx": -1},
    "no_padding": {},
    "scale_grad_by_freq": {"padding_idx": 0, "scale_grad_by_freq": True},
    "max_norm": {"padding_idx": 0, "max_norm": 1.0},
}


class Bag(nn.Module):
    """Mean of the token embeddings, then a linear head."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4, **options)
        self.head = nn.Linear(4, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(-2))


def bag(options: dict) -> Bag:
    torch.manual_seed(0)
    model = Bag(**options).to(DTYPE)
    with torch.no_grad():  # a padding row that is not zero shows in the outputs
        model.embedding.weight.add_(0.5)
    return model


def tokens(num_tasks: int = T) -> torch.Tensor:
    ids = torch.randint(1, 6, (num_tasks, 5, 6), generator=torch.Generator().manual_seed(1))
    ids[..., -2:] = 0  # padding
    ids[..., 0] = 6  # the last row: the padding row of padding_idx=-1
    return ids


def inner_loop(model: nn.Module, ids: torch.Tensor, **kwargs):
    """Per-task query losses, fast weights after two steps, and meta-gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs) as (
        fmodel,
        diffopt,
    ):
        for _ in range(2):
            diffopt.step(fmodel(ids).pow(2).mean(dim=(-2, -1)))
        losses = (fmodel(ids) - 1).pow(2).mean(dim=(-2, -1))
        fast = [p.detach() for p in fmodel.parameters()]
    grads = torch.autograd.grad(losses.sum(), list(model.parameters()))
    how = higher_func.patch.batching(fmodel) if "num_tasks" in kwargs else None
    return losses.detach(), fast, grads, how


# max_norm renormalizes the looked-up rows in place, for which vmap has no batching rule of
# its own: torch runs its slower generic fallback, and says so.
@pytest.mark.filterwarnings("ignore:There is a performance drop.*embedding_renorm_")
@pytest.mark.parametrize("name", list(OPTIONS))
def test_batched_equals_the_loop(name):
    ids = tokens()
    losses, fast, grads, how = inner_loop(bag(OPTIONS[name]), ids, num_tasks=T)
    assert how.mode == "vmap", how.reason
    looped = [inner_loop(bag(OPTIONS[name]), ids[t]) for t in range(T)]
    torch.testing.assert_close(losses, torch.stack([lo for lo, _, _, _ in looped]))
    for i, p in enumerate(fast):
        torch.testing.assert_close(p, torch.stack([f[i] for _, f, _, _ in looped]))
    for i, g in enumerate(grads):
        torch.testing.assert_close(g, sum(gr[i] for _, _, gr, _ in looped))


@pytest.mark.parametrize("name", ["padding", "negative_padding", "scale_grad_by_freq"])
def test_no_tasks_padding_row_moves(name):
    options = OPTIONS[name]
    model = bag(options)
    _, fast, grads, _ = inner_loop(model, tokens(), num_tasks=T)
    row = options["padding_idx"]
    assert torch.equal(fast[0][:, row], model.embedding.weight[row].detach().expand(T, 4))
    assert torch.count_nonzero(grads[0][row]) == 0


def test_embedding_function_matches_torch():
    weight = torch.randn(7, 4, dtype=DTYPE, requires_grad=True)
    ids = tokens(1)[0]
    for options in OPTIONS.values():
        if "max_norm" in options:
            continue
        mine = _embedding.embedding(ids, weight, **options)
        theirs = F.embedding(ids, weight, **options)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        g = torch.randn_like(mine)
        (a,) = torch.autograd.grad(mine, weight, g)
        (b,) = torch.autograd.grad(theirs, weight, g)
        torch.testing.assert_close(a, b)


def test_second_order_equals_torch():
    # (gradcheck does not apply: padding_idx is by definition not the numerical derivative.)
    ids = tokens(1)[0]

    def second_order(lookup):
        weight = torch.randn(7, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
        weight.requires_grad_()
        out = lookup(ids, weight, padding_idx=0, scale_grad_by_freq=True)
        (g,) = torch.autograd.grad(out.sin().sum(), weight, create_graph=True)
        return torch.autograd.grad((g * weight).pow(2).sum(), weight)[0]

    torch.testing.assert_close(second_order(_embedding.embedding), second_order(F.embedding))


def test_sparse_is_refused_with_num_tasks():
    model = Bag(sparse=True, padding_idx=0).to(DTYPE)
    fmodel = higher_func.monkeypatch(model, num_tasks=T)
    with pytest.raises(ValueError, match="sparse=True.*num_tasks"):
        fmodel(tokens())


def test_unbatched_patches_are_not_rerouted():
    fmodel = higher_func.monkeypatch(bag(OPTIONS["padding"]))
    assert fmodel._hf_reroute is None
