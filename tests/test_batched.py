"""Batched tasks (``num_tasks=T``) against their oracle: a Python loop of T unbatched inner loops.

A batched inner loop stacks every fast weight ``[T, *shape]`` and vmaps the forward over the
leading task dim. Tasks never interact, so running T of them at once must give exactly what T
separate inner loops give when run one after the other on the same model and optimizer, with
the meta-loss of the loop divided by T to match the batched mean. The comparison covers:

* per-task query losses, the fast weights after every step, meta-gradients in ``model.grad``
  and hypergradients of a learned learning rate (shared, or one per task);
* BatchNorm running statistics per task (train mode) and the eval-mode forward;
* every optimizer of ``higher_func.optim``, cold and with warm ``torch.optim`` state, and a
  property test over task counts, widths, unroll lengths, optimizers and hyperparameters;
* ``copy_initial_weights=True``, shared inputs (``in_dims``), methods and submodules,
  recurrent modules (looped fallback), argument errors and per-task state export.

Everything runs in float64 so that the only differences are rounding.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import ZOO, tensors_in, with_params

import higher_func
from higher_func import BatchingFallbackWarning

DTYPE = torch.float64
TOL = dict(atol=1e-7, rtol=1e-6)  # float64 runs: anything above rounding is a bug


def assert_close(actual: Any, expected: Any, msg: str = "") -> None:
    actual, expected = tensors_in(actual), tensors_in(expected)
    assert len(actual) == len(expected), msg
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m, i=i: f"{msg} [{i}]: {m}")


# ---------------------------------------------------------------------------------------------
# The optimizer registry: every optimizer of higher_func.optim, with its options switched on.
# ---------------------------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=0.5, rho=0.8, weight_decay=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(
        ps, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1
    ),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.05, weight_decay=0.01),
    # t0=1: the averaging branch (mu < 1) is reached within a few steps.
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.05, lambd=1e-3, t0=1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, momentum=0.5, centered=True),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.01),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.05),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=0.05),
}


def warm_up(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """A few ordinary training steps, so ``opt`` carries state; leaves no ``.grad`` behind."""
    generator = torch.Generator().manual_seed(123)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(6, model[0].in_features, generator=generator, dtype=DTYPE)
        model(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Data, losses and the two ways of running T inner loops.
# ---------------------------------------------------------------------------------------------


def task_inputs(inputs: tuple, num_tasks: int, seed: int) -> tuple:
    """``inputs`` of one task, varied into ``num_tasks`` tasks along a new leading dim."""
    generator = torch.Generator().manual_seed(seed)
    stacked = []
    for x in inputs:
        noise = torch.randn((num_tasks, *x.shape), generator=generator, dtype=x.dtype)
        stacked.append(x + 0.5 * noise)
    return tuple(stacked)


def losses_of(output: Any) -> torch.Tensor:
    """One smooth, non-symmetric loss per task for an output with a leading task dim."""
    return sum((t * t + torch.sin(t)).flatten(1).mean(1) for t in tensors_in(output))


def loss_of(output: Any) -> torch.Tensor:
    """The same loss for one unbatched task."""
    return sum((t * t + torch.sin(t)).mean() for t in tensors_in(output))


def task(inputs: tuple, t: int) -> tuple:
    return tuple(x[t] for x in inputs)


@dataclasses.dataclass
class Outcome:
    """What one run of T inner loops produced, with every per-task quantity stacked ``[T, ...]``."""

    query: torch.Tensor
    weights: list[list[torch.Tensor]]  # weights[k]: the fast weights after k steps
    buffers: list[torch.Tensor]
    eval_output: Any
    grads: list[torch.Tensor | None]  # model.grad after the meta-backward


def _model_grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def run_batched(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    support: tuple,
    query: tuple,
    steps: int,
    override: dict | None = None,
    first_order: bool = False,
    batching: str = "auto",
) -> Outcome:
    num_tasks = support[0].shape[0]
    _clear_grads(model)
    with higher_func.innerloop_ctx(
        model,
        opt,
        copy_initial_weights=False,
        override=override,
        num_tasks=num_tasks,
        first_order=first_order,
        batching=batching,
    ) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(losses_of(fmodel(*support)))
        losses = losses_of(fmodel(*query))
        losses.mean().backward()
        weights = [[p.detach() for p in fmodel.parameters(time=k)] for k in range(steps + 1)]
        buffers = [b.clone() for b in fmodel.buffers()]
        fmodel.eval()
        with torch.no_grad():
            eval_output = fmodel(*query)
    return Outcome(losses.detach(), weights, buffers, eval_output, _model_grads(model))


def run_looped(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    support: tuple,
    query: tuple,
    steps: int,
    override_of: Callable[[int], dict | None] = lambda t: None,
    first_order: bool = False,
) -> Outcome:
    num_tasks = support[0].shape[0]
    _clear_grads(model)
    losses, weights, buffers, eval_outputs = [], [], [], []
    for t in range(num_tasks):
        with higher_func.innerloop_ctx(
            model, opt, copy_initial_weights=False, override=override_of(t), first_order=first_order
        ) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_of(fmodel(*task(support, t))))
            loss = loss_of(fmodel(*task(query, t)))
            (loss / num_tasks).backward()
            losses.append(loss.detach())
            weights.append(
                [[p.detach() for p in fmodel.parameters(time=k)] for k in range(steps + 1)]
            )
            buffers.append([b.clone() for b in fmodel.buffers()])
            fmodel.eval()
            with torch.no_grad():
                eval_outputs.append(fmodel(*task(query, t)))

    def stack(per_task):
        return [torch.stack(column) for column in zip(*per_task)]

    return Outcome(
        query=torch.stack(losses),
        weights=[stack([w[k] for w in weights]) for k in range(steps + 1)],
        buffers=stack(buffers),
        eval_output=stack([tensors_in(out) for out in eval_outputs]),
        grads=_model_grads(model),
    )


def assert_same_outcome(batched: Outcome, looped: Outcome) -> None:
    assert_close(batched.query, looped.query, "query losses")
    assert len(batched.weights) == len(looped.weights)
    for k, (b, w) in enumerate(zip(batched.weights, looped.weights)):
        assert_close(b, w, f"fast weights after {k} steps")
    assert len(batched.buffers) == len(looped.buffers)
    if batched.buffers:
        assert_close(batched.buffers, looped.buffers, "buffers")
    assert_close(batched.eval_output, looped.eval_output, "eval-mode output")
    assert [g is None for g in batched.grads] == [g is None for g in looped.grads]
    assert_close(
        [g for g in batched.grads if g is not None],
        [g for g in looped.grads if g is not None],
        "meta-gradients",
    )


def mlp(width: int = 6, batchnorm: bool = False, seed: int = 0, **bn_kwargs: Any) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # No bias before BatchNorm: its exact gradient is 0, and sign-based steps (Rprop, Adam's
        # g / sqrt(v)) would turn rounding noise of either sign into a full step.
        layers: list[nn.Module] = [nn.Linear(4, width, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(width, **bn_kwargs))
        layers += [nn.Tanh(), nn.Linear(width, 3)]
        return nn.Sequential(*layers).to(DTYPE)


def mlp_tasks(num_tasks: int, batch: int = 5, seed: int = 0):
    x = torch.zeros(batch, 4, dtype=DTYPE)
    return task_inputs((x,), num_tasks, seed), task_inputs((x,), num_tasks, seed + 1)


# ---------------------------------------------------------------------------------------------
# Batched == looped.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "conv_bn", "none_bias", "tied", "frozen", "encoder_embed"])
def test_zoo_models_match_the_loop(name):
    case = ZOO[name]()
    if name == "tied":  # token inputs: vary them per task with random ids
        generator = torch.Generator().manual_seed(3)
        support = (torch.randint(0, 10, (3, *case.inputs[0].shape), generator=generator),)
        query = (torch.randint(0, 10, (3, *case.inputs[0].shape), generator=generator),)
    else:
        support, query = task_inputs(case.inputs, 3, 1), task_inputs(case.inputs, 3, 2)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.5)
    batched = run_batched(case.model, opt, support, query, steps=2)
    looped = run_looped(case.model, opt, support, query, steps=2)
    assert_same_outcome(batched, looped)


def test_batchnorm_running_stats_are_per_task():
    model = mlp(batchnorm=True)
    support, query = mlp_tasks(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [b.clone() for b in model.buffers()]
    batched = run_batched(model, opt, support, query, steps=2)
    looped = run_looped(model, opt, support, query, steps=2)
    assert_same_outcome(batched, looped)
    mean, var, tracked = batched.buffers
    assert mean.shape == var.shape == (3, 6) and tracked.shape == (3,)
    assert torch.equal(tracked, torch.full((3,), 3))  # two support calls and the query
    assert not torch.allclose(mean[0], mean[1])  # tasks saw different data
    for b, old in zip(model.buffers(), before):
        assert torch.equal(b, old), "the model's own running stats changed"


def test_batchnorm_without_running_stats():
    model = mlp(batchnorm=True, track_running_stats=False)
    support, query = mlp_tasks(3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    batched = run_batched(model, opt, support, query, steps=2)
    assert batched.buffers == []
    assert_same_outcome(batched, run_looped(model, opt, support, query, steps=2))


def test_batchnorm_cumulative_average():
    # momentum=None: BatchNorm averages with 1 / num_batches_tracked.item(), which vmap
    # cannot run, so the tasks are looped (with a warning) and still match.
    model = mlp(batchnorm=True, momentum=None)
    support, query = mlp_tasks(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(higher_func.BatchingFallbackWarning, match="BatchNorm1d"):
        batched = run_batched(model, opt, support, query, steps=2)
    assert_same_outcome(batched, run_looped(model, opt, support, query, steps=2))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_every_optimizer_matches_the_loop(name, warm):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    if warm:
        warm_up(model, opt)
    support, query = mlp_tasks(3)
    batched = run_batched(model, opt, support, query, steps=2)
    looped = run_looped(model, opt, support, query, steps=2)
    assert_same_outcome(batched, looped)


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "asgd", "rprop"])
def test_shared_lr_hypergradient(name):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    support, query = mlp_tasks(3)
    lr = torch.tensor(0.05, dtype=DTYPE, requires_grad=True)
    batched = run_batched(model, opt, support, query, steps=2, override={"lr": [lr]})
    batched_hypergrad, lr.grad = lr.grad.clone(), None
    looped = run_looped(model, opt, support, query, 2, override_of=lambda t: {"lr": [lr]})
    assert_same_outcome(batched, looped)
    assert batched_hypergrad.abs() > 0
    assert_close(batched_hypergrad, lr.grad, "hypergradient of the shared lr")


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "asgd", "rprop"])
def test_per_task_lr_hypergradient(name):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    support, query = mlp_tasks(3)
    lrs = torch.tensor([0.02, 0.05, 0.1], dtype=DTYPE, requires_grad=True)
    batched = run_batched(model, opt, support, query, steps=2, override={"lr": [lrs]})
    each = [lrs[t].detach().clone().requires_grad_() for t in range(3)]
    looped = run_looped(model, opt, support, query, 2, override_of=lambda t: {"lr": [each[t]]})
    assert_same_outcome(batched, looped)
    assert_close(lrs.grad, torch.stack([lr.grad for lr in each]), "per-task hypergradients")


#: (optimizer, hyperparameter, per-task values): hyperparameters other than lr, per task.
PER_TASK_HYPER = [
    ("sgd", "momentum", [0.0, 0.5, 0.9]),
    ("sgd", "weight_decay", [0.0, 0.01, 0.1]),
    ("adam", "betas", [(0.5, 0.9), (0.8, 0.99), (0.9, 0.999)]),
    ("radam", "betas", [(0.5, 0.9), (0.8, 0.99), (0.9, 0.999)]),
    ("rmsprop", "alpha", [0.5, 0.8, 0.99]),
    ("adagrad", "lr_decay", [0.0, 0.1, 0.5]),
    ("adadelta", "rho", [0.5, 0.8, 0.9]),
    ("asgd", "lambd", [1e-4, 1e-2, 1e-1]),
]


@pytest.mark.parametrize(
    "name, key, values", PER_TASK_HYPER, ids=[f"{n}-{k}" for n, k, _ in PER_TASK_HYPER]
)
def test_per_task_hyperparameters(name, key, values):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    support, query = mlp_tasks(3)
    pair = isinstance(values[0], tuple)  # betas: one [T] tensor per entry of the pair
    columns = list(zip(*values)) if pair else [values]
    stacked = [torch.tensor(c, dtype=DTYPE, requires_grad=True) for c in columns]
    each = [
        [torch.tensor(c[t], dtype=DTYPE, requires_grad=True) for c in columns] for t in range(3)
    ]

    def value(leaves):
        return tuple(leaves) if pair else leaves[0]

    batched = run_batched(model, opt, support, query, 2, override={key: [value(stacked)]})
    looped = run_looped(
        model, opt, support, query, 2, override_of=lambda t: {key: [value(each[t])]}
    )
    assert_same_outcome(batched, looped)
    expected = [torch.stack([each[t][i].grad for t in range(3)]) for i in range(len(columns))]
    assert_close([leaf.grad for leaf in stacked], expected, f"hypergradients of {key}")


def test_first_order_matches_the_loop():
    model = mlp()
    opt = OPTIMIZERS["adam"](model.parameters())
    support, query = mlp_tasks(3)
    grads = []
    for batched in (True, False):
        _clear_grads(model)
        tasks = [None] if batched else range(3)
        for t in tasks:
            with higher_func.innerloop_ctx(
                model,
                opt,
                copy_initial_weights=False,
                first_order=True,
                num_tasks=3 if batched else None,
            ) as (fmodel, diffopt):
                for _ in range(2):
                    out = fmodel(*support) if batched else fmodel(*task(support, t))
                    diffopt.step(losses_of(out) if batched else loss_of(out))
                if batched:
                    losses_of(fmodel(*query)).mean().backward()
                else:
                    (loss_of(fmodel(*task(query, t))) / 3).backward()
        grads.append(_model_grads(model))
    assert_close(grads[0], grads[1], "first-order meta-gradients")


def test_per_task_lr_changes_only_its_task():
    # A [T] lr really is per task: the task with lr 0 keeps its initial weights.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    support, _ = mlp_tasks(2)
    lrs = torch.tensor([0.0, 0.1], dtype=DTYPE)
    with higher_func.innerloop_ctx(
        model, opt, copy_initial_weights=False, override={"lr": [lrs]}, num_tasks=2
    ) as (fmodel, diffopt):
        diffopt.step(losses_of(fmodel(*support)))
        for p, w in zip(model.parameters(), fmodel.parameters()):
            assert torch.equal(w[0], p)
            assert not torch.allclose(w[1], p)


# ---------------------------------------------------------------------------------------------
# Property: batched == looped over random settings.
# ---------------------------------------------------------------------------------------------


def _optimizer_from(name: str, lr: float, momentum: float, betas: tuple):
    kwargs: dict[str, Any] = {"lr": lr}
    if name == "sgd":
        kwargs.update(momentum=momentum, nesterov=momentum > 0)
    elif name == "rmsprop":
        kwargs.update(momentum=momentum, centered=True)
    elif name in ("adam", "adamw", "adamax", "nadam", "radam"):
        kwargs.update(betas=betas)
    opt_type = type(OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)]))
    return lambda params: opt_type(params, **kwargs)


@settings(max_examples=20, deadline=None)
@given(
    num_tasks=st.integers(1, 5),
    width=st.integers(1, 8),
    batch=st.integers(2, 4),
    steps=st.integers(1, 3),
    name=st.sampled_from(sorted(OPTIMIZERS)),
    lr=st.floats(1e-3, 0.3),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    betas=st.tuples(st.floats(0.0, 0.95), st.floats(0.5, 0.999)),
    batchnorm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_batched_equals_loop(
    num_tasks, width, batch, steps, name, lr, momentum, betas, batchnorm, seed
):
    model = mlp(width, batchnorm=batchnorm, seed=seed)
    opt = _optimizer_from(name, lr, momentum, betas)(model.parameters())
    support, query = mlp_tasks(num_tasks, batch, seed)
    batched = run_batched(model, opt, support, query, steps)
    looped = run_looped(model, opt, support, query, steps)
    assert_same_outcome(batched, looped)


# ---------------------------------------------------------------------------------------------
# copy_initial_weights, in_dims, methods and submodules.
# ---------------------------------------------------------------------------------------------


def test_copy_initial_weights_gives_per_task_leaves():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    support, query = mlp_tasks(3)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=True, num_tasks=3) as (
        fmodel,
        diffopt,
    ):
        initial = list(fmodel.parameters(time=0))
        for w, p in zip(initial, model.parameters()):
            assert w.is_leaf and w.requires_grad and w.shape == (3, *p.shape)
            assert w.stride(0) != 0, "an expanded view, not a copy per task"
            assert w.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
            assert torch.equal(w, p.detach().expand_as(w))
        diffopt.step(losses_of(fmodel(*support)))
        losses_of(fmodel(*query)).sum().backward()
        batched_grads = [w.grad.clone() for w in initial]
        with torch.no_grad():
            initial[0][1].add_(1.0)  # one task's copy is its own
        assert torch.equal(initial[0][0], model[0].weight)
    assert all(p.grad is None for p in model.parameters()), "a gradient reached the model"

    for t in range(3):
        with higher_func.innerloop_ctx(model, opt, copy_initial_weights=True) as (fm, dopt):
            dopt.step(loss_of(fm(*task(support, t))))
            loss_of(fm(*task(query, t))).backward()
            expected = [w.grad for w in fm.parameters(time=0)]
        assert_close([g[t] for g in batched_grads], expected, f"grads of task {t}'s copy")


def test_shared_input_equals_expanded_input():
    model = mlp()
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False, num_tasks=3)
    generator = torch.Generator().manual_seed(5)
    stacked = [
        p.detach() + 0.1 * torch.randn(3, *p.shape, generator=generator, dtype=DTYPE)
        for p in model.parameters()
    ]
    fmodel.update_params([w.requires_grad_() for w in stacked])
    x = torch.randn(5, 4, generator=generator, dtype=DTYPE)
    shared = fmodel(x, in_dims=(None,))
    expanded = fmodel(x.expand(3, 5, 4))
    assert shared.shape == (3, 5, 3)
    assert_close(shared, expanded, "in_dims=None")
    for t in range(3):
        assert_close(shared[t], with_params(model, [w[t] for w in stacked])(x), f"task {t}")
    grads = torch.autograd.grad(shared.sum(), stacked)
    assert_close(grads, torch.autograd.grad(expanded.sum(), stacked), "gradients")


def test_shared_input_in_the_looped_fallback(no_fallback_warning_yet):
    case = ZOO["gru_cell"]()
    x, h = case.inputs
    with pytest.warns(BatchingFallbackWarning):
        fmodel = higher_func.monkeypatch(case.model, copy_initial_weights=False, num_tasks=2)
    xs = task_inputs((x,), 2, 7)[0]
    shared = fmodel(xs, h, in_dims=(0, None))
    expanded = fmodel(xs, h.expand(2, *h.shape))
    assert_close(shared, expanded, "in_dims=(0, None) with the looped fallback")


def test_methods_and_submodules_are_vmapped():
    case = ZOO["encoder_embed"]()
    model = case.model
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False, num_tasks=3)
    generator = torch.Generator().manual_seed(9)
    stacked = [
        p.detach() + 0.2 * torch.randn(3, *p.shape, generator=generator, dtype=DTYPE)
        for p in model.parameters()
    ]
    xs = task_inputs(case.inputs, 3, 4)[0]
    fmodel.update_params(stacked)
    calls = {
        "embed": lambda m, x: m.embed(x),
        "encoder": lambda m, x: m.encoder(x),
        "encoder.fc": lambda m, x: m.encoder.fc(x),
        "encoder[0]": lambda m, x: m.encoder[0](x),
        "head": lambda m, x: m.head(x[..., :2].repeat_interleave(3, -1)),
        "forward": lambda m, x: m.forward(x),
    }
    for name, call in calls.items():
        batched = call(fmodel, xs)
        for t in range(3):
            single = higher_func.monkeypatch(model, num_tasks=None)
            single.update_params([w[t] for w in stacked])
            assert_close(batched[t], call(single, xs[t]), f"{name}, task {t}")
    # Tensor attributes read through a view are the stacked fast weights.
    assert fmodel.encoder.fc.weight.shape == (3, 6, 4)


def test_params_keyword_takes_stacked_weights():
    model = mlp()
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False, num_tasks=2)
    stacked = [
        p.detach() * torch.tensor([1.0, -1.0], dtype=DTYPE).view(2, *[1] * p.dim())
        for p in model.parameters()
    ]
    xs = mlp_tasks(2)[0][0]
    out = fmodel(xs, params=stacked)
    assert_close(out[0], model(xs[0]), "task 0")
    assert_close(
        out[1], with_params(model, [-p.detach() for p in model.parameters()])(xs[1]), "task 1"
    )
    assert all(a is b for a, b in zip(fmodel.parameters(), stacked))


# ---------------------------------------------------------------------------------------------
# Recurrent modules: the looped fallback.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_fallback_warning_yet(monkeypatch):
    """Forget which modules already warned, so every test sees its own one-time warning."""
    monkeypatch.setattr(higher_func._batching, "_warned", set())


@pytest.mark.parametrize("name", ["lstm", "lstm_cell", "gru", "rnn", "gru_cell", "rnn_cell"])
def test_recurrent_models_fall_back_to_a_loop(name, no_fallback_warning_yet):
    case = ZOO[name]()
    support, query = task_inputs(case.inputs, 2, 1), task_inputs(case.inputs, 2, 2)
    opt = torch.optim.Adam(case.model.parameters(), lr=0.05)
    with pytest.warns(BatchingFallbackWarning, match="Python loop"):
        batched = run_batched(case.model, opt, support, query, steps=2)
    looped = run_looped(case.model, opt, support, query, steps=2)
    assert_same_outcome(batched, looped)
    # One-time: a second batched patch of the same kind of module stays silent (warnings are
    # errors in this suite).
    higher_func.monkeypatch(case.model, num_tasks=2)


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def batched_pair():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=3) as pair:
        yield (model, *pair)


def test_scalar_loss_is_refused(batched_pair):
    _, fmodel, diffopt = batched_pair
    xs = mlp_tasks(3)[0][0]
    with pytest.raises(ValueError, match="one loss per task"):
        diffopt.step(losses_of(fmodel(xs)).mean())


@pytest.mark.parametrize("shape", [(2,), (4,), (3, 1), (1, 3)])
def test_losses_of_the_wrong_shape_are_refused(batched_pair, shape):
    _, fmodel, diffopt = batched_pair
    xs = mlp_tasks(3)[0][0]
    loss = fmodel(xs).sum()
    with pytest.raises(ValueError, match="one loss per task"):
        diffopt.step(loss * torch.ones(shape, dtype=DTYPE))


@pytest.mark.parametrize("leading", [1, 2, 4])
def test_input_without_num_tasks_leading_dim_is_refused(batched_pair, leading):
    _, fmodel, _ = batched_pair
    with pytest.raises(ValueError, match="num_tasks"):
        fmodel(torch.randn(leading, 5, 4, dtype=DTYPE))


def test_override_of_the_wrong_length_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lrs = torch.full((4,), 0.1, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        with higher_func.innerloop_ctx(model, opt, override={"lr": [lrs]}, num_tasks=3):
            pass
    with higher_func.innerloop_ctx(model, opt, num_tasks=3) as (fmodel, diffopt):
        xs = mlp_tasks(3)[0][0]
        with pytest.raises(ValueError, match="lr"):
            diffopt.step(losses_of(fmodel(xs)), override={"lr": [lrs]})


@pytest.mark.parametrize("num_tasks", [0, -1, True, 2.5, "3"])
def test_num_tasks_must_be_a_positive_int(num_tasks):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="num_tasks"):
        higher_func.monkeypatch(model, num_tasks=num_tasks)
    with pytest.raises(ValueError, match="num_tasks"):
        with higher_func.innerloop_ctx(model, opt, num_tasks=num_tasks):
            pass


def test_stacked_params_with_the_wrong_leading_dim_name_the_parameter(batched_pair):
    model, fmodel, _ = batched_pair
    wrong = [p.detach().expand(3, *p.shape) for p in model.parameters()]
    wrong[2] = model[2].weight.detach().expand(2, *model[2].weight.shape)
    xs = mlp_tasks(3)[0][0]
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        fmodel(xs, params=wrong)
    unstacked = [p.detach() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        fmodel.update_params(unstacked)


def test_task_count_mismatch_between_model_and_optimizer():
    model = mlp()
    fmodel = higher_func.monkeypatch(model, num_tasks=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="num_tasks"):
        higher_func.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel, num_tasks=2)


# ---------------------------------------------------------------------------------------------
# Exporting one task's state.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_of_one_task_continues_in_torch_optim(name):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    support, _ = mlp_tasks(3)
    chosen = 1
    with higher_func.innerloop_ctx(
        model, opt, copy_initial_weights=False, track_higher_grads=False, num_tasks=3
    ) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(losses_of(fmodel(*support)))
        state = diffopt.state_dict(task=chosen)
        # Continue task `chosen` in torch.optim, on a copy holding that task's weights...
        clone = with_params(model, [w[chosen] for w in fmodel.parameters()])
        torch_opt = OPTIMIZERS[name](clone.parameters())
        torch_opt.load_state_dict(copy.deepcopy(state))
        for _ in range(2):
            torch_opt.zero_grad()
            loss_of(clone(support[0][chosen])).backward()
            torch_opt.step()
        # ... and in the batched optimizer.
        for _ in range(2):
            diffopt.step(losses_of(fmodel(*support)))
        continued = [w[chosen] for w in fmodel.parameters()]
    for a, e in zip(continued, clone.parameters()):
        # torch.optim keeps a few scalars (ASGD's eta/mu, NAdam's mu_product) in float32.
        torch.testing.assert_close(a, e.detach(), atol=1e-5, rtol=1e-5)


def test_state_dict_needs_a_task_when_batched(batched_pair):
    _, _, diffopt = batched_pair
    with pytest.raises(ValueError, match="task"):
        diffopt.state_dict()


def test_state_dict_of_one_task_loads_into_the_module_class():
    model = mlp(batchnorm=True)
    xs = torch.randn(3, 5, 4, dtype=DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=3) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(fmodel(xs).pow(2).mean(dim=(1, 2)))
        fmodel.eval()
        outputs = fmodel(xs)
        for task in range(3):
            adapted = copy.deepcopy(model)
            adapted.load_state_dict(fmodel.state_dict(task=task), strict=True)
            adapted.eval()
            torch.testing.assert_close(adapted(xs[task]), outputs[task])
        with pytest.raises(ValueError, match="task"):
            fmodel.state_dict()
        with pytest.raises(ValueError, match="out of range"):
            fmodel.state_dict(task=3)
