"""Property tests: random small architectures, random weights and inputs, against two oracles.

For any architecture drawn (linear or convolutional, 1-3 layers of width 1-8, an activation,
BatchNorm on or off, bias on or off, a pair of layers with tied weights or not), a module
patched by ``higher_func`` must compute what ``higher`` computes and what the plain module
computes with the same weights, in value and in gradient.
"""

import copy
import dataclasses

import higher
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import assert_trees_close, perturbed_params, scalar_loss, trainable, with_params

import higher_func.patch as hf_patch

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
SETTINGS = settings(max_examples=25, deadline=None)


@dataclasses.dataclass(frozen=True)
class Architecture:
    conv: bool
    widths: tuple
    activation: str
    batchnorm: bool
    tied: bool
    bias: bool
    batch: int
    seed: int


@st.composite
def architectures(draw):
    depth = draw(st.integers(1, 3))
    return Architecture(
        conv=draw(st.booleans()),
        widths=tuple(draw(st.lists(st.integers(1, 8), min_size=depth + 1, max_size=depth + 1))),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        batchnorm=draw(st.booleans()),
        tied=draw(st.booleans()),
        bias=draw(st.booleans()),
        batch=draw(st.integers(2, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _layer(arch, fan_in, fan_out):
    if arch.conv:
        return nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=arch.bias)
    return nn.Linear(fan_in, fan_out, bias=arch.bias)


def _block(arch, layer, width):
    block = [layer]
    if arch.batchnorm:
        block.append(nn.BatchNorm2d(width) if arch.conv else nn.BatchNorm1d(width))
    block.append(ACTIVATIONS[arch.activation]())
    return block


def build(arch):
    """A fresh float64 model for ``arch`` and an input batch, identical for identical ``arch``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(arch.seed)
        layers = []
        for fan_in, fan_out in zip(arch.widths, arch.widths[1:]):
            layers += _block(arch, _layer(arch, fan_in, fan_out), fan_out)
        last = arch.widths[-1]
        if arch.tied:
            first, second = _layer(arch, last, last), _layer(arch, last, last)
            second.weight = first.weight
            layers += _block(arch, first, last) + _block(arch, second, last)
        if arch.conv:
            layers += [nn.Flatten(), nn.Linear(last * 3 * 3, 2)]
            x = torch.randn(arch.batch, arch.widths[0], 3, 3)
        else:
            layers.append(nn.Linear(last, 2))
            x = torch.randn(arch.batch, arch.widths[0])
        model = nn.Sequential(*layers).double()
        if arch.batchnorm:
            with torch.no_grad():
                model(x.double() + 1.0)  # running statistics away from their defaults
    return model, x.double()


def _count_tied(model):
    every = [p for m in model.modules() for p in m.parameters(recurse=False)]
    return len(every) - len(list(model.parameters()))


@SETTINGS
@given(arch=architectures(), scale=st.floats(0.01, 1.0), eval_mode=st.booleans())
def test_forward_matches_higher_and_plain_module(arch, scale, eval_mode):
    model, x = build(arch)
    oracle_model, _ = build(arch)
    assert _count_tied(model) == (1 if arch.tied else 0)
    params = perturbed_params(model, seed=arch.seed % 1000, scale=scale)
    plain = with_params(model, params)

    fmodel = hf_patch.monkeypatch(model)
    hmodel = higher.monkeypatch(oracle_model)
    if eval_mode:
        for m in (fmodel, hmodel, plain):
            m.eval()

    out = fmodel(x, params=params)
    assert_trees_close(out, hmodel(x, params=[p.detach().clone() for p in params]))
    assert_trees_close(out, plain(x))
    assert_trees_close(fmodel(x), out)  # the params passed are now the fast weights


@SETTINGS
@given(arch=architectures(), copy_initial_weights=st.booleans())
def test_gradients_match_higher_and_plain_module(arch, copy_initial_weights):
    model, x = build(arch)
    oracle_model, _ = build(arch)
    plain = copy.deepcopy(model)
    fmodel = hf_patch.monkeypatch(model, copy_initial_weights=copy_initial_weights)
    hmodel = higher.monkeypatch(oracle_model, copy_initial_weights=copy_initial_weights)

    # With copied initial weights the gradient is taken w.r.t. the fast weights; otherwise
    # w.r.t. the module's own parameters, through the patched module.
    if copy_initial_weights:
        wrt, wrt_h = trainable(list(fmodel.fast_params)), trainable(list(hmodel.fast_params))
    else:
        wrt, wrt_h = trainable(list(model.parameters())), trainable(list(oracle_model.parameters()))
    grads = torch.autograd.grad(scalar_loss(fmodel(x)), wrt)
    grads_h = torch.autograd.grad(scalar_loss(hmodel(x)), wrt_h)
    grads_plain = torch.autograd.grad(scalar_loss(plain(x)), trainable(list(plain.parameters())))
    assert_trees_close(grads, grads_h)
    assert_trees_close(grads, grads_plain)


@SETTINGS
@given(arch=architectures())
def test_second_order_step_matches_higher(arch):
    model, x = build(arch)
    oracle_model, _ = build(arch)
    fmodel = hf_patch.monkeypatch(model, copy_initial_weights=False)
    hmodel = higher.monkeypatch(oracle_model, copy_initial_weights=False)

    def meta_grads(patched, module):
        params = list(patched.parameters())
        inner = scalar_loss(patched(x, params=params))
        grads = torch.autograd.grad(inner, params, create_graph=True)
        params = [p - 0.05 * g for p, g in zip(params, grads)]
        return torch.autograd.grad(
            scalar_loss(patched(x, params=params)), list(module.parameters())
        )

    assert_trees_close(meta_grads(fmodel, model), meta_grads(hmodel, oracle_model), atol=1e-9)


class _Holder(nn.Module):
    """A module with the patched module in a child slot (``self.body = fmodel``)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(2, 1).double()

    def forward(self, x):
        return self.head(self.body(x))


PLACEMENTS = {
    "slot": _Holder,
    "sequential": lambda f: nn.Sequential(f, nn.Linear(2, 1).double()),
    "twice": lambda f: nn.ModuleList([f, nn.Linear(2, 1).double(), f]),
    "dict": lambda f: nn.ModuleDict({"inner": f}),
}


def _parent_view(parent, x, placement):
    """What a module holding the patched module shows: its output, structure and state."""
    out = parent(x) if placement in ("slot", "sequential") else next(parent.children())(x)
    kinds = [tuple(isinstance(m, c) for c in (nn.Linear, nn.Sequential)) for m in parent.modules()]
    names = [n for n, _ in parent.named_parameters()]
    return out, kinds, names, parent.state_dict(), list(parent.parameters())


@SETTINGS
@given(arch=architectures(), placement=st.sampled_from(sorted(PLACEMENTS)))
def test_a_module_holding_the_patched_module_sees_what_it_sees_with_higher(arch, placement):
    # The class: any architecture, held by any kind of parent. The parent's own parts are
    # built from the same seed for both libraries.
    model, x = build(arch)
    oracle_model, _ = build(arch)
    views = []
    for lib, net in ((hf_patch, model), (higher, oracle_model)):
        fmodel = lib.monkeypatch(net, copy_initial_weights=False)
        assert isinstance(fmodel, nn.Module) and isinstance(fmodel, nn.Sequential)
        torch.manual_seed(arch.seed)
        views.append(_parent_view(PLACEMENTS[placement](fmodel), x, placement))
    ours, theirs = views
    assert_trees_close(ours[0], theirs[0])
    assert ours[1] == theirs[1] and ours[2] == theirs[2]
    assert list(ours[3]) == list(theirs[3])
    assert_trees_close(list(ours[3].values()), list(theirs[3].values()))
    assert_trees_close(ours[4], theirs[4])
