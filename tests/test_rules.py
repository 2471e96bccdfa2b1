"""The pure update rules against ``torch.optim``, and their differentiability.

Every invariant runs over ``CASES``, a list of (rule, hyperparameters) pairs that together
set every hyperparameter of every rule of the library's registry (``_rules.OPTIMIZERS``) away
from its default; a registered optimizer without such cases fails
``test_registry_covers_every_rule_and_option``. The oracle is ``torch.optim``
itself (its single-tensor path, ``foreach=False``), driven by the same loss as the rule.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.optimizer import required

from higher_func import _compat, _rules
from higher_func._rules import RULES

#: Rule name -> torch.optim class, from the library's one registry.
OPTIMIZERS = {rule.update.__name__: opt_type for opt_type, rule in _rules.OPTIMIZERS.items()}
KERNEL_ONLY = {"foreach", "fused", "capturable", "differentiable"}

CASES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
    (
        "sgd",
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01, "maximize": True},
    ),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.9), "weight_decay": 0.1, "amsgrad": True}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    ("adam", {"lr": 0.02, "eps": 1e-3, "amsgrad": True, "maximize": True}),
    ("adamw", {"lr": 0.01}),
    (
        "adamw",
        {
            "lr": 0.01,
            "betas": (0.85, 0.95),
            "eps": 1e-4,
            "weight_decay": 0.2,
            "amsgrad": True,
            "maximize": True,
        },
    ),
    ("adadelta", {}),
    ("adadelta", {"lr": 0.5, "rho": 0.7, "eps": 1e-4, "weight_decay": 0.1, "maximize": True}),
    ("adagrad", {"lr": 0.1}),
    (
        "adagrad",
        {
            "lr": 0.1,
            "lr_decay": 0.05,
            "weight_decay": 0.1,
            "initial_accumulator_value": 0.3,
            "eps": 1e-6,
            "maximize": True,
        },
    ),
    ("adamax", {"lr": 0.01}),
    ("adamax", {"lr": 0.02, "betas": (0.5, 0.8), "eps": 1e-4, "weight_decay": 0.1}),
    ("adamax", {"lr": 0.02, "maximize": True}),
    ("asgd", {"lr": 0.05}),
    # Small t0: mu < 1 from the end of step 4 (t0=2) or step 2 (t0=0.5), so the averaging
    # branch runs too.
    ("asgd", {"lr": 0.05, "lambd": 0.1, "alpha": 0.5, "t0": 2.0, "weight_decay": 0.1}),
    ("asgd", {"lr": 0.02, "t0": 0.5, "maximize": True}),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.1}),
    ("rmsprop", {"lr": 0.02, "centered": True}),
    ("rmsprop", {"lr": 0.01, "centered": True, "momentum": 0.9, "eps": 1e-4, "maximize": True}),
    ("rprop", {"lr": 0.01}),
    ("rprop", {"lr": 0.05, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.1), "maximize": True}),
    ("nadam", {"lr": 0.01}),
    (
        "nadam",
        {
            "lr": 0.01,
            "betas": (0.8, 0.95),
            "eps": 1e-4,
            "weight_decay": 0.1,
            "momentum_decay": 0.01,
        },
    ),
    (
        "nadam",
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ),
    # beta2 = 0.999: rho_t <= 5 for steps 1-5, > 5 (rectified) from step 6.
    ("radam", {"lr": 0.01}),
    # beta2 = 0.5: rho_inf = 3, never rectified.
    ("radam", {"lr": 0.01, "betas": (0.9, 0.5), "weight_decay": 0.1}),
    (
        "radam",
        {
            "lr": 0.01,
            "betas": (0.8, 0.9),
            "eps": 1e-4,
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
            "maximize": True,
        },
    ),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def _lacks(name: str, hyper: dict) -> list[str]:
    """The options in ``hyper`` that the installed torch.optim class does not take."""
    accepted = inspect.signature(OPTIMIZERS[name]).parameters
    return [key for key in hyper if key not in accepted]


def torch_cases(cases: list, ids: list[str]) -> list:
    """``cases`` for a comparison with torch.optim: a case using an option the installed
    torch.optim lacks (torch 2.0's NAdam has no ``maximize``) is skipped, naming it."""
    return [
        pytest.param(
            name,
            hyper,
            id=case_id,
            marks=[
                pytest.mark.skip(
                    reason=f"torch {torch.__version__}'s {OPTIMIZERS[name].__name__} has no "
                    f"{', '.join(_lacks(name, hyper))}"
                )
            ]
            if _lacks(name, hyper)
            else [],
        )
        for (name, hyper), case_id in zip(cases, ids)
    ]


needs_foreach_autograd = pytest.mark.skipif(
    not _compat.foreach_differentiable(),
    reason=f"torch {torch.__version__} cannot differentiate torch._foreach_* ops (torch >= 2.1 "
    "can)",
)

#: The optimizers higher 0.2.1 shipped: each rule has a variant with higher's numerics.
IN_HIGHER = {"sgd", "adam", "adadelta", "adagrad", "adamax", "asgd", "rmsprop", "rprop"}
over_numerics = pytest.mark.parametrize("numerics", ["torch", "higher"])
TOLERANCES = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-7},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}
STEPS = 8


# ---------------------------------------------------------------------------------------------
# A small model and two drivers: torch.optim, and the rule fed with the same loss.


def _data(dtype: torch.dtype, seed: int = 0, dead_feature: bool = False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, generator=generator, dtype=dtype)
    if dead_feature:
        # Input feature 0 is always 0, so the gradient of W[0, :] is exactly 0 at every step.
        x[:, 0] = 0
    y = torch.randn(6, generator=generator, dtype=dtype)
    return x, y


def _init_params(dtype: torch.dtype, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (2,), (2,)]
    return [torch.randn(*shape, generator=generator, dtype=dtype) for shape in shapes]


def _model_loss(params, data) -> torch.Tensor:
    """Mean squared error of a one-hidden-layer tanh network; params are W, b, v."""
    weight, bias, head = params
    x, y = data
    return ((torch.tanh(x @ weight + bias) @ head - y) ** 2).mean()


def _all_hyperparameters(name: str, hyper: dict) -> dict:
    """``hyper`` completed with the rule's defaults."""
    parameters = inspect.signature(RULES[name].update).parameters
    return {key: hyper.get(key, parameters[key].default) for key in RULES[name].hyperparameters}


def _map_numbers(hyper: dict, convert) -> dict:
    """``hyper`` with ``convert`` applied to every number, also inside tuples; flags kept."""

    def walk(value):
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        return convert(value)

    return {key: walk(value) for key, value in hyper.items()}


def _as_tensors(hyper: dict, dtype: torch.dtype) -> tuple[dict, list[torch.Tensor]]:
    """Every number in ``hyper`` as a 0-dim tensor that requires grad, and those tensors."""
    leaves = []

    def to_leaf(value):
        leaves.append(torch.tensor(float(value), dtype=dtype, requires_grad=True))
        return leaves[-1]

    return _map_numbers(hyper, to_leaf), leaves


def _grads(loss_fn, params, create_graph: bool = False):
    if not create_graph:
        params = [p.detach().requires_grad_() for p in params]
    return torch.autograd.grad(loss_fn(params), params, create_graph=create_graph)


def _step_all(name, params, grads, states, hyper):
    update = RULES[name].update
    pairs = [update(p, g, s, **hyper) for p, g, s in zip(params, grads, states)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def _run_rule(name, hyper, loss_fn, params, states, steps):
    trajectory = []
    for _ in range(steps):
        grads = _grads(loss_fn, params)
        params, states = _step_all(name, params, grads, states, hyper)
        trajectory.append(params)
    return trajectory, states


def _run_torch(optimizer, loss_fn, params, steps):
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(params).backward()
        optimizer.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def _import_state(torch_state: dict) -> dict:
    """A torch.optim per-parameter state as the rules keep it: an int step, cloned tensors."""
    # (torch 2.0 keeps some steps as ints, and SGD's unused momentum buffer as None.)
    return {
        key: int(value) if key == "step" else value.clone()
        for key, value in torch_state.items()
        if value is not None
    }


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # torch.optim keeps step, ASGD's eta/mu and NAdam's mu_product in the default dtype;
    # matching it to the parameters' dtype compares the update rules, not that storage.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _assert_trajectories_close(ours, theirs, **tolerance):
    for step, (ours_params, their_params) in enumerate(zip(ours, theirs), start=1):
        for index, (mine, reference) in enumerate(zip(ours_params, their_params)):
            torch.testing.assert_close(
                mine,
                reference,
                equal_nan=True,
                **tolerance,
                msg=lambda m, s=step, i=index: f"step {s}, parameter {i}: {m}",
            )


def _assert_states_close(ours: dict, theirs: dict, **tolerance):
    theirs = {key: value for key, value in theirs.items() if value is not None}
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        if key == "step":
            assert isinstance(value, int) and value == int(theirs[key])
            continue
        expected = theirs[key]
        actual = torch.as_tensor(value, dtype=expected.dtype)
        torch.testing.assert_close(actual, expected, **tolerance, msg=key)


def _compare_with_torch(
    name, hyper, dtype, warm_steps=0, steps=STEPS, default_dtype=None, **tolerance
):
    """Drive torch.optim and the rule side by side from the same start; compare every step.

    With ``warm_steps``, torch.optim runs alone first and the rule starts from its imported
    state. ``default_dtype`` (the parameters' dtype unless given) is torch's default dtype
    during the run.
    """
    tolerance = tolerance or TOLERANCES[dtype]
    params = _init_params(dtype)
    data = _data(dtype)

    def loss_fn(ps):
        return _model_loss(ps, data)

    with _default_dtype(default_dtype or dtype):
        leaves = [p.clone().requires_grad_() for p in params]
        optimizer = OPTIMIZERS[name](leaves, **hyper, foreach=False)
        states = [{} for _ in params]
        ours = [p.clone() for p in params]
        if warm_steps:
            _run_torch(optimizer, loss_fn, leaves, warm_steps)
            ours = [p.detach().clone() for p in leaves]
            states = [_import_state(optimizer.state[p]) for p in leaves]
        theirs = _run_torch(optimizer, loss_fn, leaves, steps)
        trajectory, states = _run_rule(name, hyper, loss_fn, ours, states, steps)
    _assert_trajectories_close(trajectory, theirs, **tolerance)
    for state, leaf in zip(states, leaves):
        _assert_states_close(state, optimizer.state.get(leaf, {}), **tolerance)


# ---------------------------------------------------------------------------------------------
# The registry itself.


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_hyperparameters_are_torch_param_group_keys(name):
    """Each rule takes exactly torch.optim's param-group keys, with its defaults."""
    rule = RULES[name]
    torch_signature = inspect.signature(OPTIMIZERS[name]).parameters
    torch_defaults = {k: p.default for k, p in torch_signature.items() if k != "params"}
    # Older torch.optim classes lack options later releases added (torch 2.0: Adam's and
    # AdamW's decoupled_weight_decay, NAdam's and RAdam's maximize too): the rule has them,
    # and the optimizers ignore them there as those torch.optim classes do.
    newer = set(_lacks(name, dict.fromkeys(rule.hyperparameters)))
    assert newer <= {"decoupled_weight_decay", "maximize"}
    assert set(rule.hyperparameters) - newer == set(torch_defaults) - KERNEL_ONLY
    signature = inspect.signature(rule.update)
    assert list(signature.parameters)[:3] == ["param", "grad", "state"]
    assert set(signature.parameters) - {"param", "grad", "state"} == set(rule.hyperparameters)
    for key in rule.hyperparameters:
        assert signature.parameters[key].kind is inspect.Parameter.KEYWORD_ONLY
        # (torch 2.0's SGD has no default lr.)
        if torch_defaults.get(key, required) is not required:
            assert signature.parameters[key].default == torch_defaults[key], key


def test_registry_covers_every_rule_and_option():
    """Every hyperparameter of every rule is moved off its default by some case."""
    assert set(RULES) == set(OPTIMIZERS)
    for name, rule in RULES.items():
        defaults = _all_hyperparameters(name, {})
        changed = {
            key
            for case_name, hyper in CASES
            if case_name == name
            for key, value in hyper.items()
            if value != defaults[key]
        }
        # AdamW's decoupled_weight_decay can only be True, its default.
        fixed = {"decoupled_weight_decay"} if name == "adamw" else set()
        assert changed == set(rule.hyperparameters) - fixed, name


def test_radam_cases_reach_both_branches():
    def rho(beta2, step):
        return 2 / (1 - beta2) - 1 - 2 * step * beta2**step / (1 - beta2**step)

    assert rho(0.999, 5) <= 5 < rho(0.999, 6)
    assert all(rho(0.5, step) <= 5 for step in range(1, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# Trajectories against torch.optim.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "hyper"), torch_cases(CASES, CASE_IDS))
def test_trajectory_matches_torch_optim(name, hyper, dtype):
    _compare_with_torch(name, hyper, dtype)


@pytest.mark.parametrize(("name", "hyper"), torch_cases(CASES, CASE_IDS))
def test_float64_params_under_float32_default_dtype(name, hyper):
    """torch.optim rounds ASGD's eta/mu and NAdam's mu_product to the default dtype, the rules
    keep them in the parameters' dtype; every other rule ignores the default dtype."""
    loose = {"asgd", "nadam"}
    tolerance = {"rtol": 1e-6, "atol": 1e-8} if name in loose else TOLERANCES[torch.float64]
    _compare_with_torch(name, hyper, torch.float64, default_dtype=torch.float32, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "hyper"), torch_cases(CASES, CASE_IDS))
def test_warm_start_from_torch_state(name, hyper, dtype):
    """Three torch.optim steps, its state imported, then five more steps on both sides."""
    _compare_with_torch(name, hyper, dtype, warm_steps=3, steps=5)


def test_adamw_rejects_coupled_weight_decay():
    param = torch.zeros(2)
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        RULES["adamw"].update(param, param, {}, decoupled_weight_decay=False)


def test_tensor_step_is_read_as_the_int_it_holds():
    # higher's numerics keep torch.optim's tensor step (as higher did); a torch rule meeting
    # one (the mode switched after the optimizer was built) computes as from the int.
    param, grad = torch.ones(2), torch.full((2,), 0.5)
    state = {"step": 1, "exp_avg": grad, "exp_avg_sq": grad * grad}
    expected = RULES["adam"].update(param, grad, state, lr=0.1)
    got = RULES["adam"].update(param, grad, {**state, "step": torch.tensor(1.0)}, lr=0.1)
    assert torch.equal(got[0], expected[0]) and got[1]["step"] == 2


@st.composite
def _hyperparameters(draw, name: str) -> dict[str, Any]:
    """Valid torch.optim hyperparameters for ``name``."""
    lr = draw(st.floats(1e-3, 0.3))
    weight_decay = draw(st.one_of(st.just(0), st.floats(1e-3, 0.5)))
    maximize = draw(st.booleans())
    beta = st.floats(0.0, 0.999)
    eps = st.floats(1e-8, 1e-2)
    if name == "sgd":
        momentum = draw(st.one_of(st.just(0), st.floats(0.0, 0.99)))
        nesterov = draw(st.booleans()) and momentum > 0
        dampening = 0 if nesterov else draw(st.floats(0.0, 0.9))
        return dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
    common = dict(lr=lr, maximize=maximize)
    if name in ("adam", "adamw", "adamax", "nadam", "radam"):
        common.update(betas=(draw(beta), draw(beta)), eps=draw(eps), weight_decay=weight_decay)
        if name in ("adam", "adamw"):
            common["amsgrad"] = draw(st.booleans())
        if name in ("adam", "nadam", "radam"):
            common["decoupled_weight_decay"] = draw(st.booleans())
        if name == "nadam":
            common["momentum_decay"] = draw(st.floats(0.0, 0.05))
        return common
    if name == "adadelta":
        return dict(common, rho=draw(st.floats(0.0, 1.0)), eps=draw(eps), weight_decay=weight_decay)
    if name == "adagrad":
        return dict(
            common,
            lr_decay=draw(st.floats(0.0, 0.5)),
            initial_accumulator_value=draw(st.floats(0.0, 1.0)),
            eps=draw(eps),
            weight_decay=weight_decay,
        )
    if name == "asgd":
        return dict(
            common,
            lambd=draw(st.floats(0.0, 0.5)),
            alpha=draw(st.floats(0.0, 1.0)),
            t0=draw(st.floats(0.0, 10.0)),
            weight_decay=weight_decay,
        )
    if name == "rmsprop":
        return dict(
            common,
            alpha=draw(st.floats(0.5, 0.999)),
            eps=draw(eps),
            weight_decay=weight_decay,
            momentum=draw(st.one_of(st.just(0), st.floats(0.0, 0.95))),
            centered=draw(st.booleans()),
        )
    assert name == "rprop"
    return dict(
        common,
        etas=(draw(st.floats(0.1, 0.9)), draw(st.floats(1.05, 2.0))),
        step_sizes=(draw(st.floats(1e-6, 1e-3)), draw(st.floats(0.05, 1.0))),
    )


_shapes = st.lists(st.lists(st.integers(1, 4), max_size=2).map(tuple), min_size=1, max_size=3)


@pytest.mark.parametrize("name", sorted(RULES))
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_trajectory_property(name, data):
    """Random hyperparameters and parameter shapes, on a random smooth loss, in float64."""
    hyper = data.draw(_hyperparameters(name), label="hyperparameters")
    # An option the installed torch.optim lacks is left at the rule's default, as that
    # torch.optim has it.
    hyper = {key: value for key, value in hyper.items() if key not in _lacks(name, hyper)}
    shapes = data.draw(_shapes, label="shapes")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    dtype = torch.float64
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]
    targets = [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]
    scales = [torch.rand(shape, generator=generator, dtype=dtype) + 0.5 for shape in shapes]

    def loss_fn(ps):
        fit = sum((c * (p - t) ** 2).sum() for p, t, c in zip(ps, targets, scales))
        coupling = torch.sin(sum(p.sum() for p in ps))
        return fit + coupling

    with _default_dtype(dtype):
        leaves = [p.clone().requires_grad_() for p in params]
        optimizer = OPTIMIZERS[name](leaves, **hyper, foreach=False)
        theirs = _run_torch(optimizer, loss_fn, leaves, STEPS)
        states = [{} for _ in params]
        ours, _ = _run_rule(name, hyper, loss_fn, [p.clone() for p in params], states, STEPS)
    tolerance = TOLERANCES[dtype]
    if name == "nadam":
        # NAdam keeps mu_product as a tensor where torch.optim keeps a float (one ulp apart:
        # the rules' module docstring); with beta2 near 0 (a denominator of one squared
        # gradient) Hypothesis found that ulp grown to 2e-10 relative after six steps.
        tolerance = dict(tolerance, rtol=1e-8)
    if name in ("adam", "adamw") and torch.__version__ < "2.1":
        # torch 2.0's Adam updates its first moment with mul_/add_, the rules (like torch >= 2.1)
        # with lerp_: a unit in the last place apart, which a beta2 near 0 grows (2e-9 seen).
        tolerance = dict(tolerance, rtol=1e-8, atol=1e-10)
    _assert_trajectories_close(ours, theirs, **tolerance)


# ---------------------------------------------------------------------------------------------
# Differentiability: second order, tensor hyperparameters, no NaN, no mutation.


def _unroll(name, hyper, params, states, data, steps=3, step_all=None):
    """Meta-objective: a validation loss after ``steps`` differentiable inner steps (of the
    single-tensor rule, or of ``step_all``)."""

    def train_loss(ps):
        return _model_loss(ps, data)

    for _ in range(steps):
        grads = _grads(train_loss, params, create_graph=True)
        params, states = (step_all or _step_all)(name, params, grads, states, hyper)
    validation = _model_loss(params, (data[0].flip(0), data[1]))
    return validation + 0.1 * sum((p**2).sum() for p in params), states


def _warm_states(name, hyper, params, data, steps):
    """Params and states after ``steps`` detached inner steps (later-step branches: RAdam's
    rectification from step 6, ASGD averaging, Rprop sign flips)."""
    states = [{} for _ in params]
    for _ in range(steps):
        grads = _grads(lambda ps: _model_loss(ps, data), params)
        params, states = _step_all(name, params, grads, states, hyper)
    return params, states


@pytest.mark.parametrize("warm_steps", [0, 5], ids=["cold", "warm"])
@pytest.mark.parametrize(("name", "hyper"), CASES, ids=CASE_IDS)
def test_gradcheck_through_unrolled_steps(name, hyper, warm_steps):
    """Float64 gradcheck of a 3-step unroll w.r.t. the initial params and a tensor lr."""
    dtype = torch.float64
    data = _data(dtype)
    params, states = _warm_states(name, hyper, _init_params(dtype), data, warm_steps)

    def meta_objective(lr, *initial):
        return _unroll(name, {**hyper, "lr": lr}, list(initial), states, data)[0]

    lr = torch.tensor(float(_all_hyperparameters(name, hyper)["lr"]), dtype=dtype)
    inputs = (lr.requires_grad_(), *(p.detach().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(meta_objective, inputs)
    if not warm_steps:
        assert torch.autograd.gradgradcheck(meta_objective, inputs)


@pytest.mark.parametrize(("name", "hyper"), CASES, ids=CASE_IDS)
def test_meta_gradients_finite_when_a_gradient_is_always_zero(name, hyper):
    """A dead input feature keeps some second moments exactly 0; meta-gradients stay finite."""
    dtype = torch.float64
    data = _data(dtype, dead_feature=True)
    params, states = _warm_states(name, hyper, _init_params(dtype), data, 3)
    initial = [p.detach().requires_grad_() for p in params]
    lr = torch.tensor(float(_all_hyperparameters(name, hyper)["lr"]), dtype=dtype)
    lr.requires_grad_()
    objective, _ = _unroll(name, {**hyper, "lr": lr}, initial, states, data)
    # After warm-up, Rprop no longer reads lr (it only seeds the step sizes): unused is fine.
    meta_grads = torch.autograd.grad(objective, [lr, *initial], allow_unused=True)
    for meta_grad in meta_grads:
        assert meta_grad is None or torch.isfinite(meta_grad).all()
    assert all(g is not None for g in meta_grads[1:])


@pytest.mark.parametrize(("name", "hyper"), CASES, ids=CASE_IDS)
def test_tensor_hyperparameters_match_floats_and_get_grads(name, hyper):
    dtype = torch.float64
    data = _data(dtype)
    floats = _all_hyperparameters(name, hyper)
    tensors, leaves = _as_tensors(floats, dtype)
    params = [p.requires_grad_() for p in _init_params(dtype)]

    ours_float, states_float = _unroll(name, floats, params, [{} for _ in params], data)
    ours_tensor, states_tensor = _unroll(name, tensors, params, [{} for _ in params], data)
    torch.testing.assert_close(ours_tensor, ours_float, rtol=1e-10, atol=1e-12)
    for state_float, state_tensor in zip(states_float, states_tensor):
        # A tensor momentum of value 0 still keeps a buffer (no branching on tensor values).
        extra = {"momentum_buffer"} if floats.get("momentum", None) == 0 else set()
        assert set(state_tensor) - set(state_float) == extra
        assert set(state_float) <= set(state_tensor)
        for key, value in state_float.items():
            expected = torch.as_tensor(value, dtype=dtype)
            torch.testing.assert_close(
                torch.as_tensor(state_tensor[key], dtype=dtype), expected, rtol=1e-10, atol=1e-12
            )

    # Every hyperparameter reaches the parameters or the state; its gradient must exist.
    tensor_state = [v for s in states_tensor for v in s.values() if isinstance(v, torch.Tensor)]
    objective = ours_tensor + sum(v.sum() for v in tensor_state)
    grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    assert all(g is not None and torch.isfinite(g) for g in grads)


@over_numerics
@pytest.mark.parametrize("tensor_hyper", [False, True], ids=["floats", "tensors"])
@pytest.mark.parametrize(("name", "hyper"), CASES, ids=CASE_IDS)
def test_rules_do_not_mutate_inputs(name, hyper, tensor_hyper, numerics):
    dtype = torch.float64
    data = _data(dtype)
    hyper_tensors = []
    if tensor_hyper:
        hyper, hyper_tensors = _as_tensors(_all_hyperparameters(name, hyper), dtype)
    params, states = _warm_states(name, hyper, _init_params(dtype), data, 2)
    param = params[0].detach().requires_grad_()
    grad = torch.randn_like(param)
    for state in ({}, states[0]):
        snapshot = dict(state)
        state_tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors = [param, grad, *state_tensors, *hyper_tensors]
        before = [(t.detach().clone(), t._version) for t in tensors]

        new_param, new_state = RULES[name].select(numerics)(param, grad, state, **hyper)

        assert new_state is not state and new_param is not param
        assert state.keys() == snapshot.keys()
        assert all(state[key] is snapshot[key] for key in state)
        for tensor, (value, version) in zip(tensors, before):
            assert tensor._version == version
            torch.testing.assert_close(tensor.detach(), value, rtol=0, atol=0)


@over_numerics
@pytest.mark.parametrize(("name", "hyper"), CASES, ids=CASE_IDS)
def test_vmap_over_tasks_with_per_task_hyperparameters(name, hyper, numerics):
    """vmap over a task dim, every float hyperparameter a per-task tensor, equals one
    float-hyperparameter run per task."""
    dtype = torch.float64
    factors = (1.0, 0.9, 0.8)
    generator = torch.Generator().manual_seed(3)
    param = torch.randn(len(factors), 4, generator=generator, dtype=dtype)
    grads = torch.randn(STEPS, len(factors), 4, generator=generator, dtype=dtype)
    rule = RULES[name].select(numerics)
    task_hypers = [
        _map_numbers(_all_hyperparameters(name, hyper), lambda v, f=f: v * f) for f in factors
    ]
    flags = {k: v for k, v in task_hypers[0].items() if isinstance(v, bool)}

    def stack(*values):
        if isinstance(values[0], tuple):
            return tuple(stack(*column) for column in zip(*values))
        return torch.tensor(values, dtype=dtype)

    batched_hyper = {
        key: stack(*(h[key] for h in task_hypers)) for key in task_hypers[0] if key not in flags
    }

    # Python scalars in the state (the step) are the same for every task, and vmap returns
    # only tensors, so they are carried around it.
    python_state = {}

    def one_task(p, g, tensor_state, numbers, *, carried):
        new_p, new_s = rule(p, g, {**carried, **tensor_state}, **numbers, **flags)
        python_state.update({k: v for k, v in new_s.items() if not torch.is_tensor(v)})
        return new_p, {k: v for k, v in new_s.items() if torch.is_tensor(v)}

    batched_param, tensor_state = param, {}
    for grad in grads:
        # vmap batches positional arguments only; the keyword passes through unbatched.
        batched_param, tensor_state = torch.func.vmap(one_task)(
            batched_param, grad, tensor_state, batched_hyper, carried=dict(python_state)
        )

    # higher's Adagrad divides a Python lr by torch.optim's float32 step counter (float32
    # arithmetic), a float64 tensor lr by it in float64: per-task floats round to float32.
    float32_lr = numerics == "higher" and name == "adagrad"
    tolerance = {"rtol": 1e-6, "atol": 1e-8} if float32_lr else {"rtol": 1e-10, "atol": 1e-12}
    for task, task_hyper in enumerate(task_hypers):
        single, state = param[task], {}
        for grad in grads:
            single, state = rule(single, grad[task], state, **task_hyper)
        torch.testing.assert_close(batched_param[task], single, **tolerance)


@pytest.mark.slow
# Dynamo reads .grad of the non-leaf parameter while building guards; the warning is its own.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("tensor_hyper", [False, True], ids=["floats", "tensors"])
@pytest.mark.parametrize(("name", "hyper"), CASES, ids=CASE_IDS)
def test_compiles_with_fullgraph_without_recompiling_every_step(name, hyper, tensor_hyper):
    """One graph for the empty state, one for step 2, then a dynamic step for the rest (and
    at most one more where a Python branch on the step flips, as RAdam's rectification)."""
    dtype = torch.float64
    if tensor_hyper:
        hyper, _ = _as_tensors(_all_hyperparameters(name, hyper), dtype)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    # aot_eager traces forward and backward like inductor without generating C++ code.
    compiled = torch.compile(RULES[name].update, fullgraph=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(4)
    param = torch.randn(5, generator=generator, dtype=dtype, requires_grad=True)
    eager_param, eager_state = param, {}
    compiled_param, compiled_state = param, {}
    for _ in range(STEPS):
        grad = torch.randn(5, generator=generator, dtype=dtype)
        eager_param, eager_state = RULES[name].update(eager_param, grad, eager_state, **hyper)
        compiled_param, compiled_state = compiled(compiled_param, grad, compiled_state, **hyper)
        torch.testing.assert_close(compiled_param, eager_param, rtol=1e-10, atol=1e-12)
    assert counters["stats"]["unique_graphs"] <= 4
    (meta_grad,) = torch.autograd.grad(compiled_param.sum(), param)
    assert torch.isfinite(meta_grad).all()


# ---------------------------------------------------------------------------------------------
# higher 0.2.1's numerics, and elementwise hyperparameters in both.
# ---------------------------------------------------------------------------------------------


def test_every_optimizer_higher_shipped_has_a_higher_variant():
    assert {name for name, rule in RULES.items() if rule.higher is not None} == IN_HIGHER
    for name in IN_HIGHER:
        rule = RULES[name]
        assert rule.select("higher") is rule.higher and rule.select("torch") is rule.update
        assert inspect.signature(rule.higher) == inspect.signature(rule.update)
    assert RULES["adamw"].select("higher") is RULES["adamw"].update


@over_numerics
@pytest.mark.parametrize(("name", "hyper"), CASES, ids=CASE_IDS)
def test_elementwise_hyperparameters_equal_one_run_per_coordinate(name, hyper, numerics):
    """Every float hyperparameter shaped like the weight (a different value per coordinate)
    gives, coordinate by coordinate, what that coordinate's own values give."""
    dtype = torch.float64
    rule = RULES[name].select(numerics)
    coordinates = 4
    generator = torch.Generator().manual_seed(4)
    param = torch.randn(coordinates, generator=generator, dtype=dtype)
    grads = torch.randn(STEPS, coordinates, generator=generator, dtype=dtype)
    factors = torch.linspace(0.7, 1.0, coordinates, dtype=dtype)
    floats = _all_hyperparameters(name, hyper)
    elementwise = _map_numbers(floats, lambda v: torch.as_tensor(v, dtype=dtype) * factors)

    def coordinate(i):
        return _map_numbers(floats, lambda v: torch.as_tensor(v, dtype=dtype) * factors[i])

    batched, state = param, {}
    for grad in grads:
        batched, state = rule(batched, grad, state, **elementwise)
    assert batched.shape == param.shape
    for i in range(coordinates):
        single, single_state = param[i : i + 1], {}
        for grad in grads:
            single, single_state = rule(single, grad[i : i + 1], single_state, **coordinate(i))
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Multi-tensor variants (UpdateRule.foreach): equal to torch.optim's foreach path and to the
# single-tensor rule, values and meta-gradients.

FOREACH_CASES = [(name, hyper) for name, hyper in CASES if RULES[name].foreach is not None]
FOREACH_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(FOREACH_CASES)]


def _step_all_foreach(name, params, grads, states, hyper):
    params, states = RULES[name].foreach(list(params), list(grads), list(states), **hyper)
    return list(params), list(states)


def test_foreach_variants_cover_torch_optims_foreach_paths():
    # Every optimizer with a multi-tensor variant here has a foreach kernel in torch.optim to
    # compare it with, and the ones the issue asked for have one.
    with_foreach = {name for name, rule in RULES.items() if rule.foreach is not None}
    assert {"sgd", "adam", "adamw"} <= with_foreach
    for name in with_foreach:
        assert "foreach" in inspect.signature(OPTIMIZERS[name]).parameters
        assert any(n == name for n, _ in FOREACH_CASES)


@pytest.mark.parametrize("warm_steps", [0, 3], ids=["cold", "warm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "hyper"), torch_cases(FOREACH_CASES, FOREACH_IDS))
def test_foreach_trajectory_equals_torch_optim_foreach(name, hyper, dtype, warm_steps):
    """Bit for bit: the same kernels in the same order as ``torch.optim.X(foreach=True)``."""
    data = _data(dtype)
    generator = torch.Generator().manual_seed(3)
    # Several shapes, some long enough for the vectorised CPU kernels.
    params = [torch.randn(*shape, generator=generator, dtype=dtype) for shape in [(3, 40), (40,)]]

    def loss_fn(ps):
        weight, bias = ps
        return ((torch.tanh(data[0] @ weight + bias).sum(-1) - data[1]) ** 2).mean()

    with _default_dtype(dtype):
        leaves = [p.clone().requires_grad_() for p in params]
        optimizer = OPTIMIZERS[name](leaves, **hyper, foreach=True)
        ours, states = [p.clone() for p in params], [{} for _ in params]
        if warm_steps:
            _run_torch(optimizer, loss_fn, leaves, warm_steps)
            ours = [p.detach().clone() for p in leaves]
            states = [_import_state(optimizer.state[p]) for p in leaves]
        theirs = _run_torch(optimizer, loss_fn, leaves, STEPS)
        trajectory = []
        for _ in range(STEPS):
            ours, states = _step_all_foreach(name, ours, _grads(loss_fn, ours), states, hyper)
            trajectory.append(ours)
    # torch 2.0's multi-tensor Adam and AdamW decay the first moment with mul_ and add_; the
    # rules do it with lerp_, as torch >= 2.1 does: the same values to within a few units in
    # the last place after eleven steps.
    exact = name not in ("adam", "adamw") or torch.__version__ >= "2.1"
    tolerance = {"rtol": 0, "atol": 0}
    if not exact:
        tolerance = {key: 10 * value for key, value in TOLERANCES[dtype].items()}
    _assert_trajectories_close(trajectory, theirs, **tolerance)
    for state, leaf in zip(states, leaves):
        _assert_states_close(state, optimizer.state[leaf], **tolerance)


@needs_foreach_autograd
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize(("name", "hyper"), FOREACH_CASES, ids=FOREACH_IDS)
def test_foreach_meta_gradients_equal_single_tensor_rule(name, hyper, tensor_lr):
    dtype = torch.float64
    data = _data(dtype)
    lr = float(_all_hyperparameters(name, hyper)["lr"])
    results = []
    for step_all in (_step_all, _step_all_foreach):
        initial = [p.requires_grad_() for p in _init_params(dtype)]
        leaves = list(initial)
        if tensor_lr:
            leaves.append(torch.tensor(lr, dtype=dtype, requires_grad=True))
        run_hyper = {**hyper, "lr": leaves[-1] if tensor_lr else lr}
        states = [{} for _ in initial]
        objective, _ = _unroll(name, run_hyper, initial, states, data, 4, step_all)
        results.append((objective, torch.autograd.grad(objective, leaves)))
    (single, single_grads), (multi, multi_grads) = results
    assert torch.equal(multi, single)
    torch.testing.assert_close(multi_grads, single_grads, rtol=1e-12, atol=1e-14)


@needs_foreach_autograd
@pytest.mark.parametrize(("name", "hyper"), FOREACH_CASES, ids=FOREACH_IDS)
def test_foreach_gradcheck_through_unrolled_steps(name, hyper):
    """Float64 gradcheck of a 3-step multi-tensor unroll w.r.t. the initial params and a
    tensor lr, including a coordinate whose second moment stays exactly 0."""
    dtype = torch.float64
    data = _data(dtype, dead_feature=True)

    def meta_objective(lr, *initial):
        states = [{} for _ in initial]
        run_hyper = {**hyper, "lr": lr}
        return _unroll(name, run_hyper, list(initial), states, data, 3, _step_all_foreach)[0]

    lr = torch.tensor(float(_all_hyperparameters(name, hyper)["lr"]), dtype=dtype)
    inputs = (lr.requires_grad_(), *(p.requires_grad_() for p in _init_params(dtype)))
    assert torch.autograd.gradcheck(meta_objective, inputs)


def test_select_foreach_only_for_eager_torch_numerics_and_number_hyperparameters():
    adam = RULES["adam"]
    lr = torch.tensor(0.1, requires_grad=True)
    assert adam.select_foreach("torch", {"lr": 0.1, "betas": (0.9, 0.99)}) is adam.foreach
    assert adam.select_foreach("torch", {"lr": lr, "betas": (0.9, 0.99)}) is adam.foreach
    assert adam.select_foreach("torch", {"lr": 0.1, "betas": (lr, 0.99)}) is None
    assert adam.select_foreach("higher", {"lr": 0.1}) is None
    assert RULES["sgd"].select_foreach("torch", {"lr": 0.1, "momentum": lr}) is None
    assert RULES["rprop"].select_foreach("torch", {"lr": 0.1}) is None


@pytest.mark.parametrize(("name", "hyper"), FOREACH_CASES, ids=FOREACH_IDS)
def test_foreach_with_partial_state_equals_single_tensor_rule(name, hyper):
    """A group where only some tensors have state (a warm start from a torch.optim optimizer
    that skipped a weight without gradient) still steps as the single-tensor rule does."""
    dtype = torch.float64
    data = _data(dtype)
    params, states = _warm_states(name, hyper, _init_params(dtype), data, 2)
    states[1] = {}
    grads = _grads(lambda ps: _model_loss(ps, data), params)
    single = _step_all(name, params, grads, states, hyper)
    multi = _step_all_foreach(name, params, grads, states, hyper)
    for ours, theirs in zip(multi[0], single[0]):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(multi[1], single[1]):
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs[key]))
