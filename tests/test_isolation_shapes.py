"""Hand-written probes of issue 19: every shape of reference from a module's attributes and
hooks to its submodules, parameters, buffers and mutable state, each against the oracle.

The oracle is ``torch.func.functional_call`` on the user's own module (one thread): it swaps
the module's tensors, so every path sees the fast weights. A patched module must compute the
same outputs and meta-gradients, and leave the user's module unchanged (``snapshot_deep``),
or refuse at patch time naming the attribute path.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import types
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from zoo import assert_deep_unchanged, oracle_check, snapshot_deep

import higher_func
from higher_func import _compat
from higher_func._graph import PatchRefused


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


Point = collections.namedtuple("Point", "layer scale")


@dataclasses.dataclass
class Holder:
    layer: nn.Module
    calls: int = 0


class Gain:
    """A callable object holding its module."""

    def __init__(self, module):
        self.module = module

    def __call__(self, module, args, output):
        return output * self.module.weight.sum()


def _closure_hook(m):
    m.b.register_forward_hook(lambda mod, i, o: o * m.a.weight.sum())
    return m


def _callable_hook(m):
    m.b.register_forward_hook(Gain(m.a))
    return m


def _partial(m):
    m.step = functools.partial(nn.Module.__call__, m.a)
    m.forward = types.MethodType(lambda self, x: self.b(torch.tanh(self.step(x))), m)
    return m


def _lambda_attribute(m):
    m.first = lambda x: m.a(x)
    m.forward = types.MethodType(lambda self, x: self.b(self.first(x)), m)
    return m


def _namedtuple(m):
    m.point = Point(m.a, 2.0)
    m.forward = types.MethodType(lambda self, x: self.b(self.point.layer(x) * self.point[1]), m)
    return m


def _dataclass(m):
    m.holder = Holder(m.a)

    def forward(self, x):
        self.holder.calls += 1
        return self.b(self.holder.layer(x))

    m.forward = types.MethodType(forward, m)
    return m


def _namespace(m):
    m.ns = types.SimpleNamespace(layer=m.a, seen=[])

    def forward(self, x):
        self.ns.seen.append(1)
        return self.b(self.ns.layer(x))

    m.forward = types.MethodType(forward, m)
    return m


def _keyed_by_module(m):
    m.scales = {m.a: 0.5, m.b: 2.0}

    def forward(self, x):
        return self.b(self.a(x) * self.scales[self.a]) * self.scales[self.b]

    m.forward = types.MethodType(forward, m)
    return m


def _weakref_parent(m):
    m.a.parent = weakref.ref(m)

    def hook(mod, args, out):
        return out + mod.parent().b.bias.sum()

    m.a.register_forward_hook(hook)
    return m


def _stateful(m):
    m.counts = collections.defaultdict(int)
    m.recent = collections.deque(maxlen=3)
    m.box = Holder(nn.Identity())
    m.gen = torch.Generator().manual_seed(3)

    def forward(self, x):
        self.counts["calls"] += 1
        self.recent.append(self.counts["calls"])
        self.box.calls += 1
        noise = torch.rand(x.shape, generator=self.gen)
        return self.b(self.a(x + 0.01 * noise))

    m.forward = types.MethodType(forward, m)
    return m


def _self_removing(m):
    handle = None

    def once(mod, args):
        mod.initialized = True
        handle.remove()

    handle = m.a.register_forward_pre_hook(once)
    return m


def _bound_impl(m):
    m.impl = m._impl = types.MethodType(lambda self, x: self.b(self.a(x)), m)
    m.forward = types.MethodType(lambda self, x: self.impl(x), m)
    return m


def _closure_counter(m):
    count = 0

    def hook(mod, args, out):
        nonlocal count
        count += 1
        return out * m.a.bias.sum()

    m.b.register_forward_hook(hook)
    return m


SHAPES = {
    "closure_hook": _closure_hook,
    "callable_hook": _callable_hook,
    "partial": _partial,
    "lambda_attribute": _lambda_attribute,
    "namedtuple": _namedtuple,
    "dataclass": _dataclass,
    "namespace": _namespace,
    "keyed_by_module": _keyed_by_module,
    "weakref_parent": _weakref_parent,
    "stateful": _stateful,
    "self_removing": _self_removing,
    "bound_impl": _bound_impl,
    "closure_counter": _closure_counter,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_reference_shape_computes_like_the_oracle(shape):
    torch.manual_seed(0)
    model = SHAPES[shape](Base()).double()
    oracle_check(model, torch.randn(4, 3, dtype=torch.float64))


def test_nested_shapes_compute_like_the_oracle():
    torch.manual_seed(0)
    model = Base().double()
    model.table = {"deep": [Point(Holder(model.a), functools.partial(torch.mul, 2.0))]}

    def forward(self, x):
        point = self.table["deep"][0]
        point.layer.calls += 1
        return self.b(point.scale(point.layer.layer(x)))

    model.forward = types.MethodType(forward, model)
    oracle_check(model, torch.randn(4, 3, dtype=torch.float64))


# -- what is the program's stays the program's ----------------------------------------------


def test_hooks_keep_writing_to_the_scripts_own_objects():
    # Feature extraction: a hook closing over a dict of the user's script, and a callable hook
    # object collecting outputs. Neither reaches the model, so both are shared, as in higher.
    model = Base()
    features = {}
    model.a.register_forward_hook(lambda m, i, o: features.__setitem__("a", o))

    class Collect:
        def __init__(self):
            self.outputs = []

        def __call__(self, module, args, output):
            self.outputs.append(output)

    collect = Collect()
    model.b.register_forward_hook(collect)
    fmodel = higher_func.monkeypatch(model)
    fmodel.update_params([p.detach().clone() for p in model.parameters()])
    fmodel(torch.randn(2, 3))
    assert "a" in features and len(collect.outputs) == 1


def test_the_modules_own_generator_is_copied_with_its_state():
    model = Base()
    model.gen = torch.Generator().manual_seed(5)
    state = model.gen.get_state()
    fmodel = higher_func.monkeypatch(model)
    assert fmodel.gen is not model.gen and torch.equal(fmodel.gen.get_state(), state)
    torch.rand(3, generator=fmodel.gen)
    assert torch.equal(model.gen.get_state(), state)


# -- tensors -----------------------------------------------------------------------------


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("state", torch.zeros(6))
        self.register_buffer("tail", self.state[3:])  # shares storage with state
        self.head = self.state[:3]  # a plain view of the buffer

    def forward(self, x):
        self.head.add_(1.0)
        return self.lin(x) + self.tail.sum() + self.state[:3]


def test_views_of_buffers_stay_views_of_the_patchs_buffer():
    model = Aliased()
    before = snapshot_deep(model)
    fmodel = higher_func.monkeypatch(model)
    fmodel.update_params([p.detach().clone() for p in model.parameters()])
    fmodel(torch.randn(2, 3))
    assert fmodel.state[:3].tolist() == [1.0, 1.0, 1.0]
    assert fmodel.head.data_ptr() == fmodel.state.data_ptr()
    assert fmodel.tail.data_ptr() == fmodel.state[3:].data_ptr()
    assert_deep_unchanged(model, before)


def test_a_large_table_no_forward_writes_is_not_copied():
    model = nn.Sequential(nn.Linear(2, 2))
    model.table = torch.zeros(1000)
    fmodel = higher_func.monkeypatch(model)
    assert fmodel.table is not model.table and torch.equal(fmodel.table, model.table)
    fmodel.table.add_(1)  # written: the patch's own memory, the model's unchanged
    assert model.table.sum() == 0 and fmodel.table.sum() == 1000


# -- refusals ----------------------------------------------------------------------------


def test_a_parameter_held_outside_its_module_is_refused_naming_the_path():
    model = Base()
    model.blocks = nn.ModuleList([nn.Linear(3, 3)])
    model.blocks[0].register_forward_hook(lambda m, i, o: o * model.a.weight.sum())
    model.weights = [model.a.weight]
    with pytest.raises(PatchRefused, match=r"model\.weights\[0\] is the parameter 'a\.weight'"):
        higher_func.monkeypatch(model)


def test_a_parameter_in_a_hooks_closure_is_refused_naming_the_path():
    model = Base()
    model.blocks = nn.ModuleList([nn.Linear(3, 3)])
    weight = model.a.weight
    model.blocks[0].register_forward_hook(lambda m, i, o: o * weight.sum())
    with pytest.raises(PatchRefused, match=r"model\.blocks\[0\]\._forward_hooks\[\d+\]"):
        higher_func.monkeypatch(model)


MODEL = Base()


def test_a_module_read_through_a_global_is_refused():
    MODEL.b.register_forward_hook(lambda m, i, o: o * MODEL.a.weight.sum())
    with pytest.raises(PatchRefused, match=r"__globals__\['MODEL'\]"):
        higher_func.monkeypatch(MODEL)


def test_an_object_that_cannot_be_copied_and_reaches_the_model_is_refused():
    model = Base()

    def layers():
        yield model.a

    model.pending = layers()
    next(model.pending)
    with pytest.raises(PatchRefused, match=r"model\.pending is a generator"):
        higher_func.monkeypatch(model)


def test_an_object_that_cannot_be_copied_and_reaches_nothing_is_shared():
    model = Base()
    model.lock = threading.Lock()
    assert higher_func.monkeypatch(model).lock is model.lock


def test_a_buffer_held_outside_its_module_is_refused_with_tasks():
    model = Aliased()
    model.state_view = [model.state]
    with pytest.raises(PatchRefused, match=r"model\.state_view\[0\] is the buffer 'state'"):
        higher_func.monkeypatch(model, num_tasks=2)


# -- checkpointing, however reached --------------------------------------------------------


def _helper(fn, x, reentrant):  # a helper whose name does not say "checkpoint"
    return checkpoint(fn, x, use_reentrant=reentrant)


class Helper(Base):
    reentrant = False

    def forward(self, x):
        return self.b(_helper(self.a, x, self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_through_a_helper_is_refused(reentrant):
    model = Helper()
    model.reentrant = reentrant
    fmodel = higher_func.monkeypatch(model)
    fmodel.update_params([p.detach().clone().requires_grad_() for p in fmodel.parameters()])
    x = torch.randn(2, 3, requires_grad=True)  # reentrant checkpointing needs an input that does
    with pytest.raises(RuntimeError, match="checkpoint around code reading the parameter"):
        fmodel(x)


def test_torchs_checkpoint_wrapper_is_refused():
    wrapper = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    wrapper.apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Linear))
    fmodel = higher_func.monkeypatch(model)
    fmodel.update_params([p.detach().clone().requires_grad_() for p in fmodel.parameters()])
    # torch 2.0's wrapper checkpoints reentrantly by default, which needs an input requiring
    # grad (else torch warns, an error under this suite's filterwarnings, before the forward).
    with pytest.raises(RuntimeError, match="checkpoint"):
        fmodel(torch.randn(2, 3, requires_grad=True))


def test_weights_passed_into_a_checkpoint_are_right():
    class Passed(Base):
        def forward(self, x):
            fn = torch.nn.functional.linear
            return self.b(checkpoint(fn, x, self.a.weight, self.a.bias, use_reentrant=False))

    torch.manual_seed(0)
    oracle_check(Passed().double(), torch.randn(4, 3, dtype=torch.float64))


# -- threads -------------------------------------------------------------------------------


def test_patching_while_another_thread_adds_attributes_never_crashes(fast_thread_switching):
    model = Base()
    for i in range(40):  # a longer __dict__ to copy: more chances to be interrupted in it
        setattr(model, f"config{i}", [i])
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            model.__dict__[f"extra{i % 50}"] = i
            model.__dict__.pop(f"extra{(i + 25) % 50}", None)
            model.a.__dict__[f"x{i % 7}"] = [i]
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(300):
            higher_func.monkeypatch(model)
    finally:
        stop.set()
        thread.join()


# -- compile ---------------------------------------------------------------------------------


@pytest.mark.skipif(
    not _compat.can_trace_autograd(),
    reason=f"higher_func.compile needs torch >= {_compat.MIN_TORCH}, this is {torch.__version__}",
)
def test_what_compile_cannot_rebuild_is_an_error_naming_the_attribute():
    torch.manual_seed(0)
    model = _bound_impl(Base())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @higher_func.compile(backend="eager")
    def meta_loss(x):
        with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fm, diffopt):
            diffopt.step(fm(x).pow(2).sum())
            return fm(x).pow(2).sum()

    with pytest.raises(PatchRefused, match=r"model\.impl \(method\)"):
        meta_loss(torch.randn(4, 3))
