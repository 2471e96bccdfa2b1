"""A zoo of tiny models shared by the tests, and helpers to compare and inspect them.

Every factory in ``ZOO`` builds a fresh, seeded model and its inputs, so two calls give two
independent modules with identical weights and buffers (one for ``higher_func``, one for the
``higher`` oracle). The zoo spans the module kinds a patched module must handle: plain layers,
convolution with BatchNorm, recurrent modules and cells, tied and frozen weights, ``None``
parameters, parametrizations, custom methods and containers.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import types
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize


@dataclasses.dataclass
class Case:
    """One zoo entry: a model, the positional inputs of its forward, and inputs that make it fail.

    ``bad_inputs`` make forward raise part-way through (after some layers, and BatchNorm buffer
    updates, have already run), to check that a failing call leaves the module as it found it.
    """

    name: str
    model: nn.Module
    inputs: tuple
    bad_inputs: tuple


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def _build(name: str, seed: int, dtype: torch.dtype, make: Callable[[torch.dtype], Case]) -> Case:
    # fork_rng keeps the global generator untouched, so building a model never shifts the
    # random numbers a test draws afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        case = make(dtype)
    case.name = name
    return case


def _one_more_feature(x: torch.Tensor) -> torch.Tensor:
    """The input with one more feature on its last axis: the first layer's shape check fails."""
    return torch.cat([x, x[..., :1]], dim=-1)


# ---------------------------------------------------------------------------------------------
# Models that need their own forward.
# ---------------------------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x)
        return self.head(out[:, -1] + h[0] * c[0])


class LSTMCellUnroll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 4)
        c = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


class TiedLM(nn.Module):
    """The output projection shares its weight with the embedding."""

    def __init__(self, vocab: int = 10, width: int = 6) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.output = nn.Linear(width, vocab)
        self.output.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.hidden(self.embedding(tokens))))


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


class LearnableScale(nn.Module):
    """A parametrization with a parameter of its own, so it shows up in ``parameters()``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class EncoderWithEmbed(nn.Module):
    """A submodule ``encoder``, a custom method ``embed``, a property, a root parameter, and a
    plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_size = 6
        self.encoder = nn.Sequential(OrderedDict(fc=nn.Linear(4, self.hidden_size), act=nn.Tanh()))
        self.scale = nn.Parameter(torch.randn(self.hidden_size))
        self.head = nn.Linear(self.hidden_size, 2)

    @property
    def scaled_encoder_weight(self) -> torch.Tensor:
        return self.encoder.fc.weight * self.scale[:, None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class EmbedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(12, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embedding(tokens)).mean(dim=1))


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.heads["a"](x) * self.heads["b"](x)


class EMANorm(nn.Module):
    """Reassigns a buffer in forward (``self.ema = ...``) and keeps the last hidden activation
    as a plain attribute (``self.last_hidden = h``): state a forward leaves on its module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)
        self.register_buffer("ema", torch.zeros(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        self.last_hidden = h
        if self.training:  # like BatchNorm: training updates the statistic, eval uses it
            self.ema = 0.9 * self.ema + 0.1 * h.mean(dim=0).detach()
            return self.head(h)
        return self.head(h - self.ema)


class ParameterContainers(nn.Module):
    """Weights held in a ParameterList and a ParameterDict, read by index, key and iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.scales = nn.ParameterList([nn.Parameter(torch.randn(4)) for _ in range(2)])
        self.shifts = nn.ParameterDict({"a": nn.Parameter(torch.randn(4))})
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for scale in self.scales:
            x = torch.tanh(x * scale)
        return self.head(x + self.shifts["a"] + sum(self.shifts.values()))


class FlatParameters(nn.Module):
    """``ParameterContainers`` with its weights as plain parameters, in the same order: the
    higher oracle's twin, since higher 0.2.1 reads ParameterList/ParameterDict entries from
    the original module instead of the fast weights."""

    def __init__(self) -> None:
        super().__init__()
        self.scale0 = nn.Parameter(torch.randn(4))
        self.scale1 = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for scale in (self.scale0, self.scale1):
            x = torch.tanh(x * scale)
        return self.head(x + 2 * self.shift)


class SelfAttention(nn.Module):
    """Multi-head self-attention called with ``need_weights=False``: the output is ``(out,
    None)``, a tuple with a leaf that is not a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.attention(x, x, x, need_weights=False)


class DictOutput(nn.Module):
    """An output dict mixing tensors with ints, None and a ``torch.device`` (read from a
    property), nested in a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def forward(self, x: torch.Tensor) -> dict:
        h = self.fc(x)
        return {"logits": h, "count": 3, "extra": (None, torch.tanh(h)), "device": self.device}


class _DoubleFunction(torch.autograd.Function):
    """An autograd.Function in the old style (``forward(ctx, ...)``, no ``setup_context``),
    which torch.func transforms refuse."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return 2 * x + x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2 + 2 * x)


class LegacyFunctionAfterBatchNorm(nn.Module):
    """BatchNorm updates its running statistics in place, then an old-style autograd.Function
    runs: a vmap attempt fails after the statistics were updated."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6, bias=False)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_DoubleFunction.apply(torch.tanh(self.norm(self.fc(x)))))


# ---------------------------------------------------------------------------------------------
# Factories.
# ---------------------------------------------------------------------------------------------


def _warm_up_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    # Running statistics away from their (0, 1) defaults, so eval-mode checks can tell the
    # copied statistics from fresh ones.
    with torch.no_grad():
        for _ in range(2):
            model(x + torch.randn_like(x))


def _mlp(dtype):
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _conv_bn(dtype):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).to(dtype)
    x = _randn(4, 2, 6, 6, dtype=dtype)
    _warm_up_batchnorm(model, x)
    # Larger images pass the convolution and BatchNorm, then fail at the Linear layer.
    return Case("", model, (x,), (_randn(4, 2, 8, 8, dtype=dtype),))


def _lstm(dtype):
    model = LSTMClassifier().to(dtype)
    x = _randn(2, 4, 3, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _gru(dtype):
    model = nn.GRU(3, 4, num_layers=2).to(dtype)
    x = _randn(5, 2, 3, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _rnn(dtype):
    model = nn.RNN(3, 4, bidirectional=True).to(dtype)
    x = _randn(5, 2, 3, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _lstm_cell(dtype):
    model = LSTMCellUnroll().to(dtype)
    x = _randn(2, 3, 3, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _gru_cell(dtype):
    model = nn.GRUCell(3, 4).to(dtype)
    x, h = _randn(2, 3, dtype=dtype), _randn(2, 4, dtype=dtype)
    return Case("", model, (x, h), (_one_more_feature(x), h))


def _rnn_cell(dtype):
    model = nn.RNNCell(3, 4).to(dtype)
    x = _randn(2, 3, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _tied(dtype):
    model = TiedLM().to(dtype)
    tokens = torch.randint(0, 10, (3, 4))
    return Case("", model, (tokens,), (tokens + 10,))


def _frozen(dtype):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _none_bias(dtype):
    # bias=False, and BatchNorm without affine parameters: both register ``None`` parameters.
    model = nn.Sequential(
        nn.Linear(4, 6, bias=False),
        nn.BatchNorm1d(6, affine=False),
        nn.Tanh(),
        nn.Linear(6, 3, bias=False),
    ).to(dtype)
    x = _randn(5, 4, dtype=dtype)
    _warm_up_batchnorm(model, x)
    bad = torch.cat([x, x[:, :1]], dim=1)
    return Case("", model, (x,), (bad,))


class WeightNorm(nn.Module):
    """torch's weight-norm parametrization (``parametrizations.weight_norm``, torch >= 2.1) for
    torch 2.0: the same two originals, magnitude ``g`` then direction ``v``, same function."""

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v * (g / v.norm(dim=1, keepdim=True))

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight.norm(dim=1, keepdim=True), weight


def _weight_normed(layer: nn.Linear) -> nn.Linear:
    if hasattr(parametrizations, "weight_norm"):
        return parametrizations.weight_norm(layer)
    return parametrize.register_parametrization(layer, "weight", WeightNorm())


def _weight_norm(dtype):
    model = nn.Sequential(_weight_normed(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _custom_parametrization(dtype):
    layer = nn.Linear(5, 5)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    parametrize.register_parametrization(layer, "weight", LearnableScale())
    model = nn.Sequential(nn.Tanh(), layer, nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    x = _randn(3, 5, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _encoder_embed(dtype):
    model = EncoderWithEmbed().to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _layernorm_embedding(dtype):
    model = EmbedNorm().to(dtype)
    tokens = torch.randint(0, 12, (3, 5))
    return Case("", model, (tokens,), (tokens + 12,))


def _containers(dtype):
    model = Containers().to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _ema_norm(dtype):
    model = EMANorm().to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _parameter_containers(dtype):
    model = ParameterContainers().to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _flat_parameters(dtype):
    case = _parameter_containers(dtype)
    twin = FlatParameters().to(dtype)
    with torch.no_grad():
        for mine, theirs in zip(twin.parameters(), case.model.parameters()):
            mine.copy_(theirs)
    return Case("", twin, case.inputs, case.bad_inputs)


def _transformer_eval(dtype):
    # Eval mode: torch takes its fused inference kernel when no weight seems to require grad,
    # which is what the per-task weights look like inside vmap.
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).to(dtype).eval()
    x = _randn(3, 4, 8, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _attention_no_weights(dtype):
    model = SelfAttention().to(dtype)
    x = _randn(3, 4, 8, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _dict_output(dtype):
    model = DictOutput().to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _spectral_norm(dtype):
    model = nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2)
    ).to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _spectral_norm_hook(dtype):
    # The older hook style: the weight is a plain attribute a forward pre-hook recomputes.
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2))
    model = model.to(dtype)
    x = _randn(5, 4, dtype=dtype)
    return Case("", model, (x,), (_one_more_feature(x),))


def _legacy_function(dtype):
    model = LegacyFunctionAfterBatchNorm().to(dtype)
    x = _randn(5, 4, dtype=dtype)
    _warm_up_batchnorm(model, x)
    return Case("", model, (x,), (_one_more_feature(x),))


def _factory(name: str, seed: int, make: Callable[[torch.dtype], Case]):
    def factory(dtype: torch.dtype = torch.float64) -> Case:
        return _build(name, seed, dtype, make)

    factory.__name__ = name
    return factory


_MAKERS = {
    "mlp": _mlp,
    "conv_bn": _conv_bn,
    "lstm": _lstm,
    "gru": _gru,
    "rnn": _rnn,
    "lstm_cell": _lstm_cell,
    "gru_cell": _gru_cell,
    "rnn_cell": _rnn_cell,
    "tied": _tied,
    "frozen": _frozen,
    "none_bias": _none_bias,
    "weight_norm": _weight_norm,
    "custom_parametrization": _custom_parametrization,
    "encoder_embed": _encoder_embed,
    "layernorm_embedding": _layernorm_embedding,
    "containers": _containers,
    "ema_norm": _ema_norm,
    "parameter_containers": _parameter_containers,
}

ZOO: dict[str, Callable[..., Case]] = {
    name: _factory(name, seed, make) for seed, (name, make) in enumerate(_MAKERS.items())
}
"""Every zoo model by name: ``ZOO[name](dtype=torch.float64) -> Case``."""

HIGHER_TWINS: dict[str, Callable[..., Case]] = {
    "parameter_containers": _factory(
        "parameter_containers", list(_MAKERS).index("parameter_containers"), _flat_parameters
    ),
}
"""Where higher 0.2.1 computes a zoo model wrongly, an equivalent model (same parameters in
the same order, same function) to run higher on instead."""

_VMAP_LIMIT_MAKERS = {
    "transformer_eval": _transformer_eval,
    "attention_no_weights": _attention_no_weights,
    "dict_output": _dict_output,
    "spectral_norm": _spectral_norm,
    "spectral_norm_hook": _spectral_norm_hook,
    "legacy_function": _legacy_function,
}

VMAP_LIMITS: dict[str, Callable[..., Case]] = {
    name: _factory(name, 100 + seed, make)
    for seed, (name, make) in enumerate(_VMAP_LIMIT_MAKERS.items())
}
"""Models at the limits of ``torch.vmap`` (fused attention kernels, outputs that are not
tensors, ops without batching rules, old-style autograd.Functions), for the batched tests.
Kept out of ``ZOO``: higher 0.2.1 does not run them all (it cannot differentiate attention's
CPU kernel twice)."""

NOT_TWICE_DIFFERENTIABLE: tuple = ()
"""Models whose backward torch cannot differentiate again: their inner loops run first-order.
(None left: scaled dot-product attention is differentiated twice through patched modules, see
tests/test_attention.py.)"""

NOT_TWICE_DIFFERENTIABLE_COMPILED = ("transformer_eval", "attention_no_weights")
"""Models whose compiled backward torch cannot differentiate again: nn.MultiheadAttention's
scaled dot-product attention keeps torch's fused kernel under ``higher_func.compile``."""

WITH_BATCHNORM = ("conv_bn", "none_bias")
RECURRENT = ("lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell")


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors of a nested output (tensor, tuple, list or dict), in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors_in(v)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in tensors_in(v)]
    return []


def scalar_loss(output: Any) -> torch.Tensor:
    """A smooth, non-symmetric scalar of any model output, with non-zero second derivatives."""
    return sum(((t * t).sum() + torch.sin(t).sum()) for t in tensors_in(output))


def assert_trees_close(actual: Any, expected: Any, atol: float = 1e-10, rtol: float = 1e-8):
    actual_tensors, expected_tensors = tensors_in(actual), tensors_in(expected)
    assert len(actual_tensors) == len(expected_tensors)
    assert actual_tensors, "nothing to compare"
    for a, e in zip(actual_tensors, expected_tensors):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


def perturbed_params(
    module: nn.Module, seed: int = 1, scale: float = 0.1, requires_grad: bool = True
) -> list[torch.Tensor]:
    """New fast weights near the module's, in ``module.parameters()`` order, as graph leaves.

    A parameter frozen in the module gets a frozen fast weight.
    """
    generator = torch.Generator().manual_seed(seed)
    params = []
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        new = (p.detach() + scale * noise).clone()
        params.append(new.requires_grad_(requires_grad and p.requires_grad))
    return params


def with_params(module: nn.Module, params: list[torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` with ``params`` (``module.parameters()`` order) loaded."""
    clone = copy.deepcopy(module)
    clone_params = list(clone.parameters())
    assert len(clone_params) == len(params)
    with torch.no_grad():
        for p, new in zip(clone_params, params):
            p.copy_(new)
    return clone


def trainable(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad]


@dataclasses.dataclass
class ModuleSnapshot:
    classes: dict[str, type]
    training: dict[str, bool]
    slots: dict[str, dict[str, Any]]
    values: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    flat_weights: dict[str, list[Any]]
    attributes: dict[str, dict[str, Any]]


def snapshot(module: nn.Module) -> ModuleSnapshot:
    """Everything about ``module`` that patching or calling a patched module must not change."""
    classes, training, slots, values, requires_grad, flat_weights = {}, {}, {}, {}, {}, {}
    attributes = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        classes[prefix] = type(sub)
        attributes[prefix] = dict(sub.__dict__)  # by identity: nothing set, replaced or removed
        training[prefix] = sub.training
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(sub, kind).items():
                key = f"{prefix}.{name}" if prefix else name
                slots[f"{kind}:{key}"] = {"object": tensor}
                if tensor is not None:
                    values[key] = tensor.detach().clone()
                    requires_grad[key] = tensor.requires_grad
        if hasattr(sub, "_flat_weights"):
            flat_weights[prefix] = list(sub._flat_weights)
    return ModuleSnapshot(classes, training, slots, values, requires_grad, flat_weights, attributes)


def assert_module_unchanged(
    module: nn.Module, before: ModuleSnapshot, meta_gradients: bool = False
) -> None:
    """Assert the module holds the very same tensor objects, values, modes and class as before.

    ``meta_gradients=True`` allows ``.grad`` to be written (by a meta-backward)."""
    after = snapshot(module)
    assert after.classes == before.classes, "a submodule's class changed"
    for prefix, attributes in before.attributes.items():
        now = after.attributes[prefix]
        assert now.keys() == attributes.keys(), f"attributes of {prefix!r} added or removed"
        for key, value in attributes.items():
            assert now[key] is value, f"attribute {prefix!r}.{key} was replaced"
    assert after.training == before.training, "a submodule's training mode changed"
    assert after.slots.keys() == before.slots.keys(), "parameter or buffer slots were added/removed"
    for key, slot in before.slots.items():
        assert after.slots[key]["object"] is slot["object"], f"{key} was replaced"
    for key, value in before.values.items():
        assert torch.equal(after.values[key], value), f"{key} changed value"
        assert after.requires_grad[key] == before.requires_grad[key], f"{key} requires_grad changed"
    for prefix, sub in module.named_modules(remove_duplicate=False):
        if hasattr(sub, "_flat_weights"):
            # RNN modules keep their weights in a list too: it must hold the module's own
            # Parameters, the same objects as before.
            names = sub._flat_weights_names
            assert len(sub._flat_weights) == len(names)
            for name, weight, old in zip(names, sub._flat_weights, before.flat_weights[prefix]):
                assert weight is getattr(sub, name), f"{prefix}._flat_weights[{name}] not restored"
                assert weight is old, f"{prefix}._flat_weights[{name}] replaced"
    for name, p in module.named_parameters():
        assert meta_gradients or p.grad is None, f"{name}.grad was written"


def assert_same_objects(after, before, what):
    """``after`` holds the very objects of ``before`` (tensors by identity), recursively."""
    if isinstance(before, dict):
        assert after.keys() == before.keys(), f"{what}: keys changed"
        for key in before:
            assert_same_objects(after[key], before[key], f"{what}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(after) == len(before), f"{what}: length changed"
        for i, (a, b) in enumerate(zip(after, before)):
            assert_same_objects(a, b, f"{what}[{i}]")
    elif isinstance(before, torch.Tensor):
        assert after is before, f"{what}: tensor replaced"
    else:
        assert after == before, f"{what}: {before!r} became {after!r}"


def state_tensors(diffopt):
    """Every tensor in a differentiable optimizer's state."""
    return [
        v
        for states in diffopt.state
        for s in states.values()
        for v in s.values()
        if torch.is_tensor(v)
    ]


# ---------------------------------------------------------------------------------------------
# Everything reachable from a module (issue 19): attributes, hooks, containers and their keys,
# closures, partials, plain objects, weakrefs, generators, tensors; by identity and value.
# ---------------------------------------------------------------------------------------------

_DEEP_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _deep_children_and_print(obj: Any) -> tuple:
    """What ``obj`` references, and what must stay equal about it (ids of its parts, values)."""
    if isinstance(obj, torch.Tensor):
        return [], (obj.detach().clone(), obj.requires_grad, obj.shape)
    if isinstance(obj, torch.Generator):
        return [], obj.get_state()
    if isinstance(obj, types.FunctionType):
        # Code, not the module's state: what its closure holds is the program's (a hook's
        # list of activations, a counter), and the patch shares it by design.
        return [], None
    if isinstance(obj, types.MethodType):
        return [obj.__self__], (id(obj.__self__), id(obj.__func__))
    if isinstance(obj, weakref.ref):
        referent = obj()
        return ([] if referent is None else [referent]), id(referent)
    if isinstance(obj, dict):
        items = list(obj.items())
        return [x for kv in items for x in kv], tuple((id(k), id(v)) for k, v in items)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
        state = dict(vars(obj))
        parts = list(state.values())
        extra = gc.get_referents(obj)
        return parts + [e for e in extra if e is not state], {k: id(v) for k, v in state.items()}
    referents = [r for r in gc.get_referents(obj) if not isinstance(r, (type, types.ModuleType))]
    return referents, tuple(id(r) for r in referents)


def snapshot_deep(module: nn.Module) -> dict:
    """``id -> (object, print)`` of the module's state: everything reachable from ``module``
    through containers, objects, bound methods and weakrefs (not inside functions, classes or
    Python modules); the functions themselves by identity."""
    seen: dict = {}
    stack: list = [module]
    while stack:
        obj = stack.pop()
        if isinstance(obj, _DEEP_ATOMS) or isinstance(obj, (type, types.ModuleType)):
            continue
        if isinstance(obj, types.CodeType) or id(obj) in seen:
            continue
        children, printed = _deep_children_and_print(obj)
        seen[id(obj)] = (obj, printed)
        stack.extend(children)
    return seen


def _same_print(now: Any, then: Any) -> bool:
    if isinstance(then, tuple) and then and isinstance(then[0], torch.Tensor):
        return (
            now[1:] == then[1:] and now[0].dtype == then[0].dtype and torch.equal(now[0], then[0])
        )
    if isinstance(then, torch.Tensor):
        return torch.equal(now, then)
    return now == then


def assert_deep_unchanged(module: nn.Module, before: dict) -> None:
    """Assert nothing reachable from ``module`` was added, replaced, removed or changed."""
    after = snapshot_deep(module)
    added = [type(after[k][0]).__name__ for k in after.keys() - before.keys()]
    assert not added, f"objects newly reachable from the module: {added}"
    for key, (obj, printed) in before.items():
        assert key in after, f"a {type(obj).__name__} is no longer reachable from the module"
        assert _same_print(after[key][1], printed), f"a {type(obj).__name__} changed: {obj!r:.80}"


def oracle_check(model: nn.Module, x: torch.Tensor, lr: float = 0.1, steps: int = 2) -> None:
    """Two inner SGD steps and a second-order meta-gradient through a patched ``model``,
    against ``torch.func.functional_call`` on ``model`` itself; ``model`` must be unchanged by
    the patched run (checked before the oracle runs, which may change it)."""
    import higher_func

    before = snapshot_deep(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            out = fmodel(x)
            outs.append(out)
            diffopt.step(scalar_loss(out))
        outs.append(fmodel(x))
        meta = torch.autograd.grad(scalar_loss(outs[-1]), list(model.parameters()))
    assert_deep_unchanged(model, before)

    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    expected = []
    for _ in range(steps):
        out = torch.func.functional_call(model, params, (x,))
        expected.append(out)
        grads = torch.autograd.grad(scalar_loss(out), list(params.values()), create_graph=True)
        params = {n: params[n] - lr * g for n, g in zip(names, grads)}
    expected.append(torch.func.functional_call(model, params, (x,)))
    expected_meta = torch.autograd.grad(scalar_loss(expected[-1]), list(model.parameters()))
    for mine, theirs in zip(outs, expected):
        assert_trees_close(mine, theirs)
    for mine, theirs in zip(meta, expected_meta):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-8)
