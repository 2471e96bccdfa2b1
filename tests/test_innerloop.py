"""``innerloop_ctx`` end to end: MAML over the model zoo against ``higher`` 0.2.1, its switches
(``copy_initial_weights``, ``track_higher_grads``, ``device``, ``override``, ``first_order``),
and the names legacy code imports after ``import higher_func as higher``."""

from __future__ import annotations

import copy

import higher as higher_oracle
import pytest
import torch
from zoo import ZOO, assert_module_unchanged, assert_trees_close, scalar_loss, snapshot

import higher_func

TASKS = 2
INNER_STEPS = 2


def _task_loss(output, task: int) -> torch.Tensor:
    # Tasks differ by how they weigh the output, so each adapts the weights its own way.
    scale = 1.0 + 0.5 * task
    if isinstance(output, tuple):
        output = tuple(o * scale for o in output if torch.is_tensor(o))
    else:
        output = output * scale
    return scalar_loss(output)


def _maml_step(innerloop_ctx, model: torch.nn.Module, inputs: tuple) -> None:
    """One classic MAML meta-step: adapt to each task, accumulate the query losses'
    meta-gradients in ``model``, then step the meta-optimizer."""
    meta_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    meta_opt.zero_grad()
    for task in range(TASKS):
        with innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(INNER_STEPS):
                diffopt.step(_task_loss(fmodel(*inputs), task))
            _task_loss(fmodel(*inputs), task + TASKS).backward()
    meta_opt.step()


@pytest.mark.parametrize("name", list(ZOO))
def test_maml_step_matches_higher(name):
    ours, theirs = ZOO[name](), ZOO[name]()
    _maml_step(higher_func.innerloop_ctx, ours.model, ours.inputs)
    _maml_step(higher_oracle.innerloop_ctx, theirs.model, theirs.inputs)
    grads = [p.grad for p in theirs.model.parameters() if p.grad is not None]
    # Rounding scales with the largest meta-gradient: a weight whose true meta-gradient is 0
    # (a convolution bias before BatchNorm) gets noise of that size relative to it.
    atol = 1e-10 + 1e-14 * max(g.abs().max().item() for g in grads)
    for (key, a), b in zip(ours.model.named_parameters(), theirs.model.parameters()):
        assert (a.grad is None) == (b.grad is None), key
        if a.grad is not None:
            assert_trees_close(a.grad, b.grad, atol=atol)
            assert torch.isfinite(a.grad).all(), key
    assert_trees_close(list(ours.model.parameters()), list(theirs.model.parameters()), atol=atol)
    assert any(p.grad is not None for p in ours.model.parameters())


def test_copy_initial_weights_keeps_gradients_out_of_the_model():
    case = ZOO["mlp"]()
    model = case.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(model, opt) as (fmodel, diffopt):  # True is the default
        initial = list(fmodel.parameters())
        assert all(a is not b for a, b in zip(initial, model.parameters()))
        assert all(p.is_leaf and p.requires_grad for p in initial)
        for _ in range(INNER_STEPS):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
        scalar_loss(fmodel(*case.inputs)).backward()
    assert all(p.grad is None for p in model.parameters())
    # The gradient reached the copies instead.
    assert all(p.grad is not None for p in initial)


def test_copy_initial_weights_false_differentiates_into_the_model():
    case = ZOO["mlp"]()
    model = case.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(scalar_loss(fmodel(*case.inputs)))
        scalar_loss(fmodel(*case.inputs)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_untracked_fast_weights_are_detached_and_the_model_unchanged():
    case = ZOO["conv_bn"]()
    model = case.model
    before = snapshot(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with higher_func.innerloop_ctx(
        model, opt, copy_initial_weights=False, track_higher_grads=False
    ) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
            for p in fmodel.parameters():
                assert p.grad_fn is None and p.is_leaf and p.requires_grad
        assert not fmodel.track_higher_grads
        with pytest.raises(ValueError, match="only the latest fast weights are kept"):
            fmodel.parameters(time=1)
    assert all(p.grad is None for p in model.parameters())
    assert_module_unchanged(model, before)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_device_cpu(device):
    case = ZOO["mlp"]()
    opt = torch.optim.Adam(case.model.parameters(), lr=0.01)
    twin = copy.deepcopy(case.model)
    with higher_func.innerloop_ctx(case.model, opt, device=device) as (fmodel, diffopt):
        diffopt.step(scalar_loss(fmodel(*case.inputs)))
        assert all(p.device.type == "cpu" for p in fmodel.parameters())
        assert all(
            s["exp_avg"].device.type == "cpu" for group in diffopt.state for s in group.values()
        )
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    scalar_loss(twin(*case.inputs)).backward()
    twin_opt.step()
    assert_trees_close(list(fmodel.parameters()), list(twin.parameters()))


def test_override_and_first_order_reach_the_optimizer():
    case = ZOO["mlp"]()
    model = case.model
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(
        model, opt, copy_initial_weights=False, override={"lr": [lr]}, first_order=True
    ) as (fmodel, diffopt):
        assert diffopt.param_groups[0]["lr"] is lr
        for _ in range(INNER_STEPS):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
        final = list(fmodel.parameters())
        query = scalar_loss(fmodel(*case.inputs))
        fomaml = torch.autograd.grad(query, final, retain_graph=True)
        query.backward()
    assert lr.grad is not None and torch.isfinite(lr.grad)
    assert_trees_close([p.grad for p in model.parameters()], list(fomaml))


def test_the_model_is_left_unchanged():
    case = ZOO["conv_bn"]()
    model = case.model
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(INNER_STEPS):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
    assert_module_unchanged(model, before)


def test_legacy_imports():
    import higher_func as higher
    from higher_func.optim import (
        apply_trainable_opt_params,
        get_diff_optim,
        get_trainable_opt_params,
    )

    assert callable(higher.innerloop_ctx)
    assert higher.optim.DifferentiableSGD is higher_func.optim.DifferentiableSGD
    assert higher.get_diff_optim is get_diff_optim
    for name in ("monkeypatch", "create_diff_optim", "register_optim"):
        assert callable(getattr(higher, name)), name
    assert callable(higher.patch.monkeypatch)

    # A legacy program, unchanged but for its import line.
    case = ZOO["mlp"]()
    model = case.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    override = get_trainable_opt_params(opt)
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        assert isinstance(diffopt, higher.optim.DifferentiableSGD)
        diffopt.step(scalar_loss(fmodel(*case.inputs)))
        scalar_loss(fmodel(*case.inputs)).backward()
    assert override["lr"][0].grad is not None
    with torch.no_grad():
        override["lr"][0].sub_(0.01)
    apply_trainable_opt_params(opt, override)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09)
