"""Bad input to ``higher_func.optim`` fails at once, with a message naming the mistake.

Each test also checks that a rejected call leaves the optimizer as it was, so a caller who
catches the error can go on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import higher_func
from higher_func.optim import (
    DifferentiableOptimizer,
    apply_trainable_opt_params,
    create_diff_optim,
    get_diff_optim,
    register_optim,
)


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _two_groups(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}],
        lr=0.1,
    )


def _data():
    return torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)


def _patched():
    model = _model()
    opt = _two_groups(model)
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=True)
    return model, opt, fmodel, get_diff_optim(opt, model.parameters(), fmodel=fmodel)


def _loss(fmodel) -> torch.Tensor:
    x, y = _data()
    return F.mse_loss(fmodel(x), y)


class UnknownSGD(torch.optim.SGD):
    """A subclass is a type of its own: it is not registered through its base."""


# ---------------------------------------------------------------------------------------------
# Unregistered optimizers.
# ---------------------------------------------------------------------------------------------


def test_unregistered_optimizer_type_says_how_to_register():
    model = _model()
    opt = UnknownSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"UnknownSGD.*higher_func\.register_optim\(UnknownSGD"):
        get_diff_optim(opt, model.parameters())
    with pytest.raises(ValueError, match=r"UnknownSGD.*register_optim"):
        create_diff_optim(UnknownSGD, {"lr": 0.1}, params=list(model.parameters()))
    with pytest.raises(ValueError, match=r"UnknownSGD.*register_optim"):
        with higher_func.innerloop_ctx(model, opt):
            pass


def test_register_optim_rejects_what_is_not_an_optimizer_class():
    with pytest.raises(TypeError, match="optim_type must be a torch.optim.Optimizer subclass"):
        register_optim(
            torch.optim.SGD([torch.zeros(1, requires_grad=True)]), DifferentiableOptimizer
        )
    with pytest.raises(TypeError, match="diff_optim_type must subclass DifferentiableOptimizer"):
        register_optim(UnknownSGD, object)


def test_not_an_optimizer():
    model = _model()
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer, got dict"):
        higher_func.optim.DifferentiableSGD({"lr": 0.1}, model.parameters())


# ---------------------------------------------------------------------------------------------
# Overrides.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 3])
def test_override_list_fits_neither_one_nor_every_group(count):
    model = _model()
    values = [torch.tensor(0.1)] * count
    with pytest.raises(
        ValueError,
        match=rf"override\['lr'\] has {count} values; expected 1 or one per parameter group \(2\)",
    ):
        get_diff_optim(_two_groups(model), model.parameters(), override={"lr": values})


def test_override_of_an_unknown_key_lists_the_known_ones():
    model = _model()
    with pytest.raises(KeyError, match=r"'learning_rate', which is not a hyperparameter.*'lr'"):
        get_diff_optim(_two_groups(model), model.parameters(), override={"learning_rate": [0.1]})
    with pytest.raises(KeyError, match=r"'params', which is not a hyperparameter"):
        get_diff_optim(_two_groups(model), model.parameters(), override={"params": [[]]})


def test_override_of_the_wrong_type():
    model = _model()
    with pytest.raises(
        TypeError, match=r"override\['lr'\] must be a number or a tensor, got '0.1'"
    ):
        get_diff_optim(_two_groups(model), model.parameters(), override={"lr": ["0.1"]})
    with pytest.raises(TypeError, match=r"override\['lr'\] must be a list"):
        get_diff_optim(_two_groups(model), model.parameters(), override={"lr": 0.1})
    with pytest.raises(TypeError, match=r"override\['nesterov'\] must be a bool"):
        get_diff_optim(_two_groups(model), model.parameters(), override={"nesterov": [1]})
    with pytest.raises(TypeError, match=r"override\['lr'\] must be a floating-point tensor"):
        get_diff_optim(_two_groups(model), model.parameters(), override={"lr": [torch.tensor(1)]})
    with pytest.raises(TypeError, match="override must be a dict"):
        get_diff_optim(_two_groups(model), model.parameters(), override=[("lr", [0.1])])


def test_bad_override_at_step_changes_nothing():
    _, _, fmodel, diffopt = _patched()
    before = list(fmodel.parameters())
    with pytest.raises(TypeError, match=r"override\['lr'\] must be a number or a tensor"):
        diffopt.step(_loss(fmodel), override={"lr": ["fast"]})
    with pytest.raises(ValueError, match=r"override\['lr'\] has 3 values"):
        diffopt.step(_loss(fmodel), override={"lr": [0.1, 0.2, 0.3]})
    assert [g["lr"] for g in diffopt.param_groups] == [0.1, 0.1]
    assert all(a is b for a, b in zip(fmodel.parameters(), before))


# ---------------------------------------------------------------------------------------------
# Parameters.
# ---------------------------------------------------------------------------------------------


def test_optimizer_parameter_missing_from_reference_params():
    model, other = _model(), _model()
    with pytest.raises(
        ValueError, match=r"parameter 0 of group 0 \(shape \(4, 3\)\) is not among reference_params"
    ):
        get_diff_optim(_two_groups(model), other.parameters())


def test_step_without_params_and_without_patched_module():
    model = _model()
    diffopt = get_diff_optim(_two_groups(model), model.parameters())
    x, y = _data()
    with pytest.raises(ValueError, match=r"step\(\) needs params= .*no patched module"):
        diffopt.step(F.mse_loss(model(x), y))


def test_step_with_the_wrong_number_of_params():
    model = _model()
    diffopt = get_diff_optim(_two_groups(model), model.parameters())
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"step\(\) got 3 parameters, expected 4"):
        diffopt.step(params[0].sum(), params=params[:3])


# ---------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------


def test_non_scalar_loss():
    _, _, fmodel, diffopt = _patched()
    x, y = _data()
    before = list(fmodel.parameters())
    with pytest.raises(ValueError, match=r"loss must be a scalar, got shape \(5, 2\)"):
        diffopt.step(F.mse_loss(fmodel(x), y, reduction="none"))
    assert all(a is b for a, b in zip(fmodel.parameters(), before))


def test_rejected_step_keeps_the_stored_override():
    # The override of a step that fails must not outlive it: validate before changing state.
    _, _, fmodel, diffopt = _patched()
    x, y = _data()
    with pytest.raises(ValueError, match="loss must be a scalar"):
        diffopt.step(F.mse_loss(fmodel(x), y, reduction="none"), override={"lr": [0.5]})
    with pytest.raises(ValueError, match="grad_callback returned 1 gradients"):
        diffopt.step(_loss(fmodel), override={"lr": [0.5]}, grad_callback=lambda g: g[:1])
    assert [g["lr"] for g in diffopt.param_groups] == [0.1, 0.1]


def test_loss_that_is_not_a_tensor():
    _, _, fmodel, diffopt = _patched()
    with pytest.raises(TypeError, match="loss must be a tensor, got float"):
        diffopt.step(1.0)


def test_loss_not_requiring_grad():
    model, _, fmodel, diffopt = _patched()
    x, y = _data()
    with torch.no_grad():
        loss = F.mse_loss(fmodel(x), y)
    with pytest.raises(ValueError, match="loss does not require grad"):
        diffopt.step(loss)
    # A loss of the original module is not a loss of the fast weights either.
    detached = F.mse_loss(model(x), y).detach()
    with pytest.raises(ValueError, match="loss does not require grad"):
        diffopt.step(detached)


def test_loss_not_computed_from_the_fast_weights():
    # The classic slip: the loss of the original module (it requires grad, through the
    # module's own parameters) instead of the patched one. No fast weight gets a gradient,
    # so the step would silently change nothing.
    model = _model()
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False)
    diffopt = get_diff_optim(_two_groups(model), model.parameters(), fmodel=fmodel)
    before = list(fmodel.parameters())
    x, y = _data()
    with pytest.raises(ValueError, match="fast weight"):
        diffopt.step(F.mse_loss(model(x), y))
    assert all(a is b for a, b in zip(fmodel.parameters(), before))


def test_grad_callback_returning_the_wrong_number_of_gradients():
    _, _, fmodel, diffopt = _patched()
    with pytest.raises(ValueError, match="grad_callback returned 1 gradients for 4 parameters"):
        diffopt.step(_loss(fmodel), grad_callback=lambda grads: grads[:1])


# ---------------------------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, "yes", None])
def test_track_higher_grads_must_be_a_bool(value):
    model = _model()
    with pytest.raises(TypeError, match="track_higher_grads must be a bool"):
        get_diff_optim(_two_groups(model), model.parameters(), track_higher_grads=value)
    with pytest.raises(TypeError, match="track_higher_grads must be a bool"):
        with higher_func.innerloop_ctx(model, _two_groups(model), track_higher_grads=value):
            pass


def test_first_order_must_be_a_bool():
    model = _model()
    with pytest.raises(TypeError, match="first_order must be a bool"):
        get_diff_optim(_two_groups(model), model.parameters(), first_order="yes")


def test_create_diff_optim_needs_params_or_fmodel():
    with pytest.raises(ValueError, match="create_diff_optim needs params= or fmodel="):
        create_diff_optim(torch.optim.SGD, {"lr": 0.1})


def test_misspelt_options_are_refused():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fmodel = higher_func.monkeypatch(model)
    with pytest.raises(TypeError, match="first_ordr"):
        higher_func.get_diff_optim(opt, model.parameters(), fmodel=fmodel, first_ordr=True)
    diffopt = higher_func.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    with pytest.raises(TypeError, match="overide"):
        diffopt.step(_loss(fmodel), overide={"lr": [0.5]})


def test_elementwise_override_that_does_not_fit_names_key_and_shapes():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    with pytest.raises(ValueError, match=r"override\['lr'\] has shape \(2,\).*\(2, 3\)"):
        get_diff_optim(opt, model.parameters(), override={"lr": [torch.ones(2), torch.ones(2)]})
    # One value for every group must fit the weight and the bias alike.
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*weight of shape \(2,\)"):
        get_diff_optim(opt, model.parameters(), override={"lr": [torch.ones(2, 3)]})
    # Per-group values that fit are accepted, as is a broadcastable (1, 3) row.
    get_diff_optim(opt, model.parameters(), override={"lr": [torch.ones(1, 3), torch.ones(2)]})


def test_batched_elementwise_override_shapes():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    fmodel = higher_func.monkeypatch(model, num_tasks=4)
    fine = [
        [torch.ones(4), torch.ones(4)],  # per task
        [torch.ones(2, 3), torch.ones(2)],  # per coordinate, shared by the tasks
        [torch.ones(4, 2, 3), torch.ones(4, 2)],  # per task and coordinate
        [torch.ones(1, 2, 3), torch.ones(4, 1)],  # broadcastable to those
    ]
    for lrs in fine:
        get_diff_optim(opt, model.parameters(), fmodel=fmodel, override={"lr": lrs})
    with pytest.raises(ValueError, match=r"has shape \(3, 2, 3\).*\(4,\) or \(4, \*\(2, 3\)\)"):
        get_diff_optim(
            opt, model.parameters(), fmodel=fmodel, override={"lr": [torch.ones(3, 2, 3), 0.1]}
        )
    with pytest.raises(ValueError, match=r"has shape \(1, 4, 2, 3\)"):
        get_diff_optim(
            opt, model.parameters(), fmodel=fmodel, override={"lr": [torch.ones(1, 4, 2, 3), 0.1]}
        )


def test_apply_trainable_opt_params_refuses_elementwise_values():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"override\['lr'\] has shape \(2, 3\); expected one"):
        apply_trainable_opt_params(opt, {"lr": [torch.ones(2, 3)]})


_dims = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(shape=_dims.filter(lambda s: len(s) > 0), lr_shape=_dims)
def test_an_elementwise_lr_is_accepted_exactly_when_it_broadcasts_to_the_weight(shape, lr_shape):
    weight = torch.zeros(shape, requires_grad=True)
    opt = torch.optim.SGD([weight], lr=0.1)
    lr = torch.full(lr_shape, 0.5)
    try:
        fits = torch.broadcast_shapes(lr_shape, shape) == shape
    except RuntimeError:
        fits = False
    fits = fits or lr.numel() == 1
    if not fits:
        with pytest.raises(ValueError, match=r"override\['lr'\] has shape"):
            get_diff_optim(opt, [weight], override={"lr": [lr]})
        return
    diffopt = get_diff_optim(opt, [weight], override={"lr": [lr]})
    fast = weight.clone()
    (new,) = diffopt.step((fast * torch.arange(fast.numel()).reshape(shape)).sum(), params=[fast])
    assert new.shape == weight.shape
    torch.testing.assert_close(
        new, -0.5 * torch.arange(fast.numel(), dtype=new.dtype).reshape(shape)
    )
