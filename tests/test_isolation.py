"""A patched module never writes into the user's module, and behaves like the module it patches.

Each case is checked against higher 0.2.1 where higher runs it, and otherwise against a plain
module that holds the fast weights as its parameters (``with_params``). The user's module is
checked by ``assert_module_unchanged``: same attributes, slots and tensors (by identity), same
values, before, during and after, also when a forward raises.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings

import higher
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint
from zoo import assert_module_unchanged, snapshot, with_params

import higher_func
from higher_func import patch as hf_patch

LIBRARIES = {"higher": higher, "higher_func": higher_func}


def _fast(fmodel, seed):
    generator = torch.Generator().manual_seed(seed)
    new = [p + 0.1 * torch.randn(p.shape, generator=generator) for p in fmodel.parameters()]
    fmodel.update_params(new)
    return new


def _plain(model, params):
    """A plain module holding ``params`` (``model.parameters()`` order) as its parameters."""
    return with_params(model, [p.detach() for p in params])


# ---------------------------------------------------------------------------------------------
# Threads: plain calls of the model, inner loops on it (batched or not) and on a model sharing
# its encoder, all at once.
# ---------------------------------------------------------------------------------------------


def test_threads_never_see_each_others_fast_weights(fast_thread_switching):
    torch.manual_seed(0)
    encoder = nn.Linear(3, 4)
    model = nn.Sequential(encoder, nn.Tanh(), nn.Linear(4, 1))
    sibling = nn.Sequential(encoder, nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    expected = {id(m): m(x).detach() for m in (model, sibling)}
    before = {id(m): snapshot(m) for m in (model, sibling)}
    errors, wrong = [], []
    done = threading.Event()

    def hammer(m):
        while not done.is_set():
            if not torch.equal(m(x).detach(), expected[id(m)]):
                wrong.append(id(m))
            assert_module_unchanged(m, before[id(m)], meta_gradients=True)

    def inner_loop(m, num_tasks):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        inputs = x if num_tasks is None else x.expand(num_tasks, *x.shape)
        for _ in range(15):
            with higher_func.innerloop_ctx(
                m, opt, copy_initial_weights=False, num_tasks=num_tasks
            ) as (fmodel, diffopt):
                for _ in range(3):
                    losses = fmodel(inputs).pow(2).flatten(1 if num_tasks else 0).mean(-1)
                    diffopt.step(losses)
                fmodel(inputs).sum().backward()

    def guarded(fn, *args):
        try:
            fn(*args)
        except BaseException as error:  # noqa: B036 - reported in the main thread
            errors.append(error)

    hammers = [threading.Thread(target=guarded, args=(hammer, m)) for m in (model, sibling)]
    loops = [
        threading.Thread(target=guarded, args=(inner_loop, m, n))
        for m, n in ((model, None), (model, 3), (sibling, None), (sibling, 2))
    ]
    for thread in hammers + loops:
        thread.start()
    for thread in loops:
        thread.join()
    done.set()
    for thread in hammers:
        thread.join()
    assert not errors, errors
    assert not wrong, f"{len(wrong)} plain calls computed with another thread's weights"
    for m in (model, sibling):
        m.zero_grad(set_to_none=True)  # the meta-gradients are the loops' only trace
        assert_module_unchanged(m, before[id(m)])


def test_innerloop_ctx_starts_from_the_models_own_weights_while_another_loop_runs():
    model = nn.Linear(3, 2)
    own = [p.detach().clone() for p in model.parameters()]
    busy = higher_func.monkeypatch(model)
    _fast(busy, seed=1)
    with higher_func.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (f, _):
        for got, expected in zip(f.parameters(), own):
            assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# Item 2: in-place writes to fast weights in forward (weight clipping).
# ---------------------------------------------------------------------------------------------


class Clipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.fc.weight.clamp_(-0.2, 0.2)
        return self.fc(x)


@pytest.mark.parametrize("num_tasks", [None, 3])
def test_in_place_writes_in_forward_never_reach_the_model_or_other_tasks(num_tasks):
    model = Clipped()
    with torch.no_grad():
        model.fc.weight.mul_(10)
    before = snapshot(model)
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False, num_tasks=num_tasks)
    lead = () if num_tasks is None else (num_tasks,)
    x = torch.randn(*lead, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap: no batching rule for clamp_
        out = fmodel(x)
    assert_module_unchanged(model, before)
    expected = nn.functional.linear(x, model.fc.weight.clamp(-0.2, 0.2), model.fc.bias)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------
# Item 3: what a forward leaves on its module lands on the patch's copy.
# ---------------------------------------------------------------------------------------------


class LeavesState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("cache", None)
        self.head.register_forward_hook(self._capture)

    @staticmethod
    def _capture(module, args, output):
        module.captured = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        self.last = h
        self.cache = h.detach().mean(dim=-2)
        return self.head(h)


def _old_weight_norm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm
        return nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh())


def test_state_set_in_forward_lands_on_the_patch_not_the_model():
    model = LeavesState()
    before = snapshot(model)
    fmodel = higher_func.monkeypatch(model)
    params = _fast(fmodel, seed=2)
    x = torch.randn(5, 3)
    out = fmodel(x)
    assert_module_unchanged(model, before)
    assert model.cache is None and "last" not in model.__dict__
    plain = _plain(model, params)
    torch.testing.assert_close(out, plain(x))
    torch.testing.assert_close(fmodel.last, plain.last)
    torch.testing.assert_close(fmodel.cache, plain.cache)
    torch.testing.assert_close(fmodel.head.captured, plain.head.captured)
    assert "cache" in dict(fmodel.named_buffers())
    model.state_dict()  # the model's own state is whole and usable


def test_state_set_in_forward_is_stacked_per_task():
    model = LeavesState()
    before = snapshot(model)
    fmodel = higher_func.monkeypatch(model, num_tasks=3)
    xs = torch.randn(3, 5, 3)
    out = fmodel(xs)
    assert_module_unchanged(model, before)
    model.state_dict()  # no escaped vmap tensor anywhere in the model
    for t in range(3):
        plain = _plain(model, [p[t] for p in fmodel.parameters()])
        torch.testing.assert_close(out[t], plain(xs[t]))
        torch.testing.assert_close(fmodel.last[t], plain.last)
        torch.testing.assert_close(fmodel.cache[t], plain.cache)
        torch.testing.assert_close(fmodel.head.captured[t], plain.head.captured)
    torch.testing.assert_close(fmodel.state_dict(task=1)["cache"], fmodel.cache[1])


@pytest.mark.parametrize("num_tasks", [None, 2])
def test_old_style_weight_norm_computes_on_the_copy(num_tasks):
    model = _old_weight_norm()
    model(torch.randn(1, 3))  # the hook has set model[0].weight once
    before = snapshot(model)
    fmodel = higher_func.monkeypatch(model, num_tasks=num_tasks)
    new = [2 * p for p in fmodel.parameters()]
    fmodel.update_params(new)
    lead = () if num_tasks is None else (num_tasks,)
    x = torch.randn(*lead, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap: no batching rule for _weight_norm
        out = fmodel(x)
    assert_module_unchanged(model, before)
    plain = _old_weight_norm()  # deepcopy refuses old-style weight norm: build a twin
    with torch.no_grad():
        for p, q in zip(plain.parameters(), new):
            p.copy_(q if num_tasks is None else q[0])
    first = (lambda t: t) if num_tasks is None else (lambda t: t[0])
    torch.testing.assert_close(first(out), plain(first(x)))


# ---------------------------------------------------------------------------------------------
# Items 4-9, 12, against higher.
# ---------------------------------------------------------------------------------------------


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pl = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(2)])
        self.pd = nn.ParameterDict({"a": nn.Parameter(torch.randn(3))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pl[0] + self.pl[1] + self.pd["a"]


def test_parameter_list_and_dict_read_the_fast_weights():
    model = Containers()
    fmodel = higher_func.monkeypatch(model)
    a, b, c = _fast(fmodel, seed=3)
    assert fmodel.pl[0] is a and fmodel.pl[1] is b
    assert [t for t in fmodel.pl] == [a, b] and list(fmodel.pd.values()) == [c]
    assert fmodel.pd["a"] is c and dict(fmodel.pd.items()) == {"a": c}
    x = torch.randn(4, 3)
    oracle = higher.monkeypatch(model)
    oracle.update_params([a, b, c])
    torch.testing.assert_close(fmodel(x), oracle(x))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.decoder = nn.Linear(3, 3)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.encoder(x)))


def test_tied_weights_read_through_either_name():
    model = Tied()
    fmodel = higher_func.monkeypatch(model)
    weight, *_ = _fast(fmodel, seed=4)
    assert fmodel.encoder.weight is weight and fmodel.decoder.weight is weight
    assert dict(fmodel.decoder.named_parameters())["weight"] is weight
    assert fmodel.get_parameter("decoder.weight") is weight
    x = torch.randn(2, 3)
    oracle = higher.monkeypatch(model)
    oracle.update_params(list(fmodel.parameters()))
    torch.testing.assert_close(fmodel(x), oracle(x))
    torch.testing.assert_close(fmodel.decoder(x), oracle.decoder(x))
    # Replacing a fast weight goes through update_params (or the patched module itself); a
    # plain tensor assigned to a submodule's parameter name is refused by torch, not dropped.
    with pytest.raises(TypeError, match="parameter 'weight'"):
        fmodel.decoder.weight = torch.zeros(3, 3)


class Tempered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) / self.temperature


@pytest.mark.parametrize("name", ["higher", "higher_func"])
def test_attributes_assigned_on_the_patched_module_reach_its_forward(name):
    model = Tempered()
    before = snapshot(model)
    fmodel = LIBRARIES[name].monkeypatch(model)
    x = torch.randn(5, 3)
    cold = fmodel(x)
    fmodel.temperature = 100.0
    torch.testing.assert_close(fmodel(x), cold / 100.0 * 1.0, rtol=1e-4, atol=1e-5)
    stats = torch.full((4,), 3.0)
    fmodel.body[1].running_mean = stats
    fmodel.eval()
    assert torch.equal(fmodel.body[1].running_mean, stats)
    if name == "higher_func":
        assert_module_unchanged(model, before)
        assert model.temperature == 1.0
        assert torch.equal(dict(fmodel.named_buffers())["body.1.running_mean"], stats)
        assert torch.equal(fmodel.state_dict()["body.1.running_mean"], stats)


class FrozenNorm(nn.Module):
    """The "keep BatchNorm frozen" pattern: train() leaves the norm layers in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 2)

    def train(self, mode: bool = True):
        super().train(mode)
        self.norm.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


@pytest.mark.parametrize("num_tasks", [None, 2])
def test_train_overrides_of_the_model_run(num_tasks):
    model = FrozenNorm()
    before = snapshot(model)
    fmodel = higher_func.monkeypatch(model, num_tasks=num_tasks)
    fmodel.eval()
    fmodel.train()
    assert fmodel.training and fmodel.fc.training and not fmodel.norm.training
    assert_module_unchanged(model, before)
    oracle = higher.monkeypatch(model)
    oracle.eval()
    oracle.train()
    assert [m.training for m in oracle.modules()][1:] == [
        m.training for m in list(fmodel.modules())[1:]
    ]


class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def features(self, x):
        x = self.a(x)
        yield x
        yield self.b(torch.tanh(x))

    def forward(self, x):
        return list(self.features(x))[-1]


def test_generator_methods_run_on_the_fast_weights():
    model = Features()
    fmodel = higher_func.monkeypatch(model)
    _fast(fmodel, seed=5)
    x = torch.randn(2, 3)
    oracle = higher.monkeypatch(model)
    oracle.update_params(list(fmodel.parameters()))
    got, expected = list(fmodel.features(x)), list(oracle.features(x))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    with pytest.raises(TypeError, match="generator"):
        higher_func.monkeypatch(model, num_tasks=2).features(torch.randn(2, 2, 3))


@pytest.mark.parametrize("num_tasks", [None, 2])
def test_modules_are_instances_of_their_class(num_tasks):
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.2)))
    before = snapshot(model)
    fmodel = higher_func.monkeypatch(model, num_tasks=num_tasks)
    for m in fmodel.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    assert [isinstance(m, nn.Dropout) for m in fmodel.modules()] == [
        False,
        False,
        True,
        False,
        True,
    ]
    assert not fmodel[1].training and not fmodel[2][0].training and fmodel[0].training
    assert_module_unchanged(model, before)
    lead = () if num_tasks is None else (num_tasks,)
    x = torch.randn(*lead, 4, 3)
    torch.testing.assert_close(fmodel(x), fmodel[0](x))  # the dropouts are off


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.Linear(3, 5)

    def forward(self, x):
        return self.stack(x)


def test_a_submodule_named_like_a_library_helper_is_the_submodule():
    fmodel = higher_func.monkeypatch(Stack())
    assert fmodel.stack(torch.randn(2, 3)).shape == (2, 5)


# nn.Module's read-only API on the fast weights, refused by the lending design.
def test_module_api_reads_the_fast_weights():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fmodel = higher_func.monkeypatch(model)
    weight, *_ = _fast(fmodel, seed=6)
    assert fmodel.get_submodule("0") is fmodel[0]
    assert fmodel.get_parameter("0.weight") is weight
    assert fmodel.get_buffer("1.running_mean") is fmodel[1].running_mean
    assert fmodel[1].running_mean is not model[1].running_mean
    assert fmodel._get_name() == "Sequential"
    seen = []
    fmodel.register_forward_hook(lambda m, args, out: seen.append(out))
    fmodel(torch.randn(5, 3))
    assert len(seen) == 1 and not model._forward_hooks


def test_the_proxy_adds_only_highers_and_nn_modules_names():
    fmodel = higher_func.monkeypatch(nn.Linear(2, 2))
    public = {n for n in dir(type(fmodel)) if not n.startswith("_")}
    higher_api = {"fast_params", "init_fast_params", "update_params", "track_higher_grads"}
    module_api = set(dir(nn.Module)) | set(vars(nn.Module()))  # methods, and `training`
    assert public <= higher_api | module_api | {"num_tasks"}, public - module_api


# ---------------------------------------------------------------------------------------------
# Item 11: checkpointing inside a patched forward.
# ---------------------------------------------------------------------------------------------


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        return self.b(checkpoint(self.a, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_inside_a_patched_forward_is_a_clear_error(use_reentrant):
    model = Checkpointed(use_reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reentrant: no input requires grad
            with pytest.raises(RuntimeError, match="checkpoint"):
                diffopt.step(fmodel(torch.randn(4, 3)).pow(2).mean())
    assert not model.a._forward_pre_hooks  # the guard lives on the patch's copies only


def test_models_without_checkpointing_pay_nothing_for_the_guard():
    fmodel = higher_func.monkeypatch(nn.Sequential(nn.Linear(3, 3)))
    assert not fmodel[0]._forward_pre_hooks


def test_patched_module_is_an_instance_of_the_class_without_subclassing_it():
    model = nn.Linear(2, 2)
    fmodel = higher_func.monkeypatch(model)
    assert isinstance(fmodel, hf_patch._MonkeyPatchBase)
    assert isinstance(fmodel, nn.Linear)  # isinstance reads __class__, as with higher
    assert type(fmodel) is hf_patch._MonkeyPatchBase and type(model) is nn.Linear


# ---------------------------------------------------------------------------------------------
# Property: over random architectures, the patched module computes what a plain module holding
# the fast weights computes, and leaves the model as it was.
# ---------------------------------------------------------------------------------------------

_LAYERS = {
    "linear": lambda width: nn.Linear(width, width),
    "tanh": lambda width: nn.Tanh(),
    "layernorm": lambda width: nn.LayerNorm(width),
    "batchnorm": lambda width: nn.BatchNorm1d(width),
    "tied_pair": lambda width: _tied_pair(width),
    "dropout_eval": lambda width: nn.Dropout(0.3).eval(),
}


def _tied_pair(width):
    first, second = nn.Linear(width, width), nn.Linear(width, width)
    second.weight = first.weight
    return nn.Sequential(first, nn.Tanh(), second)


@settings(max_examples=25, deadline=None)
@given(
    layers=st.lists(st.sampled_from(sorted(_LAYERS)), min_size=1, max_size=5),
    width=st.integers(1, 4),
    num_tasks=st.sampled_from([None, 2]),
    seed=st.integers(0, 2**16),
)
def test_random_architectures_compute_like_a_plain_module(layers, width, num_tasks, seed):
    torch.manual_seed(seed)
    # float64: stacked normalisations of 3 samples of width 2 amplify float32's different
    # rounding of vmapped and plain batch_norm to 1e-4 (seed 0 of two BatchNorm1d(2)).
    model = nn.Sequential(*(_LAYERS[name](width) for name in layers), nn.Linear(width, 2))
    model = model.double()
    before = snapshot(model)
    fmodel = higher_func.monkeypatch(model, num_tasks=num_tasks)
    new = [p + 0.3 * torch.randn_like(p) for p in fmodel.parameters()]
    fmodel.update_params(new)
    lead = () if num_tasks is None else (num_tasks,)
    x = torch.randn(*lead, 3, width, dtype=torch.float64)
    out = fmodel(x)
    assert_module_unchanged(model, before)
    for t in range(num_tasks or 1):

        def task(v, t=t):
            return v if num_tasks is None else v[t]

        plain = _plain(model, [task(p) for p in new])
        torch.testing.assert_close(task(out), plain(task(x)))
        for mine, theirs in zip(fmodel.buffers(), plain.buffers()):
            torch.testing.assert_close(task(mine), theirs)


# ---------------------------------------------------------------------------------------------
# What a shallow copy would otherwise still share with the user's module.
# ---------------------------------------------------------------------------------------------


class Indirect(nn.Module):
    """Reaches its submodules and state in ways nn.Module's own dictionaries do not record."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)
        self.order = [self.a, nn.Tanh(), self.b]  # a plain list of submodules
        self.first = self.a.forward  # a bound method kept as an attribute
        self.log: list = []
        self.stats = {"calls": 0}
        self.mask = torch.ones(3)  # a plain tensor attribute, updated in place
        self.b.register_forward_hook(self._capture)  # a hook that is a bound method
        self._init_handle = self.register_forward_pre_hook(Indirect._initialize)

    def _capture(self, module, args, output):
        self.captured = output

    @staticmethod
    def _initialize(module, args):
        module.initialized = True
        module._init_handle.remove()  # ActNorm-style: runs once, then removes itself

    def forward(self, x):
        self.log.append(1)
        self.stats["calls"] += 1
        self.mask.mul_(0.5)
        x = self.first(x) * self.mask * 2
        for layer in self.order[1:]:
            x = layer(x)
        return x


def test_indirect_references_reach_the_patch_not_the_model():
    torch.manual_seed(0)
    model = Indirect()
    if hasattr(model.a, "compile"):  # nn.Module.compile: torch >= 2.2
        model.a.compile(backend="eager")  # a compiled call bound to the original
    before = snapshot(model)
    log, stats, mask = list(model.log), dict(model.stats), model.mask.clone()
    fmodel = higher_func.monkeypatch(model)
    new = _fast(fmodel, seed=7)
    x = torch.randn(4, 3)
    plain = Indirect()
    with torch.no_grad():
        for p, q in zip(plain.parameters(), new):
            p.copy_(q)
    for _ in range(2):
        torch.testing.assert_close(fmodel(x), plain(x))
    assert_module_unchanged(model, before)
    assert model.log == log and model.stats == stats and torch.equal(model.mask, mask)
    assert len(model._forward_pre_hooks) == 1 and "initialized" not in model.__dict__
    assert fmodel.initialized and fmodel.stats["calls"] == 2 and len(fmodel.log) == 2
    torch.testing.assert_close(fmodel.captured, plain.captured)


def test_assigning_a_module_to_a_patched_module_is_refused():
    model = nn.Sequential(nn.Linear(3, 3))
    fmodel = higher_func.monkeypatch(model)
    with pytest.raises(TypeError, match="would not be fast weights"):
        fmodel.head = nn.Linear(3, 2)
    batched = higher_func.monkeypatch(nn.Sequential(nn.Sequential(nn.Linear(3, 3))), num_tasks=2)
    with pytest.raises(TypeError, match="would not be fast weights"):
        batched[0].head = nn.Linear(3, 2)


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.type = "regression"  # shadows nn.Module.type, as the module means it to

    def forward(self, x):
        return self.fc(x)


def test_module_attributes_named_like_module_methods_read_as_the_module_has_them():
    fmodel = higher_func.monkeypatch(Named())
    assert fmodel.type == "regression"
    with pytest.raises(AttributeError, match="no double"):
        fmodel.double()


def test_make_functional_submodules_never_touch_the_models_weights():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.1))
    before = snapshot(model)
    fmodel = hf_patch.make_functional(model)
    assert fmodel[0].weight is not model[0].weight
    fmodel[0](torch.arange(10))  # renormalises its weight rows in place
    assert_module_unchanged(model, before)
    with pytest.raises(ValueError, match="no fast weights"):
        fmodel(torch.arange(3))


def test_converting_the_model_after_patching_gives_an_accurate_error():
    model = nn.Linear(2, 2)
    fmodel = higher_func.monkeypatch(model)
    model.double()
    with pytest.raises(TypeError, match="when the module was patched"):
        fmodel.update_params([p.double() for p in fmodel.parameters()])


def test_named_parameters_without_removing_duplicates_names_tied_weights_twice():
    fmodel = higher_func.monkeypatch(Tied())
    names = [n for n, _ in fmodel.named_parameters(remove_duplicate=False)]
    assert names == [n for n, _ in Tied().named_parameters(remove_duplicate=False)]
    assert (
        dict(fmodel.named_parameters(remove_duplicate=False))["decoder.weight"]
        is (fmodel.fast_params[0])
    )


class Slotted(nn.Module):
    __slots__ = ("scale",)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.scale = 3.0

    def forward(self, x):
        return self.fc(x) * self.scale


def test_modules_that_cannot_be_copied_or_have_slots():
    torch.manual_seed(0)
    model = Slotted()
    x = torch.ones(1, 2)
    torch.testing.assert_close(higher_func.monkeypatch(model)(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
        scripted = nn.Sequential(torch.jit.script(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="TorchScript"):
        higher_func.monkeypatch(scripted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lazy modules are experimental
        lazy = nn.Sequential(nn.LazyLinear(2))
    with pytest.raises(TypeError, match="lazy"):
        higher_func.monkeypatch(lazy)


class WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def get_extra_state(self):
        return torch.arange(4.0)

    def set_extra_state(self, state):
        pass

    def forward(self, x):
        return self.fc(x)


def test_extra_state_is_exported_whole_for_each_task():
    fmodel = higher_func.monkeypatch(WithExtraState(), num_tasks=2)
    assert torch.equal(fmodel.state_dict(task=1)["_extra_state"], torch.arange(4.0))


# ---------------------------------------------------------------------------------------------
# Batched: what a forward keeps between calls, and how submodules are handed out.
# ---------------------------------------------------------------------------------------------


class Recurrent(nn.Module):
    """Reads, on each call, what it left on itself the call before."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        y = self.fc(x)
        if hasattr(self, "prev"):
            y = y + self.prev.mean(0)
        self.prev = y.detach()
        return y

    @functools.cached_property
    def weight_norm(self):
        return self.fc.weight.norm()

    @property
    def layer(self):
        return self.fc


@pytest.mark.parametrize("loop", [False, True], ids=["vmap", "loop"])
def test_state_a_forward_keeps_between_calls_is_per_task(loop):
    torch.manual_seed(0)
    model = Recurrent()
    if loop:
        model.rnn = nn.RNN(3, 3)  # no batching rule: the tasks run in a loop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", higher_func.BatchingFallbackWarning)
        batched = higher_func.monkeypatch(model, num_tasks=3)
    new = [p + 0.1 * torch.randn_like(p) for p in batched.parameters()]
    batched.update_params(new)
    singles = [higher_func.monkeypatch(model) for _ in range(3)]
    for t, single in enumerate(singles):
        single.update_params([p[t] for p in new])
    for _ in range(3):
        xs = torch.randn(3, 5, 3)
        out = batched(xs)
        for t, single in enumerate(singles):
            torch.testing.assert_close(out[t], single(xs[t]))
    assert batched.prev.shape == (3, 5, 3) and "prev" not in model.__dict__


def test_batched_properties_and_module_methods_hand_out_per_task_views():
    torch.manual_seed(0)
    model = nn.Sequential(Recurrent(), nn.ModuleDict({"a": nn.Linear(3, 2)}))
    fmodel = higher_func.monkeypatch(model, num_tasks=2)
    new = [p + torch.randn_like(p) for p in fmodel.parameters()]
    fmodel.update_params(new)
    norms = fmodel[0].weight_norm
    assert norms.shape == (2,)
    torch.testing.assert_close(norms, torch.stack([w.norm() for w in new[0]]))
    xs = torch.randn(2, 4, 3)
    for head in (*fmodel[1].values(), fmodel.get_submodule("1.a"), dict(fmodel[1].items())["a"]):
        assert isinstance(head, nn.Linear)
        torch.testing.assert_close(head(xs), torch.baddbmm(new[3][:, None], xs, new[2].mT))
    assert fmodel[0].layer(xs).shape == (2, 4, 3)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor


class ReturnsDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return Output(self.fc(x))


def test_batched_outputs_torch_cannot_split_are_a_clear_error():
    fmodel = higher_func.monkeypatch(ReturnsDataclass(), num_tasks=2)
    with pytest.raises(TypeError, match="Output holding tensors"):
        fmodel(torch.randn(2, 4, 3))


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, fail=False):
        self.feat = self.fc(x)
        if fail:
            raise ValueError("bad batch")
        return self.feat


def test_a_batched_forward_that_raises_leaves_nothing_behind():
    fmodel = higher_func.monkeypatch(Raises(), num_tasks=2)
    with pytest.raises(ValueError, match="bad batch"):
        fmodel(torch.randn(2, 4, 3), fail=True)
    assert "feat" not in fmodel._hf_tree.root.__dict__
    assert fmodel(torch.randn(2, 4, 3)).sum().isfinite()


class Wrapper(nn.Module):
    """Keeps its inner model as ``_module`` and other private names, as wrappers do."""

    def __init__(self) -> None:
        super().__init__()
        self._module = nn.Linear(3, 2)
        self._device = "cpu:fancy"
        self._index = 7

    def forward(self, x):
        return self._module(x)


def test_the_patch_keeps_out_of_the_modules_private_names():
    fmodel = higher_func.monkeypatch(Wrapper())
    _fast(fmodel, seed=9)
    x = torch.randn(2, 3)
    assert isinstance(fmodel._module, nn.Linear)
    torch.testing.assert_close(fmodel._module(x), fmodel(x))
    assert fmodel._device == "cpu:fancy" and fmodel._index == 7
