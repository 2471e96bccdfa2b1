"""``higher_func.optim`` against ``torch.optim``, ``higher`` 0.2.1 and finite differences.

One registry, ``CASES``, lists every supported optimizer with hyperparameters that reach its
options (momentum, Nesterov, AMSGrad, centering, decoupled decay, ``maximize``...), each over
two parameter groups that differ in at least one hyperparameter. The same invariants run over
all of it:

* without tracking, a differentiable optimizer retraces ``torch.optim`` (fresh or warm state);
* its unrolled steps are differentiable (``gradcheck`` on the initial weights and on a learned
  learning rate), and agree with ``higher`` where ``higher`` has the optimizer;
* overrides, frozen/unused/unowned weights, first-order mode, ``grad_callback`` and state
  export behave the same way for every optimizer.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import higher
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from zoo import with_params

import higher_func
from higher_func import _compat, _rules
from higher_func._compat import pytree
from higher_func.optim import (
    DifferentiableOptimizer,
    apply_trainable_opt_params,
    create_diff_optim,
    get_diff_optim,
    get_trainable_opt_params,
    register_optim,
)

# ---------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------

#: Param-group keys that are switches, never hyperparameters one could learn.
FLAGS = {
    "maximize",
    "nesterov",
    "amsgrad",
    "centered",
    "decoupled_weight_decay",
    "capturable",
    "foreach",
    "fused",
    "differentiable",
}


@dataclasses.dataclass(frozen=True)
class OptCase:
    """One optimizer setting: constructor keywords, and what the second parameter group changes.

    ``in_higher`` marks the settings ``higher`` 0.2.1 can reproduce (it lacks AdamW, NAdam and
    RAdam, and ignores ``maximize`` and ``decoupled_weight_decay``).
    """

    id: str
    opt_type: type
    kwargs: dict[str, Any]
    second_group: dict[str, Any]
    in_higher: bool = True

    def make(self, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        """The ``torch.optim`` optimizer over ``params``, split in two groups (first half, rest).

        ``foreach=False`` pins the single-tensor kernels the rules mirror.
        """
        params = list(params)
        half = len(params) // 2
        groups = [{"params": params[:half]}, {"params": params[half:], **self.second_group}]
        return self.opt_type(groups, foreach=False, **self.kwargs)

    def without_decay(self) -> OptCase:
        """The same setting with every term that shrinks the weights themselves removed, so an
        update depends on the weights only through the gradient."""
        drop = {"weight_decay": 0, "lambd": 0}

        def strip(d: dict[str, Any]) -> dict[str, Any]:
            return {k: (drop[k] if k in drop else v) for k, v in d.items()}

        kwargs = strip(self.kwargs)
        kwargs.update({k: 0 for k in drop if _accepts(self.opt_type, k)})
        return dataclasses.replace(self, kwargs=kwargs, second_group=strip(self.second_group))


def _accepts(opt_type: type, key: str) -> bool:
    return key in inspect.signature(opt_type).parameters


_ALL_CASES = [
    OptCase("sgd", torch.optim.SGD, {"lr": 0.1}, {"lr": 0.05}),
    OptCase(
        "sgd_momentum_decay",
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.5},
    ),
    OptCase(
        "sgd_nesterov",
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"momentum": 0.7},
    ),
    OptCase(
        "sgd_maximize",
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.5, "maximize": True},
        {"lr": 0.02},
        False,
    ),
    OptCase("adam", torch.optim.Adam, {"lr": 0.01}, {"lr": 0.02, "betas": (0.8, 0.99)}),
    OptCase(
        "adam_amsgrad_decay",
        torch.optim.Adam,
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
        {"eps": 1e-6, "weight_decay": 0.0},
    ),
    OptCase(
        "adam_maximize", torch.optim.Adam, {"lr": 0.01, "maximize": True}, {"lr": 0.005}, False
    ),
    OptCase(
        "adam_decoupled",
        torch.optim.Adam,
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"lr": 0.02},
        False,
    ),
    OptCase("adamw", torch.optim.AdamW, {"lr": 0.01}, {"weight_decay": 0.1}, False),
    OptCase(
        "adamw_amsgrad",
        torch.optim.AdamW,
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05},
        {"lr": 0.03, "betas": (0.85, 0.95)},
        False,
    ),
    OptCase(
        "adadelta",
        torch.optim.Adadelta,
        {"lr": 1.0, "rho": 0.8, "weight_decay": 0.01},
        {"eps": 1e-5},
    ),
    OptCase(
        "adadelta_maximize",
        torch.optim.Adadelta,
        {"lr": 0.5, "maximize": True},
        {"rho": 0.95},
        False,
    ),
    OptCase(
        "adagrad",
        torch.optim.Adagrad,
        {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.01},
        {"lr": 0.05, "initial_accumulator_value": 0.0, "eps": 1e-8},
    ),
    OptCase(
        "adamax", torch.optim.Adamax, {"lr": 0.02, "weight_decay": 0.01}, {"betas": (0.8, 0.99)}
    ),
    OptCase(
        "asgd",
        torch.optim.ASGD,
        # A small t0 starts the averaging (mu < 1) within a few steps.
        {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 2, "weight_decay": 0.01},
        {"lr": 0.1, "t0": 1e6},
    ),
    OptCase("rmsprop", torch.optim.RMSprop, {"lr": 0.01}, {"alpha": 0.9}),
    OptCase(
        "rmsprop_centered_momentum",
        torch.optim.RMSprop,
        {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.01},
        {"lr": 0.005, "momentum": 0},
    ),
    OptCase(
        "rprop",
        torch.optim.Rprop,
        {"lr": 0.01, "etas": (0.4, 1.3), "step_sizes": (1e-4, 0.05)},
        {"lr": 0.02},
    ),
    OptCase(
        "rprop_maximize", torch.optim.Rprop, {"lr": 0.01, "maximize": True}, {"lr": 0.005}, False
    ),
    OptCase("nadam", torch.optim.NAdam, {"lr": 0.01}, {"momentum_decay": 0.01}, False),
    OptCase(
        "nadam_decoupled",
        torch.optim.NAdam,
        {"lr": 0.01, "weight_decay": 0.05, "decoupled_weight_decay": True},
        {"betas": (0.8, 0.99)},
        False,
    ),
    # beta2 = 0.9 makes RAdam's rectified branch start at step 6, within the trajectories.
    OptCase("radam", torch.optim.RAdam, {"lr": 0.01, "betas": (0.9, 0.9)}, {"lr": 0.02}, False),
    OptCase(
        "radam_decoupled",
        torch.optim.RAdam,
        {"lr": 0.01, "weight_decay": 0.05, "decoupled_weight_decay": True},
        {"eps": 1e-6},
        False,
    ),
]
# Only the options the installed torch.optim has: older ones lack some (torch 2.0's NAdam and
# RAdam have no decoupled_weight_decay or maximize; Adam's decoupled_weight_decay is newer).
CASES = [
    c for c in _ALL_CASES if all(_accepts(c.opt_type, k) for k in (*c.kwargs, *c.second_group))
]
HIGHER_CASES = [c for c in CASES if c.in_higher]

over_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
over_dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])

# higher 0.2.1 warns on purpose whenever its RMSprop or Rprop is created.
HIGHER_RMSPROP_WARNING = pytest.mark.filterwarnings(
    "ignore:Differentiable RMSprop suffers from gradient correctness issues:UserWarning"
)
HIGHER_RPROP_WARNING = pytest.mark.filterwarnings(
    "ignore:Differentiable Rprop \\(correctly\\) yields zero second order:UserWarning"
)


def test_registry_covers_every_optimizer():
    # Every entry of the one registry has a case here, and get_diff_optim turns it into the
    # class made from its rule, exported under higher's name.
    assert {c.opt_type for c in CASES} == set(_rules.OPTIMIZERS)
    for case in CASES:
        model = _mlp(torch.float64)
        diffopt = get_diff_optim(case.make(model.parameters()), model.parameters())
        name = f"Differentiable{case.opt_type.__name__}"
        assert type(diffopt) is getattr(higher_func.optim, name)
        assert type(diffopt).__name__ == name and name in higher_func.optim.__all__
        assert type(diffopt).rule is _rules.OPTIMIZERS[case.opt_type]
        assert higher_func.optim._opt_mapping[case.opt_type] is type(diffopt)


@pytest.mark.parametrize("opt_type", list(_rules.OPTIMIZERS), ids=lambda t: t.__name__)
def test_every_registered_optimizer_is_documented(opt_type):
    root = pathlib.Path(__file__).resolve().parent.parent
    api = (root / "docs" / "api" / "optim.md").read_text()
    assert f"`Differentiable{opt_type.__name__}` | `torch.optim.{opt_type.__name__}`" in api
    assert f"`Differentiable{opt_type.__name__}`" in (root / "docs" / "optimizers.md").read_text()


def test_rules_are_keyed_by_their_optimizer_class_name():
    assert _rules.RULES == {t.__name__.lower(): r for t, r in _rules.OPTIMIZERS.items()}


# ---------------------------------------------------------------------------------------------
# Models, data and comparisons.
# ---------------------------------------------------------------------------------------------


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    # Building a model or batch never shifts the random numbers a test draws afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _mlp(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A smooth (tanh) MLP, not the zoo's ReLU one: finite-difference hypergradients and the
    float64 tolerances below need a loss without kinks."""
    return _seeded(
        seed, lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    )


def _tiny(dtype: torch.dtype = torch.float64) -> nn.Module:
    """Nine weights: small enough for gradcheck, nonlinear enough for second derivatives."""
    return _seeded(1, lambda: nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(dtype))


def _batches(dtype: torch.dtype, n: int, features: int = 3, outputs: int = 2, seed: int = 2):
    """``n`` support batches and one query batch, as ``(x, y)`` pairs."""

    def make():
        return [
            (torch.randn(5, features, dtype=dtype), torch.randn(5, outputs, dtype=dtype))
            for _ in range(n + 1)
        ]

    batches = _seeded(seed, make)
    return batches[:n], batches[n]


def _loss(model: Any, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def _functional_loss(model: nn.Module, params: Sequence[torch.Tensor], batch) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    x, y = batch
    return F.mse_loss(functional_call(model, dict(zip(names, params)), (x,)), y)


def _torch_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> None:
    opt.zero_grad()
    _loss(model, batch).backward()
    opt.step()


def assert_rel_close(actual, expected, rtol: float, atol: float = 0.0) -> None:
    """Tensor by tensor, ``|actual - expected| <= rtol * |expected| + atol`` in the 2-norm
    (robust to the odd coordinate that is close to 0)."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = a.detach(), e.detach()
        assert a.shape == e.shape and a.dtype == e.dtype, (i, a.shape, e.shape, a.dtype, e.dtype)
        error = torch.linalg.vector_norm(a - e).item()
        scale = max(torch.linalg.vector_norm(e).item(), 1e-12)
        assert error <= rtol * scale + atol, (
            f"tensor {i}: error {error:.3g}, relative {error / scale:.3g} > {rtol} (+ {atol})"
        )


def _grads_of(params) -> list[torch.Tensor]:
    return [p.grad for p in params]


# ---------------------------------------------------------------------------------------------
# (1) Trajectories: torch.optim, fresh and warm.
# ---------------------------------------------------------------------------------------------

STEPS = 6


def _check_trajectory(case: OptCase, dtype: torch.dtype, warm: int, rtol: float) -> None:
    model = _mlp(dtype)
    opt = case.make(model.parameters())
    warmup, _ = _batches(dtype, warm, seed=5)
    for batch in warmup:
        _torch_step(model, opt, batch)
    # The torch.optim twin: the same weights and the same state, after the warm-up.
    twin, twin_opt = copy.deepcopy((model, opt))
    support, _ = _batches(dtype, STEPS)
    with higher_func.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
            _torch_step(twin, twin_opt, batch)
            assert_rel_close(fmodel.parameters(), twin.parameters(), rtol=rtol)


@pytest.mark.parametrize("warm", [0, 3], ids=["fresh", "warm"])
@over_dtypes
@over_cases
def test_trajectory_matches_torch_optim(case, dtype, warm):
    _check_trajectory(case, dtype, warm, rtol=1e-6)


FOREACH_CASES = [c for c in CASES if _rules.OPTIMIZERS[c.opt_type].foreach is not None]
needs_foreach_autograd = pytest.mark.skipif(
    not _compat.foreach_differentiable(),
    reason=f"torch {torch.__version__} cannot differentiate torch._foreach_* ops (torch >= 2.1 "
    "can): tracked steps take the single-tensor rule",
)


@needs_foreach_autograd
@pytest.mark.parametrize("warm", [0, 3], ids=["fresh", "warm"])
@over_dtypes
@pytest.mark.parametrize("case", FOREACH_CASES, ids=lambda c: c.id)
def test_multi_tensor_steps_equal_torch_optim_foreach_bitwise(case, dtype, warm):
    """The optimizers with a multi-tensor rule run it, one call per group, and round exactly
    as ``torch.optim.X(..., foreach=True)`` does."""
    model = _mlp(dtype)
    opt = case.make(model.parameters())
    for group in opt.param_groups:
        group["foreach"] = True
    warmup, _ = _batches(dtype, warm, seed=5)
    for batch in warmup:
        _torch_step(model, opt, batch)
    twin, twin_opt = copy.deepcopy((model, opt))
    support, _ = _batches(dtype, STEPS)
    with higher_func.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for batch in support:
            new_weights = diffopt.step(_loss(fmodel, batch))
            _torch_step(twin, twin_opt, batch)
            for ours, theirs in zip(fmodel.parameters(), twin.parameters()):
                assert torch.equal(ours, theirs)
            # One autograd node per operation for a whole group: its weights share it.
            for mapping in diffopt._group_to_param_list:
                assert len({id(new_weights[i].grad_fn) for i in mapping}) == 1


@pytest.mark.parametrize("case", FOREACH_CASES, ids=lambda c: c.id)
def test_multi_tensor_rule_runs_by_default_only_where_nothing_is_differentiated(case):
    """Tracked, the single-tensor rule runs unless the optimizer asks for ``foreach=True``:
    torch's multi-tensor ops save their inputs, the step's gradients included, for backward
    (the single-tensor ops save none), which would keep every step's gradients alive until
    the meta-backward."""
    model = _mlp(torch.float64)
    batch = _batches(torch.float64, 1)[1]
    rule = higher_func.optim._opt_mapping[case.opt_type].rule
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return rule.foreach(*args, **kwargs)

    for foreach, track, multi in [
        (None, True, False),
        (None, False, True),
        (True, True, _compat.foreach_differentiable()),  # torch 2.0: the single-tensor rule
        (False, False, False),
    ]:
        opt = case.make(model.parameters())
        for group in opt.param_groups:
            group["foreach"] = foreach
        with higher_func.innerloop_ctx(model, opt, track_higher_grads=track) as (fmodel, diffopt):
            diffopt.rule = rule._replace(foreach=spy)
            calls.clear()
            diffopt.step(_loss(fmodel, batch))
            assert bool(calls) == multi, (foreach, track)


def test_step_records_its_own_results_without_rechecking(monkeypatch):
    # The rule's results keep shape, dtype and device: the patched module takes them unchecked.
    model = _mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = _batches(torch.float32, 1)[1]
    with higher_func.innerloop_ctx(model, opt) as (fmodel, diffopt):

        def refuse(self, params):
            raise AssertionError("update_params re-checked the optimizer's own results")

        monkeypatch.setattr(type(fmodel), "update_params", refuse)
        new_weights = diffopt.step(_loss(fmodel, batch))
        assert all(a is b for a, b in zip(fmodel.parameters(), new_weights))


def test_step_checks_weights_passed_in_and_modules_without_record():
    model = _mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = _batches(torch.float32, 1)[1]
    with higher_func.innerloop_ctx(model, opt) as (fmodel, diffopt):
        # Weights given to step() are checked by the module, and a failed step changes nothing.
        doubles = [p.double() for p in fmodel.parameters()]
        before = list(fmodel.parameters())
        with pytest.raises((TypeError, ValueError), match="dtype|float"):
            diffopt.step(doubles[0].sum() * 0 + _loss(fmodel, batch).double(), params=doubles)
        assert all(a is b for a, b in zip(fmodel.parameters(), before))

    class Recorder:
        """A patched module of another library: only higher's public update_params."""

        num_tasks = None

        def __init__(self, params):
            self.fast_params, self.updates = list(params), 0

        def update_params(self, params):
            self.fast_params, self.updates = list(params), self.updates + 1

    weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
    recorder = Recorder(weights)
    diffopt = higher_func.optim.get_diff_optim(opt, model.parameters(), fmodel=recorder)
    new_weights = diffopt.step(sum((w**2).sum() for w in weights))
    assert recorder.updates == 1 and recorder.fast_params == new_weights


def _distinct_nodes(weights) -> bool:
    # The nodes are held while compared: torch 2.0 makes a new Python object at each grad_fn
    # read, and a freed one's id is reused at once.
    nodes = [w.grad_fn for w in weights]
    return len({id(n) for n in nodes}) == len(nodes)


@over_cases
def test_single_tensor_rule_runs_where_no_multi_tensor_one_applies(case):
    model = _mlp(torch.float64)
    opt = case.make(model.parameters())
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    override = {"lr": [lr]}
    if _rules.OPTIMIZERS[case.opt_type].foreach is not None:
        # A tensor beta (or momentum) is not one the multi-tensor rules take.
        key = "betas" if "betas" in opt.defaults else "momentum"
        value = opt.defaults[key]
        override = {
            key: [
                tuple(torch.tensor(float(v)) for v in value)
                if key == "betas"
                else torch.tensor(float(value) or 0.5)
            ]
        }
    support, _ = _batches(torch.float64, 2)
    with higher_func.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for batch in support:
            new_weights = diffopt.step(_loss(fmodel, batch))
            assert _distinct_nodes(new_weights)
        with higher_func.optim.numerics("higher"):
            new_weights = diffopt.step(_loss(fmodel, support[0]))
            assert _distinct_nodes(new_weights)


#: Optimizers whose torch.optim kernel keeps a scalar state in float32 whatever the weights'
#: dtype (ASGD's eta and mu, NAdam's mu_product), which the rules keep as Python floats.
TORCH_ROUNDS_TO_FLOAT32 = (torch.optim.ASGD, torch.optim.NAdam)


def _rtol_vs_torch(case: OptCase) -> float:
    """How close a float64 trajectory must be to torch.optim's: nothing but torch.optim's own
    float32 scalars (unit roundoff 6e-8) may separate them."""
    return 1e-7 if case.opt_type in TORCH_ROUNDS_TO_FLOAT32 else 1e-10


@pytest.mark.parametrize("warm", [0, 3], ids=["fresh", "warm"])
@over_cases
def test_float64_trajectory_has_float64_accuracy(case, warm):
    # 1e-6 would hide a hyperparameter that a rule rounds to float32.
    _check_trajectory(case, torch.float64, warm, rtol=_rtol_vs_torch(case))


# ---------------------------------------------------------------------------------------------
# (2) Second order: gradcheck through the unroll.
# ---------------------------------------------------------------------------------------------


def _unrolled_query_loss(case: OptCase, warm: int = 0, steps: int = 3):
    """``f(*initial weights) -> query loss`` after ``steps`` differentiable steps, on ``_tiny``."""
    model = _tiny()
    opt = case.make(model.parameters())
    warmup, _ = _batches(torch.float64, warm, features=2, outputs=1, seed=5)
    for batch in warmup:
        _torch_step(model, opt, batch)
    support, query = _batches(torch.float64, steps, features=2, outputs=1)

    def f(*params, override=None):
        diffopt = get_diff_optim(opt, model.parameters(), override=override)
        params = list(params)
        for batch in support:
            params = diffopt.step(_functional_loss(model, params, batch), params=params)
        return _functional_loss(model, params, query)

    initial = [p.detach().clone().requires_grad_() for p in model.parameters()]
    return f, initial, opt


@pytest.mark.parametrize("warm", [0, 5], ids=["fresh", "warm"])
@over_cases
def test_gradcheck_initial_weights(case, warm):
    # The warm start runs RAdam's rectified branch and every rule on imported torch.optim state.
    f, initial, _ = _unrolled_query_loss(case, warm=warm)
    assert torch.autograd.gradcheck(f, initial)


@over_cases
def test_gradcheck_learned_lr(case):
    f, initial, _ = _unrolled_query_loss(case)
    initial = [p.detach() for p in initial]
    lr = torch.tensor(0.03, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda lr: f(*initial, override={"lr": [lr]}), (lr,))


@over_cases
def test_gradcheck_every_learnable_hyperparameter(case):
    # Every number in every group becomes a float64 tensor: this differentiates the rules'
    # tensor code paths (RAdam's rectified branch too, thanks to the warm start). eps stays a
    # number: Adadelta's first step takes sqrt(0 + eps), and a finite difference of 1e-6
    # around eps = 1e-6 would land on the singularity of the square root.
    f, initial, opt = _unrolled_query_loss(case, warm=5)
    initial = [p.detach() for p in initial]
    keys = sorted(set(get_trainable_opt_params(opt)) - {"eps"})
    values = [float(x) for k in keys for g in opt.param_groups for x in _leaves(g[k])]
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]

    def query_loss(*leaves):
        it = iter(leaves)
        override = {
            k: [_map_leaves(g[k], lambda _: next(it)) for g in opt.param_groups] for k in keys
        }
        return f(*initial, override=override)

    assert torch.autograd.gradcheck(query_loss, leaves)


# ---------------------------------------------------------------------------------------------
# (3) Meta-gradients: higher 0.2.1 as the oracle.
# ---------------------------------------------------------------------------------------------


def _maml(innerloop_ctx, case: OptCase, model: nn.Module, support, query):
    opt = case.make(model.parameters())
    with innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
        _loss(fmodel, query).backward()
        return [p.detach() for p in fmodel.parameters()]


@HIGHER_RMSPROP_WARNING
@HIGHER_RPROP_WARNING
@pytest.mark.parametrize("case", HIGHER_CASES, ids=lambda c: c.id)
def test_meta_gradients_match_higher(case):
    model = _mlp(torch.float64)
    theirs = copy.deepcopy(model)
    support, query = _batches(torch.float64, 3)
    if case.opt_type is torch.optim.Adam:
        # higher adds Adam's eps to sqrt(v) before the bias correction (torch.optim after
        # it), so its effective eps is eps * sqrt(1 - beta2**t); second derivatives near small
        # gradients see the difference (1e-3 relative at eps = 1e-6). With a negligible eps
        # in every group the two formulas coincide.
        case = dataclasses.replace(
            case,
            kwargs={**case.kwargs, "eps": 1e-14},
            second_group={k: v for k, v in case.second_group.items() if k != "eps"},
        )
    ours_fast = _maml(higher_func.innerloop_ctx, case, model, support, query)
    theirs_fast = _maml(higher.innerloop_ctx, case, theirs, support, query)
    # Every other optimizer here has the same formula in both libraries (higher's ASGD
    # averages at another point, but the average never feeds back into the weights). higher's
    # Adagrad divides lr by a float32 tensor (the step count it copies from torch.optim's
    # state), which rounds its learning rate to float32.
    rtol = 1e-6 if case.opt_type is torch.optim.Adagrad else 1e-8
    assert_rel_close(ours_fast, theirs_fast, rtol=rtol)
    assert_rel_close(_grads_of(model.parameters()), _grads_of(theirs.parameters()), rtol=rtol)


def _assert_bitwise(actual, expected) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and torch.equal(a, e), f"tensor {i}: {(a - e).abs().max()}"


@HIGHER_RMSPROP_WARNING
@HIGHER_RPROP_WARNING
# higher's ASGD calls math.pow on a learned lr.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
@over_dtypes
@pytest.mark.parametrize("learned_lr", [False, True], ids=["lr", "learned_lr"])
@pytest.mark.parametrize("case", HIGHER_CASES, ids=lambda c: c.id)
def test_higher_numerics_reproduce_higher_bitwise(case, learned_lr, dtype):
    """Under numerics("higher"), four unrolled steps and the meta-gradients (into the initial
    weights and a learned per-group learning rate) equal higher 0.2.1's bit for bit."""
    model = _mlp(dtype)
    theirs = copy.deepcopy(model)
    support, query = _batches(dtype, 4)
    lrs = [[torch.tensor(v, dtype=dtype, requires_grad=True) for v in (0.03, 0.02)] for _ in "ab"]
    if learned_lr:
        ours_ctx = functools.partial(higher_func.innerloop_ctx, override={"lr": lrs[0]})
        theirs_ctx = functools.partial(higher.innerloop_ctx, override={"lr": lrs[1]})
    else:
        ours_ctx, theirs_ctx = higher_func.innerloop_ctx, higher.innerloop_ctx
    with higher_func.optim.numerics("higher"):
        ours_fast = _maml(ours_ctx, case, model, support, query)
    theirs_fast = _maml(theirs_ctx, case, theirs, support, query)
    _assert_bitwise(ours_fast, theirs_fast)
    _assert_bitwise(_grads_of(model.parameters()), _grads_of(theirs.parameters()))
    # higher's ASGD turns lr into a Python float inside eta (math.pow), cutting that path.
    if learned_lr and case.opt_type is not torch.optim.ASGD:
        _assert_bitwise(_grads_of(lrs[0]), _grads_of(lrs[1]))


# ---------------------------------------------------------------------------------------------
# (4) No NaN meta-gradients where a weight always gets exactly zero gradient.
# ---------------------------------------------------------------------------------------------


@over_cases
def test_no_nan_meta_gradients_when_a_gradient_is_exactly_zero(case):
    # Without weight decay, a weight fed by an input feature that is always 0 gets a zero
    # gradient at every step: second moments stay exactly 0, where sqrt has an infinite slope.
    case = case.without_decay()
    model = _mlp(torch.float64)
    support, query = _batches(torch.float64, 3)
    support = [(x * torch.tensor([0.0, 1.0, 1.0], dtype=x.dtype), y) for x, y in support]
    before = model[0].weight.detach().clone()
    fast = _maml(higher_func.innerloop_ctx, case, model, support, query)
    assert torch.equal(fast[0][:, 0], before[:, 0]), "the zero-gradient column moved"
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), p.grad


# ---------------------------------------------------------------------------------------------
# (5) Overrides and learned hyperparameters.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_group", [False, True], ids=["one_for_all", "per_group"])
@over_cases
def test_override_sets_each_group(case, per_group):
    model = _mlp(torch.float64)
    opt = case.make(model.parameters())
    lrs = [torch.tensor(0.07, dtype=torch.float64), torch.tensor(0.03, dtype=torch.float64)]
    override = {"lr": lrs if per_group else lrs[:1]}
    twin = copy.deepcopy(model)
    twin_opt = case.make(twin.parameters())
    support, _ = _batches(torch.float64, 3)
    ctx = higher_func.innerloop_ctx(model, opt, override=override, track_higher_grads=False)
    with ctx as (fmodel, diffopt):
        for g, group in enumerate(diffopt.param_groups):
            assert group["lr"] is (lrs[g] if per_group else lrs[0])
            twin_opt.param_groups[g]["lr"] = group["lr"].item()
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
            _torch_step(twin, twin_opt, batch)
        # A tensor hyperparameter takes the rules' tensor code path: same values.
        assert_rel_close(fmodel.parameters(), twin.parameters(), rtol=_rtol_vs_torch(case))
        exported = diffopt.state_dict()["param_groups"]
        assert [type(g["lr"]) for g in exported] == [float, float]
    # The override belongs to the differentiable copy; the optimizer it came from is untouched.
    assert [g["lr"] for g in opt.param_groups] == [
        g["lr"] for g in case.make(twin.parameters()).param_groups
    ]


class Scaled(nn.Module):
    """A linear layer times a 0-dim parameter: the shape a one-element tensor must not change."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.linear = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.linear(x)


@over_cases
def test_one_element_override_acts_as_a_scalar(case):
    # The override check accepts any one-element tensor as "one value"; a learned lr kept as
    # shape (1,) must then behave like the 0-dim one, not broadcast a 0-dim weight to (1,).
    support, _ = _batches(torch.float64, 2)
    trajectories = []
    for lr in (torch.tensor(0.05, dtype=torch.float64), torch.tensor([0.05], dtype=torch.float64)):
        model = _seeded(3, Scaled)
        opt = case.make(model.parameters())
        ctx = higher_func.innerloop_ctx(model, opt, override={"lr": [lr]}, track_higher_grads=False)
        with ctx as (fmodel, diffopt):
            for batch in support:
                diffopt.step(_loss(fmodel, batch))
            trajectories.append(list(fmodel.parameters()))
    assert [p.shape for p in trajectories[1]] == [p.shape for p in trajectories[0]]
    assert_rel_close(trajectories[1], trajectories[0], rtol=1e-12)


def _query_loss_with_lrs(case: OptCase, lrs: Sequence[Any], track: bool = True) -> torch.Tensor:
    model = _mlp(torch.float64)
    opt = case.make(model.parameters())
    support, query = _batches(torch.float64, 3)
    with higher_func.innerloop_ctx(
        model, opt, override={"lr": list(lrs)}, track_higher_grads=track
    ) as (fmodel, diffopt):
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
        return _loss(fmodel, query)


@over_cases
def test_hypergradient_matches_finite_differences(case):
    lrs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.04, 0.02)]
    hypergrads = torch.autograd.grad(_query_loss_with_lrs(case, lrs), lrs)
    h = 1e-6
    for g, hypergrad in enumerate(hypergrads):
        assert hypergrad is not None and torch.isfinite(hypergrad)

        def at(delta, g=g):
            shifted = [lr.detach() + (delta if i == g else 0.0) for i, lr in enumerate(lrs)]
            return _query_loss_with_lrs(case, shifted, track=False).item()

        finite_difference = (at(h) - at(-h)) / (2 * h)
        assert hypergrad.item() == pytest.approx(finite_difference, rel=1e-5, abs=1e-9)


def test_step_override_replaces_stored_override():
    model = _mlp(torch.float64)
    opt = torch.optim.SGD(
        [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}],
        lr=0.1,
    )
    first, second = torch.tensor(0.1), torch.tensor(0.5)
    (x, y), (x2, y2) = _batches(torch.float64, 2)[0]
    with higher_func.innerloop_ctx(
        model, opt, override={"lr": [first]}, track_higher_grads=False
    ) as (fmodel, diffopt):
        for step_override, batch in [({"lr": [second]}, (x, y)), (None, (x2, y2))]:
            before = list(fmodel.parameters())
            loss = _loss(fmodel, batch)
            grads = torch.autograd.grad(loss, before, retain_graph=True)
            diffopt.step(loss, override=step_override)
            # The step's override stays in force for the step after it.
            assert all(group["lr"] is second for group in diffopt.param_groups)
            expected = [p - 0.5 * g for p, g in zip(before, grads)]
            assert_rel_close(fmodel.parameters(), expected, rtol=1e-12)
        third = [torch.tensor(0.2), torch.tensor(0.3)]
        diffopt.step(_loss(fmodel, (x, y)), override={"lr": third})
        assert [group["lr"] for group in diffopt.param_groups] == third


def _map_leaves(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every number or tensor of a hyperparameter (pairs such as ``betas``)."""
    return pytree.tree_map(fn, value)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


@over_cases
def test_get_trainable_opt_params_makes_only_numbers_trainable(case):
    model = _mlp(torch.float64)
    opt = case.make(model.parameters())
    override = get_trainable_opt_params(opt)
    numeric = set(opt.param_groups[0]) - FLAGS - {"params"}
    assert set(override) == numeric, "flags must stay flags; every number must be learnable"
    for key, values in override.items():
        assert len(values) == len(opt.param_groups)
        for value, group in zip(values, opt.param_groups):
            assert type(value) is type(group[key]) or isinstance(value, torch.Tensor)
            for leaf, original in zip(_leaves(value), _leaves(group[key])):
                assert isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
                assert leaf.requires_grad and leaf.is_leaf
                assert leaf.item() == pytest.approx(float(original), rel=1e-6)

    # The same keys as float64 tensors (the defaults are float32, which would round the
    # values): every hyperparameter as a tensor must reproduce the trajectory of the plain
    # numbers, and carry finite hypergradients.
    override = {
        key: [
            _map_leaves(g[key], lambda x: torch.tensor(float(x), dtype=torch.float64))
            for g in opt.param_groups
        ]
        for key in override
    }
    for leaf in (leaf for vs in override.values() for leaf in _leaves(vs)):
        leaf.requires_grad_()
    twin, twin_opt = copy.deepcopy((model, opt))
    support, query = _batches(torch.float64, STEPS)  # RAdam rectifies from step 6
    ctx = higher_func.innerloop_ctx(model, opt, override=override, copy_initial_weights=False)
    with ctx as (fmodel, diffopt):
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
            _torch_step(twin, twin_opt, batch)
        assert_rel_close(fmodel.parameters(), twin.parameters(), rtol=_rtol_vs_torch(case))
        leaves = [leaf for vs in override.values() for leaf in _leaves(vs)]
        hypergrads = torch.autograd.grad(_loss(fmodel, query), leaves, allow_unused=True)
    for hypergrad in hypergrads:
        assert hypergrad is None or torch.isfinite(hypergrad)
    assert all(hypergrads[leaves.index(lr)] is not None for lr in override["lr"])


@over_cases
def test_apply_trainable_opt_params_writes_floats_back(case):
    model = _mlp(torch.float64)
    opt = case.make(model.parameters())
    before = copy.deepcopy(opt.param_groups)
    learned = {
        k: [_map_leaves(v, lambda t: (t * 0.5).detach().requires_grad_()) for v in vs]
        for k, vs in get_trainable_opt_params(opt).items()
    }
    apply_trainable_opt_params(opt, learned)
    for group, old in zip(opt.param_groups, before):
        assert {k: group[k] for k in FLAGS if k in old} == {k: old[k] for k in FLAGS if k in old}
    for key, values in learned.items():
        for group, old, value in zip(opt.param_groups, before, values):
            if isinstance(old[key], tuple):
                assert type(group[key]) is tuple and len(group[key]) == len(old[key])
            for written, leaf in zip(_leaves(group[key]), _leaves(value)):
                assert type(written) is float, (key, written)
                assert written == leaf.item()


def test_apply_trainable_opt_params_turns_an_int_momentum_into_a_float():
    model = _mlp(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0 and type(opt.param_groups[0]["momentum"]) is int
    override = get_trainable_opt_params(opt)
    assert set(override) == {"lr", "momentum", "dampening", "weight_decay"}
    with torch.no_grad():
        override["momentum"][0].fill_(0.9)
    apply_trainable_opt_params(opt, override)
    momentum = opt.param_groups[0]["momentum"]
    assert type(momentum) is float and momentum == pytest.approx(0.9)
    assert opt.param_groups[0]["nesterov"] is False and opt.param_groups[0]["maximize"] is False


# ---------------------------------------------------------------------------------------------
# (6) Frozen, unused and unowned weights.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
@over_cases
def test_frozen_weights_stay_frozen_and_unchanged(case, track):
    model = _mlp(torch.float64)
    model[0].bias.requires_grad_(False)
    opt = case.make(model.parameters())
    twin, twin_opt = copy.deepcopy((model, opt))
    support, query = _batches(torch.float64, 3)
    with higher_func.innerloop_ctx(
        model, opt, copy_initial_weights=False, track_higher_grads=track
    ) as (fmodel, diffopt):
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
            _torch_step(twin, twin_opt, batch)
        frozen = list(fmodel.parameters())[1]
        assert not frozen.requires_grad
        assert torch.equal(frozen, model[0].bias)
        assert_rel_close(fmodel.parameters(), twin.parameters(), rtol=_rtol_vs_torch(case))
        if track:
            _loss(fmodel, query).backward()
    assert model[0].bias.grad is None
    if track:
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class WithSpare(nn.Module):
    """An MLP with one more parameter that its forward never reads."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = _mlp(dtype)
        self.spare = nn.Parameter(torch.linspace(-1, 1, 3, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@over_cases
def test_unused_weight_keeps_its_value_and_state(case):
    model = WithSpare(torch.float64)
    opt = case.make(model.parameters())
    ((g, i),) = [
        (g, i)
        for g, group in enumerate(opt.param_groups)
        for i, p in enumerate(group["params"])
        if p is model.spare
    ]
    warmup, _ = _batches(torch.float64, 2, seed=5)
    for batch in warmup:  # the warm-up uses the spare weight, so it has optimizer state
        opt.zero_grad()
        (_loss(model, batch) + model.spare.pow(2).sum()).backward()
        opt.step()
    # torch 2.0 keeps some steps as ints and SGD's unused momentum buffer as None.
    torch_state = {
        k: v.clone() if isinstance(v, torch.Tensor) else v
        for k, v in opt.state[model.spare].items()
        if v is not None
    }
    support, query = _batches(torch.float64, 3)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
        assert torch.equal(fmodel.spare, model.spare)
        state = diffopt.state[g].get(i, {})
        assert set(state) == set(torch_state)
        for key, value in torch_state.items():
            if key == "step":
                assert state[key] == int(value)
            else:
                assert torch.equal(torch.as_tensor(state[key], dtype=value.dtype), value), key
        _loss(fmodel, query).backward()
    assert all(p.grad is not None for p in model.net.parameters())


@over_cases
def test_weights_outside_every_group_are_left_alone(case):
    model = _mlp(torch.float64)
    opt = case.make(model[2].parameters())  # groups: net[2].weight | net[2].bias
    twin, twin_opt = copy.deepcopy((model, opt))
    support, _ = _batches(torch.float64, 3)
    with higher_func.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
            _torch_step(twin, twin_opt, batch)
        fast = list(fmodel.parameters())
    assert torch.equal(fast[0], model[0].weight) and torch.equal(fast[1], model[0].bias)
    assert_rel_close(fast, twin.parameters(), rtol=_rtol_vs_torch(case))


# ---------------------------------------------------------------------------------------------
# (7) First-order mode.
# ---------------------------------------------------------------------------------------------


@over_cases
def test_first_order_gives_the_fomaml_meta_gradient(case):
    # Without weight decay, an update depends on the weights only through the gradient; with
    # the gradients held constant the final weights are the initial ones plus a constant, so
    # the first-order meta-gradient is exactly d(query loss)/d(final weights).
    case = case.without_decay()
    model = _mlp(torch.float64)
    second_order = copy.deepcopy(model)
    support, query = _batches(torch.float64, 3)
    opt = case.make(model.parameters())
    ctx = higher_func.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=True)
    with ctx as (fmodel, diffopt):
        for batch in support:
            diffopt.step(_loss(fmodel, batch))
        final = list(fmodel.parameters())
        query_loss = _loss(fmodel, query)
        fomaml = torch.autograd.grad(query_loss, final, retain_graph=True)
        query_loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert_rel_close(_grads_of(model.parameters()), fomaml, rtol=1e-12)

    _maml(higher_func.innerloop_ctx, case, second_order, support, query)
    if case.opt_type is not torch.optim.Rprop:  # sign-based: its second-order terms are zero anyway
        difference = sum(
            (a.grad - b.grad).norm() for a, b in zip(model.parameters(), second_order.parameters())
        )
        assert difference > 1e-6, "first-order mode returned the second-order meta-gradient"


def test_first_order_through_get_diff_optim():
    model = _mlp(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    support, query = _batches(torch.float64, 2)
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False)
    diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel, first_order=True)
    for batch in support:
        diffopt.step(_loss(fmodel, batch))
    final = list(fmodel.parameters())
    fomaml = torch.autograd.grad(_loss(fmodel, query), final)
    _loss(fmodel, query).backward()
    assert_rel_close(_grads_of(model.parameters()), fomaml, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# (8) State: export to torch.optim, detach.
# ---------------------------------------------------------------------------------------------


@over_cases
def test_state_dict_continues_in_torch_optim(case):
    model = _mlp(torch.float64)
    opt = case.make(model.parameters())
    support, _ = _batches(torch.float64, 6)
    with higher_func.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for batch in support[:3]:
            diffopt.step(_loss(fmodel, batch))
        adapted = with_params(model, list(fmodel.parameters()))
        adapted_opt = case.make(adapted.parameters())
        adapted_opt.load_state_dict(diffopt.state_dict())
        for batch in support[3:]:
            diffopt.step(_loss(fmodel, batch))
            _torch_step(adapted, adapted_opt, batch)
            assert_rel_close(fmodel.parameters(), adapted.parameters(), rtol=_rtol_vs_torch(case))


def _state_tensors(diffopt: DifferentiableOptimizer) -> list[torch.Tensor]:
    return [
        v
        for group in diffopt.state
        for s in group.values()
        for v in s.values()
        if torch.is_tensor(v)
    ]


@over_cases
def test_detach_state_leaves_nothing_on_the_tape(case):
    model = _mlp(torch.float64)
    opt = case.make(model.parameters())
    support, query = _batches(torch.float64, 3)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for batch in support[:2]:
            diffopt.step(_loss(fmodel, batch))
        if _state_tensors(diffopt):
            assert any(t.requires_grad for t in _state_tensors(diffopt)), "nothing to detach"
        diffopt.detach_state()
        assert not any(t.requires_grad for t in _state_tensors(diffopt))
        diffopt.step(_loss(fmodel, support[2]))  # stepping on is still possible
        _loss(fmodel, query).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# (9) Property-based: random hyperparameters and shapes.
# ---------------------------------------------------------------------------------------------

_lr = st.floats(1e-3, 0.2)
_decay = st.one_of(st.just(0), st.floats(1e-4, 0.1))
_betas = st.tuples(st.floats(0.5, 0.95), st.floats(0.8, 0.9999))
_eps = st.sampled_from([1e-8, 1e-6, 1e-3])
_flag = st.booleans()


@st.composite
def _sgd(draw):
    momentum = draw(st.one_of(st.just(0), st.floats(0.1, 0.95)))
    nesterov = momentum != 0 and draw(_flag)
    dampening = 0 if nesterov else draw(st.floats(0, 0.5))
    return dict(
        lr=draw(_lr),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=draw(_decay),
        maximize=draw(_flag),
    )


@st.composite
def _rmsprop(draw):
    return dict(
        lr=draw(st.floats(1e-3, 0.05)),
        alpha=draw(st.floats(0.5, 0.99)),
        eps=draw(_eps),
        weight_decay=draw(_decay),
        momentum=draw(st.one_of(st.just(0), st.floats(0.1, 0.9))),
        centered=draw(_flag),
        maximize=draw(_flag),
    )


def _adam_like(**extra):
    return st.fixed_dictionaries(
        dict(lr=_lr, betas=_betas, eps=_eps, weight_decay=_decay, maximize=_flag, **extra)
    )


HYPERPARAMETERS = {
    torch.optim.SGD: _sgd(),
    torch.optim.Adam: _adam_like(amsgrad=_flag, decoupled_weight_decay=_flag),
    torch.optim.AdamW: _adam_like(amsgrad=_flag),
    torch.optim.Adadelta: st.fixed_dictionaries(
        dict(
            lr=st.floats(0.1, 2.0),
            rho=st.floats(0.5, 0.99),
            eps=st.sampled_from([1e-6, 1e-4]),
            weight_decay=_decay,
            maximize=_flag,
        )
    ),
    torch.optim.Adagrad: st.fixed_dictionaries(
        dict(
            lr=_lr,
            lr_decay=st.floats(0, 0.1),
            initial_accumulator_value=st.floats(0, 0.5),
            eps=st.sampled_from([1e-10, 1e-6]),
            weight_decay=_decay,
            maximize=_flag,
        )
    ),
    torch.optim.Adamax: st.fixed_dictionaries(
        dict(lr=_lr, betas=_betas, eps=_eps, weight_decay=_decay, maximize=_flag)
    ),
    torch.optim.ASGD: st.fixed_dictionaries(
        dict(
            lr=_lr,
            lambd=st.floats(0, 0.1),
            alpha=st.floats(0.1, 1.0),
            t0=st.sampled_from([0, 1, 2, 1e6]),
            weight_decay=_decay,
            maximize=_flag,
        )
    ),
    torch.optim.RMSprop: _rmsprop(),
    torch.optim.Rprop: st.fixed_dictionaries(
        dict(
            lr=_lr,
            etas=st.tuples(st.floats(0.1, 0.9), st.floats(1.05, 2.0)),
            step_sizes=st.tuples(st.floats(1e-6, 1e-3), st.floats(0.01, 1.0)),
            maximize=_flag,
        )
    ),
    torch.optim.NAdam: _adam_like(
        momentum_decay=st.floats(1e-3, 1e-2), decoupled_weight_decay=_flag
    ),
    torch.optim.RAdam: _adam_like(decoupled_weight_decay=_flag),
}

_shape = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@pytest.mark.parametrize("opt_type", list(HYPERPARAMETERS), ids=lambda t: t.__name__)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_random_trajectory_matches_torch_optim(opt_type, data):
    shapes = data.draw(st.lists(_shape, min_size=1, max_size=3), label="shapes")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    generator = torch.Generator().manual_seed(seed)
    initial = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    scales = [torch.rand(s, dtype=torch.float64, generator=generator) + 0.5 for s in shapes]
    split = data.draw(st.integers(1, len(shapes)), label="split")
    chunks = [range(split), range(split, len(shapes))] if split < len(shapes) else [range(split)]
    hypers = [data.draw(HYPERPARAMETERS[opt_type], label=f"group {g}") for g in range(len(chunks))]

    def loss_of(params):
        # Smooth, non-separable and with nonzero second derivatives.
        total = sum((c * torch.sin(3 * p) + c * p * p).sum() for p, c in zip(params, scales))
        return total + 0.1 * sum(p.sum() for p in params) ** 2

    leaves = [p.clone().requires_grad_() for p in initial]
    opt = opt_type(
        [{"params": [leaves[i] for i in chunk], **h} for chunk, h in zip(chunks, hypers)],
        foreach=False,
    )
    diffopt = get_diff_optim(opt, leaves, track_higher_grads=False)
    # torch.optim's float32 scalars (see TORCH_ROUNDS_TO_FLOAT32) shift each step by up to
    # 6e-8 of its size, which is not small relative to a weight that has converged near 0.
    atol = 1e-6 if opt_type in TORCH_ROUNDS_TO_FLOAT32 else 0.0
    fast = [p.clone().requires_grad_() for p in initial]
    for _ in range(4):
        fast = diffopt.step(loss_of(fast), params=fast)
        opt.zero_grad()
        loss_of(leaves).backward()
        opt.step()
        assert_rel_close(fast, leaves, rtol=1e-6, atol=atol)


# ---------------------------------------------------------------------------------------------
# (10) Building optimizers: create_diff_optim, register_optim, higher-style subclasses.
# ---------------------------------------------------------------------------------------------


def test_create_diff_optim_from_a_type():
    model = _mlp(torch.float64)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    diffopt = create_diff_optim(torch.optim.SGD, {"lr": 0.1}, params=params)
    assert isinstance(diffopt, higher_func.optim.DifferentiableSGD)
    (batch,), _ = _batches(torch.float64, 1)
    loss = _functional_loss(model, params, batch)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    new = diffopt.step(loss, params=params)
    assert_rel_close(new, [p - 0.1 * g for p, g in zip(params, grads)], rtol=1e-12)
    assert all(n.grad_fn is not None for n in new), "the step must stay on the tape"


def test_create_diff_optim_with_groups_and_fmodel():
    model = _mlp(torch.float64)
    twin = copy.deepcopy(model)
    fmodel = higher_func.monkeypatch(model, track_higher_grads=False)
    weights = list(fmodel.parameters())
    groups = [{"params": weights[:2], "lr": 0.02}, {"params": weights[2:]}]
    diffopt = create_diff_optim(
        torch.optim.Adam, {"lr": 0.01}, params=groups, fmodel=fmodel, track_higher_grads=False
    )
    twin_opt = torch.optim.Adam(
        [
            {"params": list(twin[0].parameters()), "lr": 0.02},
            {"params": list(twin[2].parameters())},
        ],
        lr=0.01,
        foreach=False,
    )
    support, _ = _batches(torch.float64, 3)
    for batch in support:
        diffopt.step(_loss(fmodel, batch))
        _torch_step(twin, twin_opt, batch)
    assert_rel_close(fmodel.parameters(), twin.parameters(), rtol=1e-10)


class ScaledSGD(torch.optim.Optimizer):
    """SGD whose step is multiplied by a per-group ``scale``: a custom optimizer to register."""

    def __init__(self, params, lr: float = 0.1, scale: float = 1.0) -> None:
        super().__init__(params, {"lr": lr, "scale": scale})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * group["scale"])


def _scaled_sgd(param, grad, state, *, lr, scale):
    return param - lr * scale * grad, state


class DifferentiableScaledSGD(DifferentiableOptimizer):
    rule = _rules.UpdateRule(_scaled_sgd, ("lr", "scale"))


class LegacyScaledSGD(DifferentiableOptimizer):
    """Written as for higher: ``_update`` replaces the weights in ``param_groups``."""

    def _update(self, grouped_grads, **kwargs):
        for g, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for i, (p, grad) in enumerate(zip(group["params"], grads)):
                if grad is None:
                    continue
                state = self.state[g][i]
                state["calls"] = state.get("calls", 0) + 1
                group["params"][i] = p - group["lr"] * group["scale"] * grad


def _scaled_sgd_meta_gradients(make_diffopt: Callable[..., DifferentiableOptimizer]):
    model = _mlp(torch.float64)
    twin = copy.deepcopy(model)
    opt = ScaledSGD(
        [
            {"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "scale": 2.0},
        ],
        lr=0.05,
        scale=0.5,
    )
    support, query = _batches(torch.float64, 3)
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False)
    diffopt = make_diffopt(opt, model.parameters(), fmodel=fmodel)
    twin_opt = torch.optim.SGD(
        [{"params": list(twin[0].parameters())}, {"params": list(twin[2].parameters()), "lr": 0.1}],
        lr=0.025,
    )
    twin_fmodel = higher_func.monkeypatch(twin, copy_initial_weights=False)
    twin_diffopt = get_diff_optim(twin_opt, twin.parameters(), fmodel=twin_fmodel)
    for batch in support:
        diffopt.step(_loss(fmodel, batch))
        twin_diffopt.step(_loss(twin_fmodel, batch))
    _loss(fmodel, query).backward()
    _loss(twin_fmodel, query).backward()
    # ScaledSGD with lr * scale = (0.025, 0.1) is SGD with those learning rates.
    assert_rel_close(fmodel.parameters(), twin_fmodel.parameters(), rtol=1e-12)
    assert_rel_close(_grads_of(model.parameters()), _grads_of(twin.parameters()), rtol=1e-12)
    return diffopt


def test_register_optim_with_a_rule(optimizer_registry):
    with pytest.raises(ValueError, match="register"):
        _scaled_sgd_meta_gradients(get_diff_optim)
    register_optim(ScaledSGD, DifferentiableScaledSGD)
    diffopt = _scaled_sgd_meta_gradients(get_diff_optim)
    assert type(diffopt) is DifferentiableScaledSGD
    model = _mlp(torch.float64)
    with higher_func.innerloop_ctx(model, ScaledSGD(model.parameters())) as (_, diffopt):
        assert type(diffopt) is DifferentiableScaledSGD


def test_higher_style_subclass_overriding_update():
    diffopt = _scaled_sgd_meta_gradients(LegacyScaledSGD)
    assert [s["calls"] for group in diffopt.state for s in group.values()] == [3, 3, 3, 3]


# ---------------------------------------------------------------------------------------------
# (11) grad_callback.
# ---------------------------------------------------------------------------------------------


def _clip(limit: float):
    def clip(grads):
        return [None if g is None else g.clamp(-limit, limit) for g in grads]

    return clip


@over_cases
def test_grad_callback_per_constructor_and_per_step(case):
    model = _mlp(torch.float64)
    model[0].bias.requires_grad_(False)  # its gradient reaches the callback as None
    opt = case.make(model.parameters())
    twin, twin_opt = copy.deepcopy((model, opt))
    support, _ = _batches(torch.float64, 4)
    seen = []

    def constructor_callback(grads):
        seen.append([g is None for g in grads])
        return _clip(0.05)(grads)

    fmodel = higher_func.monkeypatch(model, track_higher_grads=False)
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        track_higher_grads=False,
        grad_callback=constructor_callback,
    )
    # The second step brings its own callback, for that step only.
    per_step = [None, _clip(0.01), None, None]
    for batch, step_callback in zip(support, per_step):
        diffopt.step(_loss(fmodel, batch), grad_callback=step_callback)
        twin_opt.zero_grad()
        _loss(twin, batch).backward()
        clip = step_callback or _clip(0.05)
        for p, g in zip(twin.parameters(), clip([p.grad for p in twin.parameters()])):
            p.grad = g
        twin_opt.step()
        assert_rel_close(fmodel.parameters(), twin.parameters(), rtol=_rtol_vs_torch(case))
    assert seen == [[False, True, False, False]] * 3


# ---------------------------------------------------------------------------------------------
# Elementwise (per-coordinate) hyperparameters, batched: the three shapes a tensor may have.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["shape", "tasks_and_shape", "tasks"])
@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_batched_elementwise_learning_rates_equal_a_loop_over_tasks(layout, opt_type):
    tasks = 3
    model = _seeded(0, lambda: nn.Linear(3, 2))
    generator = torch.Generator().manual_seed(7)
    shapes = [p.shape for p in model.parameters()]
    if layout == "shape":  # [*shape]: the same per-coordinate values for every task
        lrs = [0.05 + 0.1 * torch.rand(s, generator=generator) for s in shapes]
        of_task = lambda t: lrs  # noqa: E731
    elif layout == "tasks_and_shape":  # [T, *shape]: per task and per coordinate
        lrs = [0.05 + 0.1 * torch.rand(tasks, *s, generator=generator) for s in shapes]
        of_task = lambda t: [lr[t] for lr in lrs]  # noqa: E731
    else:  # [T]: one value per task
        lrs = [0.05 + 0.1 * torch.rand(tasks, generator=generator) for _ in shapes]
        of_task = lambda t: [lr[t] for lr in lrs]  # noqa: E731
    x = torch.randn(tasks, 5, 3, generator=generator)
    y = torch.randn(tasks, 5, 2, generator=generator)
    opt = opt_type([{"params": [p]} for p in model.parameters()], lr=0.1)

    ctx = higher_func.innerloop_ctx(model, opt, num_tasks=tasks, override={"lr": lrs})
    with ctx as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(((fmodel(x) - y) ** 2).mean(dim=(1, 2)))
        batched = list(fmodel.parameters())
    for t in range(tasks):
        with higher_func.innerloop_ctx(model, opt, override={"lr": of_task(t)}) as (f, d):
            for _ in range(3):
                d.step(((f(x[t]) - y[t]) ** 2).mean())
            assert len(batched) == len(list(f.parameters()))
            for stacked, single in zip(batched, f.parameters()):
                torch.testing.assert_close(stacked[t], single, rtol=1e-6, atol=1e-7)


@needs_foreach_autograd
def test_torch_multi_tensor_ops_still_save_their_inputs():
    """Why tracked steps take the single-tensor rule by default (``_multi_tensor``): if a
    torch release stops saving the inputs of ``_foreach_add``, this fails and the default
    can be revisited."""
    weights = [torch.randn(4, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    grads = [torch.randn(4, 4, requires_grad=True), torch.randn(4, requires_grad=True)]

    def saved_by(step):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            step()
        return saved

    assert saved_by(lambda: [torch.add(w, g, alpha=-0.1) for w, g in zip(weights, grads)]) == []
    saved = saved_by(lambda: torch._foreach_add(weights, grads, alpha=-0.1))
    assert any(s is g for s in saved for g in grads)
