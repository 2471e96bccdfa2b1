"""Idioms found in public programs written for higher 0.2.1, run unchanged against higher_func.

Each test writes the idiom the way a legacy program does and checks it against higher itself
(the oracle), bit for bit under ``numerics("higher")``, or against an explicit loop where
higher is wrong (a trainable subset of ``reference_params``). The idioms:

* learned learning rates given as an ``nn.ParameterList`` (and ``betas`` as a slice of one);
* per-parameter learning rates shaped like their weight;
* optimizer subclasses copied from higher's own, calling ``higher.optim._add`` & co.;
* ``get_diff_optim(opt, trainable_params, fmodel=fmodel)`` with frozen parameters left out;
* the numerics switch (``HIGHER_FUNC_NUMERICS``, ``higher_func.optim.numerics``);
* idioms that worked already: per-group learned lrs, ``grad_callback`` for first-order MAML,
  edits of ``diffopt.param_groups``, iterating ``diffopt.state``, ``parameters(time=-1)``,
  ``fmodel.state_dict()`` into ``load_state_dict``, custom methods after the context exits.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import higher
import higher.optim
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher_func
import higher_func.optim
from higher_func.optim import get_numerics, numerics, set_numerics

pytestmark = [
    pytest.mark.filterwarnings("ignore:Differentiable RMSprop suffers:UserWarning"),
    pytest.mark.filterwarnings("ignore:Differentiable Rprop \\(correctly\\):UserWarning"),
]


@pytest.fixture
def higher_numerics():
    with numerics("higher"):
        yield


class Net(nn.Module):
    """A ReLU net with a custom method, as few-shot programs write them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _net_pair(seed: int = 0) -> tuple[Net, Net]:
    """Two identical nets: one for higher, one for higher_func."""
    torch.manual_seed(seed)
    net = Net()
    return net, copy.deepcopy(net)


def _data(seed: int = 1, steps: int = 3):
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)) for _ in range(steps + 1)
    ]
    return batches[:-1], batches[-1]


def _loss(model, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def _assert_equal(actual, expected) -> None:
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), i
        if a is not None:
            assert a.shape == e.shape, i
            assert torch.equal(a, e), f"tensor {i} differs: max |diff| {(a - e).abs().max()}"


def _groups(net: Net) -> list[dict]:
    return [{"params": net.body.parameters()}, {"params": net.head.parameters()}]


def _maml(lib, net, opt, support, query, **ctx_kwargs):
    """An unrolled inner loop; returns the fast weights and the query loss."""
    with lib.innerloop_ctx(net, opt, copy_initial_weights=False, **ctx_kwargs) as (f, d):
        for batch in support:
            d.step(_loss(f, batch))
        return list(f.parameters()), _loss(f, query)


# ---------------------------------------------------------------------------------------------
# 1. Learned hyperparameters in an nn.ParameterList
# ---------------------------------------------------------------------------------------------


def _run_with_learned(lib, net, make_opt, make_hyper, override_of):
    hyper = make_hyper()
    support, query = _data()
    fast, loss = _maml(lib, net, make_opt(net), support, query, override=override_of(hyper))
    leaves = list(net.parameters()) + list(hyper)
    return fast, torch.autograd.grad(loss, leaves)


def test_parameterlist_of_learning_rates_per_group(higher_numerics):
    # MAML++-style: one learned learning rate per layer, kept in an nn.ParameterList.
    def lrs():
        return nn.ParameterList([nn.Parameter(torch.tensor(0.1)), nn.Parameter(torch.tensor(0.05))])

    def make_opt(net):
        return torch.optim.SGD(_groups(net), lr=0.1, momentum=0.5)

    theirs, ours = _net_pair()
    expected = _run_with_learned(higher, theirs, make_opt, lrs, lambda h: {"lr": h})
    actual = _run_with_learned(higher_func, ours, make_opt, lrs, lambda h: {"lr": h})
    _assert_equal(actual[0], expected[0])
    _assert_equal(actual[1], expected[1])


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
def test_betas_as_a_slice_of_a_parameterlist(higher_numerics):
    def hyper():
        values = [0.01, 0.9, 0.99]
        return nn.ParameterList([nn.Parameter(torch.tensor(v)) for v in values])

    def make_opt(net):
        return torch.optim.Adam(net.parameters(), lr=0.01)

    def override(h):
        return {"lr": h[0:1], "betas": [h[1:3]]}

    theirs, ours = _net_pair()
    expected = _run_with_learned(higher, theirs, make_opt, hyper, override)
    actual = _run_with_learned(higher_func, ours, make_opt, hyper, override)
    _assert_equal(actual[0], expected[0])
    # higher turns sqrt(1 - beta2**t) into a Python float (math.sqrt), which cuts beta2 out
    # of the graph there; higher_func keeps that path, so only beta2's gradient differs.
    _assert_equal(actual[1][:-1], expected[1][:-1])
    assert torch.isfinite(actual[1][-1]) and actual[1][-1] != 0


def test_parameterlist_override_error_names_the_key():
    net = Net()
    opt = torch.optim.Adam(net.parameters())
    bad = {"betas": [nn.ParameterList([nn.Parameter(torch.tensor(0.9))])]}
    with pytest.raises(TypeError, match=r"override\['betas'\] must be a sequence of 2"):
        higher_func.innerloop_ctx(net, opt, override=bad).__enter__()
    with pytest.raises(TypeError, match=r"override\['lr'\] must be a list"):
        higher_func.innerloop_ctx(net, opt, override={"lr": 0.1}).__enter__()


# ---------------------------------------------------------------------------------------------
# 2. Per-parameter (elementwise) learning rates
# ---------------------------------------------------------------------------------------------


def _per_parameter_groups(net):
    return [{"params": [p]} for p in net.parameters()]


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_learning_rate_shaped_like_its_weight(higher_numerics, opt_type):
    # Meta-SGD: a learned learning rate per coordinate, one group per weight.
    def lrs():
        torch.manual_seed(5)
        return [(0.05 + 0.1 * torch.rand_like(p)).requires_grad_() for p in Net().parameters()]

    def make_opt(net):
        return opt_type(_per_parameter_groups(net), lr=0.1)

    theirs, ours = _net_pair()
    expected = _run_with_learned(higher, theirs, make_opt, lrs, lambda h: {"lr": h})
    actual = _run_with_learned(higher_func, ours, make_opt, lrs, lambda h: {"lr": h})
    _assert_equal(actual[0], expected[0])
    _assert_equal(actual[1], expected[1])


def test_elementwise_learning_rate_equals_writing_it_into_param_groups():
    net = Net()
    lr = torch.full_like(net.head.weight, 0.1).requires_grad_()
    support, _ = _data()

    def run(through_override):
        opt = torch.optim.SGD([{"params": [net.head.weight]}], lr=0.5)
        override = {"lr": [lr]} if through_override else None
        ctx = higher_func.innerloop_ctx(net, opt, override=override)
        with ctx as (f, d):
            if not through_override:
                d.param_groups[0]["lr"] = lr
            for batch in support:
                d.step(_loss(f, batch))
            return f.head.weight

    _assert_equal([run(True)], [run(False)])


def test_elementwise_learning_rate_that_does_not_fit_is_refused():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # One value for all groups must fit every weight: the head's (2, 8) lr cannot scale the
    # body's (8, 4) weight.
    bad = {"lr": [torch.full_like(net.head.weight, 0.1)]}
    with pytest.raises(ValueError, match=r"override\['lr'\] has shape \(2, 8\).*\(8, 4\)"):
        higher_func.innerloop_ctx(net, opt, override=bad).__enter__()


# ---------------------------------------------------------------------------------------------
# 3. Optimizer subclasses copied from higher's own: higher.optim._add & co.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["_add", "_addcdiv", "_addcmul"])
@pytest.mark.parametrize("coefficient", [None, -0.3, "tensor"])
def test_private_arithmetic_helpers_match_higher(name, coefficient):
    x, a, b = torch.randn(3, 5).unbind(0)
    b = b.abs() + 0.5
    if coefficient == "tensor":
        coefficient = torch.tensor(0.7, requires_grad=True)
    theirs, ours = getattr(higher.optim, name), getattr(higher_func.optim, name)
    if name == "_add":
        args = (a,) if coefficient is None else (coefficient, a)
    else:
        args = (a, b) if coefficient is None else (coefficient, a, b)
    _assert_equal([ours(x, *args)], [theirs(x, *args)])


def test_private_helpers_import_the_legacy_way():
    code = "from higher_func.optim import _add, _addcdiv, _addcmul; print(_add.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert result.stdout.strip() == "_add"


def _heavy_ball_class(optim_module):
    """A subclass as legacy programs copied it from higher's optim.py (written here anew)."""

    class HeavyBall(optim_module.DifferentiableOptimizer):
        def _update(self, grouped_grads, **kwargs):
            for g_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is None:
                        continue
                    state = self.state[g_idx][p_idx]
                    buf = state.get("velocity")
                    buf = g if buf is None else optim_module._add(buf.mul(0.8), 0.5, g)
                    state["velocity"] = buf
                    step = optim_module._addcmul(buf, 0.1, p, p)
                    group["params"][p_idx] = optim_module._add(p, -group["lr"], step)

    return HeavyBall


class _HeavyBallOpt(torch.optim.SGD):
    pass


def test_custom_subclass_using_private_helpers_matches_higher(optimizer_registry):
    results = []
    for lib, net in zip((higher, higher_func), _net_pair()):
        lib.register_optim(_HeavyBallOpt, _heavy_ball_class(lib.optim))
        support, query = _data()
        opt = _HeavyBallOpt(net.parameters(), lr=0.1)
        fast, loss = _maml(lib, net, opt, support, query)
        results.append((fast, torch.autograd.grad(loss, list(net.parameters()))))
    _assert_equal(results[1][0], results[0][0])
    _assert_equal(results[1][1], results[0][1])


# ---------------------------------------------------------------------------------------------
# 4. reference_params: the trainable subset, frozen parameters left out
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_trainable_subset_of_reference_params_updates_exactly_those(momentum):
    net = Net()
    net.body.weight.requires_grad_(False)  # a frozen feature extractor weight
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=momentum)
    fmodel = higher_func.monkeypatch(net, copy_initial_weights=False)
    diffopt = higher_func.optim.get_diff_optim(opt, trainable, fmodel=fmodel)
    support, _ = _data()

    # The explicit loop: the same SGD on the trainable tensors only.
    weights = [p.detach().clone() for p in net.parameters()]
    buffers = [None] * len(weights)
    names = [n for n, _ in net.named_parameters()]
    for batch in support:
        diffopt.step(_loss(fmodel, batch))
        leaves = [w.requires_grad_(p.requires_grad) for w, p in zip(weights, net.parameters())]
        out = torch.func.functional_call(net, dict(zip(names, leaves)), (batch[0],))
        grads = torch.autograd.grad(
            F.mse_loss(out, batch[1]), [w for w in leaves if w.requires_grad]
        )
        grads = iter(grads)
        for i, p in enumerate(net.parameters()):
            if not p.requires_grad:
                continue
            g = next(grads)
            if momentum:
                buffers[i] = g if buffers[i] is None else buffers[i] * momentum + g
                g = buffers[i]
            weights[i] = (weights[i] - 0.1 * g).detach()

    fast = list(fmodel.parameters())
    assert torch.equal(fast[0], net.body.weight)  # frozen: carried over unchanged
    for actual, expected in zip(fast, weights):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_reference_params_mixing_module_and_foreign_tensors_is_refused():
    net = Net()
    stray = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([net.head.weight, stray], lr=0.1)
    fmodel = higher_func.monkeypatch(net)
    with pytest.raises(ValueError, match=r"reference_params\[1\] \(shape \(3,\)\)"):
        higher_func.optim.get_diff_optim(opt, [net.head.weight, stray], fmodel=fmodel)


# ---------------------------------------------------------------------------------------------
# 5. The numerics switch
# ---------------------------------------------------------------------------------------------


def _in_subprocess(env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HIGHER_FUNC_NUMERICS"}
    if env_value is not None:
        env["HIGHER_FUNC_NUMERICS"] = env_value
    code = "import higher_func; print(higher_func.optim.get_numerics())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("value", "mode"), [(None, "torch"), ("", "torch"), ("higher", "higher"), ("torch", "torch")]
)
def test_environment_variable_is_read_at_import(value, mode):
    result = _in_subprocess(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == mode


def test_unknown_environment_value_is_a_clear_error():
    result = _in_subprocess("Higher")
    assert result.returncode != 0
    assert "HIGHER_FUNC_NUMERICS must be 'torch'" in result.stderr
    assert "'Higher'" in result.stderr


def test_numerics_switches_for_a_block_and_set_numerics_for_good():
    assert get_numerics() == "torch"
    with numerics("higher") as scope:
        assert get_numerics() == "higher"
        with numerics("torch"):
            assert get_numerics() == "torch"
        assert get_numerics() == "higher"
    assert get_numerics() == "torch"
    assert repr(scope) == "numerics('higher')"
    try:
        assert set_numerics("higher") == "torch"
        assert get_numerics() == "higher"
    finally:
        set_numerics("torch")
    with pytest.raises(ValueError, match=r"numerics\(mode\) must be 'torch'.*got 'fast'"):
        numerics("fast")
    with pytest.raises(ValueError, match=r"set_numerics\(mode\) must be 'torch'"):
        set_numerics("fast")
    assert get_numerics() == "torch"


def test_numerics_switches_when_its_block_starts_not_when_called():
    scope = numerics("higher")  # made ahead of time: nothing changes yet
    assert get_numerics() == "torch"
    try:
        set_numerics("higher")
        with numerics("torch"):
            with scope:  # entered later, inside another block, and re-entered
                assert get_numerics() == "higher"
                with scope:
                    assert get_numerics() == "higher"
                assert get_numerics() == "higher"
            assert get_numerics() == "torch"  # what the block found, not what the call saw
        assert get_numerics() == "higher"
    finally:
        set_numerics("torch")


def _adam_meta_gradients(lib, net, scale):
    support, query = _data(steps=5)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    with lib.innerloop_ctx(net, opt, copy_initial_weights=False) as (f, d):
        for batch in support:
            d.step(scale * _loss(f, batch))
        return torch.autograd.grad(_loss(f, query), list(net.parameters()))


@pytest.mark.parametrize("scale", [1.0, 1e-5])
def test_switch_reproduces_higher_where_default_numerics_do_not(scale):
    theirs, ours = _net_pair()
    expected = _adam_meta_gradients(higher, theirs, scale)
    default = _adam_meta_gradients(higher_func, copy.deepcopy(ours), scale)
    with numerics("higher"):
        switched = _adam_meta_gradients(higher_func, ours, scale)
    _assert_equal(switched, expected)
    assert not all(torch.equal(a, e) for a, e in zip(default, expected))


def test_switch_is_read_at_step_time():
    # The optimizer is built under the default mode; only its steps run under the switch.
    results = []
    for lib, net in zip((higher, higher_func), _net_pair()):
        support, query = _data()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        with lib.innerloop_ctx(net, opt, copy_initial_weights=False) as (f, d):
            with numerics("higher"):
                for batch in support:
                    d.step(_loss(f, batch))
            loss = _loss(f, query)
        results.append(torch.autograd.grad(loss, list(net.parameters())))
    _assert_equal(results[1], results[0])


# ---------------------------------------------------------------------------------------------
# 6. Idioms that already worked, checked against higher
# ---------------------------------------------------------------------------------------------


def test_first_order_maml_through_grad_callback(higher_numerics):
    results = []
    for lib, net in zip((higher, higher_func), _net_pair()):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        support, query = _data()
        detach = lambda grads: [g.detach() for g in grads]  # noqa: E731
        fast, loss = _maml(lib, net, opt, support, query)
        with lib.innerloop_ctx(net, opt, copy_initial_weights=False) as (f, d):
            for batch in support:
                d.step(_loss(f, batch), grad_callback=detach)
            loss = _loss(f, query)
        results.append(torch.autograd.grad(loss, list(net.parameters())))
    _assert_equal(results[1], results[0])


def test_param_group_edits_and_state_iteration(higher_numerics):
    results = []
    for lib, net in zip((higher, higher_func), _net_pair()):
        lr = torch.tensor(0.02, requires_grad=True)
        opt = torch.optim.Adam(_groups(net), lr=0.01)
        support, query = _data()
        with lib.innerloop_ctx(net, opt, copy_initial_weights=False) as (f, d):
            for t, batch in enumerate(support):
                if t == 1:
                    d.param_groups[1]["lr"] = lr  # a learned lr from the second step on
                d.step(_loss(f, batch))
            states = [
                (i, sorted(s), s["exp_avg"], s["exp_avg_sq"])
                for group_state in d.state
                for i, s in group_state.items()
            ]
            loss = _loss(f, query)
        results.append((states, torch.autograd.grad(loss, [lr, *net.parameters()])))
    (ours_states, ours_grads), (their_states, their_grads) = results[1], results[0]
    assert [s[:2] for s in ours_states] == [s[:2] for s in their_states]
    _assert_equal([s[2] for s in ours_states], [s[2] for s in their_states])
    _assert_equal([s[3] for s in ours_states], [s[3] for s in their_states])
    _assert_equal(ours_grads, their_grads)


def test_history_state_dict_and_custom_methods_after_the_context(higher_numerics):
    outputs = []
    x = torch.randn(3, 4)
    for lib, net in zip((higher, higher_func), _net_pair()):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        support, _ = _data()
        with lib.innerloop_ctx(net, opt) as (f, d):
            for batch in support:
                d.step(_loss(f, batch))
        latest = list(f.parameters(time=-1))
        first = list(f.parameters(time=0))
        adapted = Net()
        adapted.load_state_dict(f.state_dict())
        outputs.append((latest, first, f.embed(x), adapted(x)))
    ours, theirs = outputs[1], outputs[0]
    _assert_equal(ours[0], theirs[0])
    _assert_equal(ours[1], theirs[1])
    _assert_equal([ours[2], ours[3]], [theirs[2], theirs[3]])


# ---------------------------------------------------------------------------------------------
# 7. The patched module as an nn.Module: isinstance, a child of another module, apply()
# ---------------------------------------------------------------------------------------------


class Agent(nn.Module):
    """A module whose child slot receives the patched module (``self.q_net = fmodel``), as
    meta-RL programs do."""

    def __init__(self, q_net: nn.Module) -> None:
        super().__init__()
        self.q_net = q_net
        self.scale = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.q_net(x))


def _agent_run(lib, net: Net, load_into_child: bool = False):
    torch.manual_seed(3)
    agent = Agent(Net())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
    support, query = _data()
    with lib.innerloop_ctx(net, opt, copy_initial_weights=False) as (f, d):
        kinds = (isinstance(f, nn.Module), isinstance(f, Net))
        agent.q_net = f
        for batch in support:
            d.step(F.mse_loss(agent(batch[0]), batch[1]))
        if load_into_child:
            torch.manual_seed(4)
            agent.load_state_dict(Agent(Net()).state_dict())
            return kinds, list(f.parameters())
        loss = _loss(agent, query)
        modules = [(isinstance(m, nn.Linear), isinstance(m, Net)) for m in agent.modules()]
        names = [n for n, _ in agent.named_parameters()]
        state = agent.state_dict()
        grads = torch.autograd.grad(loss, list(net.parameters()) + list(agent.parameters()))
        return kinds, modules, names, state, grads


def test_patched_module_stored_as_a_child_module_behaves_as_highers(higher_numerics):
    theirs, ours = (_agent_run(lib, net) for lib, net in zip((higher, higher_func), _net_pair()))
    assert ours[0] == theirs[0] == (True, True)
    assert ours[1] == theirs[1] and ours[2] == theirs[2]
    assert list(ours[3]) == list(theirs[3])
    assert list(ours[3]._metadata) == list(theirs[3]._metadata)
    _assert_equal(ours[3].values(), theirs[3].values())
    _assert_equal(ours[4], theirs[4])


def test_load_state_dict_through_a_parent_writes_the_fast_weights_as_highers():
    theirs, ours = (
        _agent_run(lib, net, load_into_child=True)
        for lib, net in zip((higher, higher_func), _net_pair())
    )
    _assert_equal(ours[1], theirs[1])


def test_apply_visits_the_patched_modules_as_highers():
    visits = []
    for lib, net in zip((higher, higher_func), _net_pair()):
        fmodel = lib.monkeypatch(net)
        seen: list = []
        assert fmodel.apply(seen.append) is fmodel
        visits.append([(isinstance(m, nn.Linear), isinstance(m, Net)) for m in seen])
        assert seen[-1] is fmodel
    assert visits[0] == visits[1]


def test_apply_that_edits_fast_weights_never_touches_the_model():
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    fmodel = higher_func.monkeypatch(net)

    def zero_biases(m):
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.bias.zero_()

    fmodel.apply(zero_biases)
    assert all(b.abs().sum() == 0 for n, b in fmodel.named_parameters() if n.endswith("bias"))
    _assert_equal(net.parameters(), before)


# ---------------------------------------------------------------------------------------------
# 8. higher.patch._internal_attrs edited at import: weight-norm pre-hooks
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def pre_hooks_copied():
    # The program's edit, on both libraries, undone afterwards.
    edited = [higher.patch._internal_attrs, higher_func.patch._internal_attrs]
    for attrs in edited:
        attrs.discard("_forward_pre_hooks")
    yield
    for attrs in edited:
        attrs.add("_forward_pre_hooks")


def _weight_normed() -> nn.Module:
    torch.manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-style weight_norm
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, 2))


def test_removing_forward_pre_hooks_from_internal_attrs_runs_weight_norm_as_higher(
    higher_numerics, pre_hooks_copied
):
    results = []
    support, query = _data()
    for lib in (higher, higher_func):
        net = _weight_normed()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        fast, loss = _maml(lib, net, opt, support, query)
        results.append((fast, torch.autograd.grad(loss, list(net.parameters()))))
    _assert_equal(results[1][0], results[0][0])
    _assert_equal(results[1][1], results[0][1])


def test_internal_attrs_edits_change_nothing_here():
    support, query = _data()
    outputs = []
    for edit in (False, True):
        if edit:
            higher_func.patch._internal_attrs.discard("_forward_pre_hooks")
        try:
            net = _weight_normed()
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            outputs.append(_maml(higher_func, net, opt, support, query)[1])
        finally:
            higher_func.patch._internal_attrs.add("_forward_pre_hooks")
    _assert_equal([outputs[1]], [outputs[0]])


# ---------------------------------------------------------------------------------------------
# 9. A subclass replacing DifferentiableOptimizer.step, written the way higher's step is
# ---------------------------------------------------------------------------------------------


def _first_order_capable(base):
    """A subclass whose own ``step`` takes ``first_order=`` (gradients detached), built on
    higher's internals: ``_fmodel``, ``_group_to_param_list``, ``_track_higher_grads``,
    ``_grad_callback``, ``_apply_override``, ``_update`` and ``state[group][param]``."""

    class FirstOrderCapable(base):
        def step(self, loss, params=None, override=None, grad_callback=None, first_order=False):
            if override is not None:
                self._apply_override(override)
            if params is None:
                params = self._fmodel.fast_params
            params = list(params)
            targets = [p if p.requires_grad else torch.zeros(0, requires_grad=True) for p in params]
            create_graph = self._track_higher_grads and not first_order
            grads = torch.autograd.grad(loss, targets, create_graph=create_graph, allow_unused=True)
            if first_order:
                grads = [None if g is None else g.detach() for g in grads]
            callback = grad_callback or self._grad_callback
            if callback is not None:
                grads = callback(grads)
            grouped = []
            for group, mapping in zip(self.param_groups, self._group_to_param_list):
                group_grads = []
                for slot, index in enumerate(mapping):
                    group["params"][slot] = params[index]
                    group_grads.append(grads[index])
                grouped.append(group_grads)
            self._update(grouped)
            # Bookkeeping written into the per-parameter state, as such programs do.
            for g_idx, mapping in enumerate(self._group_to_param_list):
                for slot in range(len(mapping)):
                    count = self.state[g_idx][slot].get("calls", 0)
                    self.state[g_idx][slot]["calls"] = count + 1
            new_params = list(params)
            for group, mapping in zip(self.param_groups, self._group_to_param_list):
                for p, index in zip(group["params"], mapping):
                    new_params[index] = p if self._track_higher_grads else p.detach()
            self._fmodel.update_params(new_params)
            return new_params

    return FirstOrderCapable


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("base", ["DifferentiableSGD", "DifferentiableAdam"])
def test_subclass_replacing_step_matches_higher(higher_numerics, base, first_order):
    results = []
    support, query = _data()
    lr = torch.tensor(0.05, requires_grad=True)
    for lib, net in zip((higher, higher_func), _net_pair()):
        net.body.bias.requires_grad_(False)
        opt_type = torch.optim.SGD if base == "DifferentiableSGD" else torch.optim.Adam
        kwargs = {"momentum": 0.9} if base == "DifferentiableSGD" else {}
        opt = opt_type(_groups(net), lr=0.1, **kwargs)
        fmodel = lib.monkeypatch(net, copy_initial_weights=False)
        cls = _first_order_capable(getattr(lib.optim, base))
        diffopt = cls(opt, net.parameters(), fmodel=fmodel, override={"lr": [lr, 0.1]})
        for batch in support:
            diffopt.step(_loss(fmodel, batch), first_order=first_order)
        loss = _loss(fmodel, query)
        trainable = [p for p in net.parameters() if p.requires_grad] + [lr]
        calls = [s["calls"] for states in diffopt.state for s in states.values()]
        results.append((list(fmodel.parameters()), torch.autograd.grad(loss, trainable), calls))
    _assert_equal(results[1][0], results[0][0])
    _assert_equal(results[1][1], results[0][1])
    assert results[1][2] == results[0][2]


# ---------------------------------------------------------------------------------------------
# 10. Overrides that fill hyperparameters built as None
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_override_fills_a_none_learning_rate_as_higher(higher_numerics, opt_type):
    results = []
    for lib, net in zip((higher, higher_func), _net_pair()):
        groups = [{**g, "lr": None} for g in _groups(net)]
        opt = opt_type(groups, lr=0.1)
        lrs = [torch.tensor(0.1, requires_grad=True), torch.tensor(0.02, requires_grad=True)]
        support, query = _data()
        fast, loss = _maml(lib, net, opt, support, query, override={"lr": lrs})
        results.append((fast, torch.autograd.grad(loss, list(net.parameters()) + lrs)))
    _assert_equal(results[1][0], results[0][0])
    _assert_equal(results[1][1], results[0][1])


def test_a_none_hyperparameter_left_unfilled_names_group_and_key():
    net = Net()
    opt = torch.optim.SGD([{"params": net.body.parameters(), "lr": None}], lr=0.1)
    with higher_func.innerloop_ctx(net, opt) as (fmodel, diffopt):
        before = list(fmodel.parameters())
        with pytest.raises(TypeError, match=r"parameter group 0 has lr=None.*override=\{'lr'"):
            diffopt.step(_loss(fmodel, _data()[1]))
        _assert_equal(fmodel.parameters(), before)  # the failed step changed nothing
        diffopt.step(_loss(fmodel, _data()[1]), override={"lr": [0.1]})


# ---------------------------------------------------------------------------------------------
# 11. A warm torch optimizer (already stepped) continued by an inner loop, bit for bit
# ---------------------------------------------------------------------------------------------

WARM = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "amsgrad": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    "adamax": (torch.optim.Adamax, {"lr": 0.01}),
    "asgd": (torch.optim.ASGD, {"lr": 0.01, "t0": 2}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
    "rprop": (torch.optim.Rprop, {"lr": 0.01}),
}


def _warm_inner_loop(lib, name: str, warm_steps: int):
    net = _net_pair()[0]
    opt_type, kwargs = WARM[name]
    opt = opt_type(net.parameters(), foreach=False, **kwargs)
    support, query = _data(seed=7, steps=warm_steps + 3)
    for batch in support[:warm_steps]:
        opt.zero_grad()
        _loss(net, batch).backward()
        opt.step()
    fast, loss = _maml(lib, net, opt, support[warm_steps:], query)
    return fast, torch.autograd.grad(loss, list(net.parameters()))


@pytest.mark.parametrize("warm_steps", [0, 1, 5])
@pytest.mark.parametrize("name", list(WARM))
def test_inner_loop_from_a_warm_torch_optimizer_matches_higher(higher_numerics, name, warm_steps):
    # higher imported torch.optim's state as it was, step counter included (a float32 tensor
    # in today's torch), so its bias corrections ran in float32 tensor arithmetic.
    expected = _warm_inner_loop(higher, name, warm_steps)
    actual = _warm_inner_loop(higher_func, name, warm_steps)
    _assert_equal(actual[0], expected[0])
    _assert_equal(actual[1], expected[1])


# ---------------------------------------------------------------------------------------------
# 12. Idioms found in public code (the search tool's code corpus)
# ---------------------------------------------------------------------------------------------


def test_context_parameters_stepped_without_a_patched_module(higher_numerics):
    # CAVIA-style: a differentiable optimizer over a context vector only, no fmodel; each
    # step passes the vector and unpacks the one updated tensor.
    results = []
    for lib, net in zip((higher, higher_func), _net_pair()):
        context = torch.zeros(4, requires_grad=True)
        diffopt = lib.optim.get_diff_optim(torch.optim.SGD([context], lr=0.5), [context])
        current = context
        for x, y in _data()[0]:
            (current,) = diffopt.step(F.mse_loss(net(x + current), y), params=[current])
        x, y = _data()[1]
        loss = F.mse_loss(net(x + current), y)
        results.append([current, *torch.autograd.grad(loss, [context, *net.parameters()])])
    _assert_equal(results[1], results[0])


def test_private_type_names_annotate_legacy_code():
    # `FuncModel = higher.patch._MonkeyPatchBase`, `from higher.optim import _GroupedGradsType`.
    from higher_func.optim import _GradCallbackType, _GroupedGradsType, _OverrideType, _StateType
    from higher_func.patch import _BufferType, _MonkeyPatchBase

    assert all(t is not None for t in (_GradCallbackType, _GroupedGradsType, _OverrideType))
    assert _StateType is not None and _BufferType is not None
    assert isinstance(higher_func.monkeypatch(Net()), _MonkeyPatchBase)


@pytest.mark.parametrize("per_group", [False, True])
def test_override_given_as_a_one_dimensional_tensor(higher_numerics, per_group):
    # override={"lr": torch.tensor([lr], requires_grad=True)}: a tensor where a list is
    # expected, as programs pass it; higher indexes it like a list.
    results = []
    for lib, net in zip((higher, higher_func), _net_pair()):
        values = [0.1, 0.05] if per_group else [0.1]
        lr = torch.tensor(values, requires_grad=True)
        opt = torch.optim.SGD(_groups(net), lr=0.5)
        support, query = _data()
        fast, loss = _maml(lib, net, opt, support, query, override={"lr": lr})
        results.append((fast, torch.autograd.grad(loss, [lr, *net.parameters()])))
    _assert_equal(results[1][0], results[0][0])
    _assert_equal(results[1][1], results[0][1])


def test_override_as_a_tensor_of_another_shape_is_refused():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for value in (torch.tensor(0.1), torch.full((2, 1), 0.1)):
        with pytest.raises(TypeError, match=r"override\['lr'\] must be a list"):
            higher_func.innerloop_ctx(net, opt, override={"lr": value}).__enter__()
