"""Canaries for the private torch names in ``higher_func._compat``: when a torch release
moves or rewords one, these fail first and say which."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import higher_func
from higher_func import _compat

# -- batching over tasks (issue 20: higher_func/_batching.py) ------------------------------------


def test_convnd_is_the_base_of_every_convolution():
    for conv in (
        nn.Conv1d(1, 1, 1),
        nn.Conv2d(1, 1, 1),
        nn.Conv3d(1, 1, 1),
        nn.ConvTranspose2d(1, 1, 1),
    ):
        assert isinstance(conv, _compat.ConvNd)


def _message(fn) -> str:
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


def test_vmap_limit_messages_read_as_matched():
    # Each message higher_func reads to fall back to a loop, raised by torch itself.
    def item(x: torch.Tensor) -> torch.Tensor:
        return x * x.sum().item()

    def branch(x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x

    def dynamic(x: torch.Tensor) -> torch.Tensor:
        return x.nonzero()

    def inplace(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(3).mul_(x)

    class Legacy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    xs = torch.randn(2, 3)
    found = [
        _message(lambda: torch.vmap(item)(xs)),
        _message(lambda: torch.vmap(branch)(xs)),
        _message(lambda: torch.vmap(dynamic)(xs)),
        _message(lambda: torch.vmap(inplace)(xs)),
        _message(lambda: torch.vmap(Legacy.apply)(xs)),
    ]
    for message in found:
        assert any(limit in message for limit in _compat.VMAP_LIMITS), message
    # A missing batching rule (the LSTM op, in torch 2.13).
    lstm = nn.LSTM(3, 2)
    params = {k: v.detach() for k, v in lstm.named_parameters()}
    stacked = {k: v.expand(2, *v.shape) for k, v in params.items()}

    def run(p, x):
        return torch.func.functional_call(lstm, p, (x,))[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = _message(lambda: torch.vmap(run)(stacked, torch.randn(2, 4, 3)))
    assert "Batching rule not implemented" in message


def test_user_stacklevel_points_past_the_package():
    with pytest.warns(higher_func.BatchingFallbackWarning) as record:
        _warn_from_the_library()
    assert record[0].filename == __file__


def _warn_from_the_library() -> None:
    # An unbatchable module warns at patch time, from inside higher_func.
    from higher_func import _batching

    _batching._warned.discard(("GRU has no vmap batching rule in torch " + torch.__version__,))
    higher_func.monkeypatch(nn.GRU(2, 2), num_tasks=2)
