"""Canaries for the private torch names in ``higher_func._compat``: when a torch release moves
one, the test of that name fails here, saying which, before the modules using it misbehave."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from higher_func import _compat

# -- issue 19: the patch's private copies (_tree, _graph, _tensors) ---------------------------


def test_lazy_clone_copies_on_write():
    original = torch.arange(6.0)
    clone = _compat.lazy_clone(original)
    assert torch.equal(clone, original)
    clone.add_(1)
    assert torch.equal(original, torch.arange(6.0))
    assert hasattr(torch, "_lazy_clone"), "torch._lazy_clone is gone: every patch copies tables"


def test_storage_key_identifies_the_memory_of_every_view():
    def key(tensor):
        return _compat.storage_key(tensor.untyped_storage())

    t = torch.zeros(4)
    assert key(t) == key(t[2:]) == key(t.view(2, 2))
    assert key(t) != key(t.clone())


def test_storage_key_does_not_materialize_a_lazy_clone():
    original = torch.zeros(1000)
    clone = _compat.lazy_clone(original)
    _compat.storage_key(clone.untyped_storage())
    _compat.storage_key(original.untyped_storage())
    clone.add_(1)  # only now is memory copied
    assert original.sum() == 0


def _seen_inside(use_reentrant):
    seen = []

    def fn(x):
        seen.append(_compat.inside_checkpoint())
        return x * 2

    x = torch.randn(3, requires_grad=True)
    checkpoint(fn, x, use_reentrant=use_reentrant).sum().backward()
    return seen


def test_inside_checkpoint_sees_both_kinds_of_checkpointing():
    assert not _compat.inside_checkpoint()
    assert _seen_inside(use_reentrant=False)[0]
    assert _seen_inside(use_reentrant=True)[0]


def test_rnn_weight_lists_are_where_the_patch_expects_them():
    rnn = nn.LSTM(2, 3)
    assert _compat.FLAT_WEIGHTS in rnn.__dict__ and _compat.FLAT_WEIGHT_NAMES in rnn.__dict__
    extra = set(rnn.__dict__) & (_compat.RNN_WEIGHT_LISTS - {_compat.FLAT_WEIGHTS})
    for name in extra:  # torch >= 2.2 keeps weakrefs to the weights as well
        assert all(ref() is w for ref, w in zip(rnn.__dict__[name], rnn._flat_weights))


def test_compiled_call_is_where_the_patch_expects_it():
    module = nn.Linear(2, 2)
    module.compile(backend="eager")
    assert module.__dict__.get(_compat.COMPILED_CALL) is not None
