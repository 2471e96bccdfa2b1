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
