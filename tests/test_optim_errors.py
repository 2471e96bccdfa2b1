"""Bad input to ``higher_func.optim`` fails at once, with a message naming the mistake.

Hand-written cases, one per mistake, each checking the exception type (``TypeError`` for a
wrong type, ``ValueError`` for a wrong value, ``KeyError`` for an unknown key) and the message;
where a rejected call could have changed something, the test checks that it did not. The same
contract over drawn input is the property of ``test_bad_input.py``; the patched module's own
cases are in ``test_patch_errors.py``.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO

import higher_func
from higher_func.optim import (
    DifferentiableOptimizer,
    apply_trainable_opt_params,
    create_diff_optim,
    get_diff_optim,
    register_optim,
)


def _model() -> nn.Module:
    """The zoo MLP (float64): 0.weight (8, 4), 0.bias, 2.weight (8, 8), 2.bias, 4.weight (3, 8),
    4.bias."""
    return ZOO["mlp"]().model


def _two_groups(model: nn.Module) -> torch.optim.Optimizer:
    second = [*model[2].parameters(), *model[4].parameters()]
    return torch.optim.SGD([{"params": list(model[0].parameters())}, {"params": second}], lr=0.1)


def _data():
    return torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)


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


def test_optimizer_class_or_name_where_an_instance_is_expected_names_the_mistake():
    model = _model()
    with pytest.raises(TypeError, match=r"takes an optimizer instance, got the class SGD"):
        get_diff_optim(torch.optim.SGD, model.parameters())
    with pytest.raises(TypeError, match=r"takes a torch.optim.Optimizer, got str 'sgd'"):
        get_diff_optim("sgd", model.parameters())
    with pytest.raises(TypeError, match=r"takes an optimizer instance, got the class SGD"):
        with higher_func.innerloop_ctx(model, torch.optim.SGD):
            pass


def test_optimizer_instance_or_name_where_a_class_is_expected_names_the_mistake():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"takes an optimizer class, got an instance of SGD"):
        create_diff_optim(opt, params=list(model.parameters()))
    with pytest.raises(TypeError, match=r"expected a torch.optim.Optimizer class, got str 'sgd'"):
        create_diff_optim("sgd", {"lr": 0.1}, params=list(model.parameters()))


def test_register_optim_rejects_what_is_not_an_optimizer_class():
    with pytest.raises(TypeError, match="optim_type must be a torch.optim.Optimizer subclass"):
        register_optim(
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), DifferentiableOptimizer
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
    with pytest.raises(KeyError) as info:
        get_diff_optim(_two_groups(model), model.parameters(), override={"learning_rate": [0.1]})
    # A sentence, not the quoted repr a plain KeyError prints.
    assert str(info.value).startswith("override names 'learning_rate', which is not")
    with pytest.raises(KeyError, match=r"'learning_rate', which is not a hyperparameter.*'lr'"):
        get_diff_optim(_two_groups(model), model.parameters(), override={"learning_rate": [0.1]})
    with pytest.raises(KeyError, match=r"'params', which is not a hyperparameter"):
        get_diff_optim(_two_groups(model), model.parameters(), override={"params": [[]]})


def test_a_wrong_key_shows_a_public_documented_class_in_tracebacks():
    model = _model()
    with pytest.raises(higher_func.UnknownKeyError) as info:
        get_diff_optim(_two_groups(model), model.parameters(), override={"learning_rate": [0.1]})
    # What the last line of a traceback names: importable from there, documented there.
    shown = traceback.format_exception_only(info.type, info.value)[-1]
    assert shown.startswith("higher_func.UnknownKeyError: override names 'learning_rate'")
    assert higher_func.UnknownKeyError.__doc__ and "UnknownKeyError" in higher_func.__all__


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
        ValueError, match=r"parameter 0 of group 0 \(shape \(8, 4\)\) is not among reference_params"
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
    with pytest.raises(ValueError, match=r"step\(\) got 3 parameters, expected 6"):
        diffopt.step(params[0].sum(), params=params[:3])


# ---------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------


def test_non_scalar_loss():
    _, _, fmodel, diffopt = _patched()
    x, y = _data()
    before = list(fmodel.parameters())
    with pytest.raises(ValueError, match=r"loss must be a scalar, got shape \(5, 3\)"):
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
    with pytest.raises(ValueError, match="grad_callback returned 1 gradients for 6 parameters"):
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


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_state_dict_task_fits_the_optimizer(batched):
    model = _model()
    fmodel = higher_func.monkeypatch(model, num_tasks=2 if batched else None)
    diffopt = get_diff_optim(_two_groups(model), model.parameters(), fmodel=fmodel)
    with pytest.raises(ValueError, match=r"state_dict\(task=t\) selects one task of a batched opt"):
        diffopt.state_dict(task=None if batched else 0)
    if batched:
        with pytest.raises(ValueError, match="task 2 is out of range for num_tasks=2"):
            diffopt.state_dict(task=2)
        with pytest.raises(TypeError, match=r"state_dict\(task=\) must be an int, got str"):
            diffopt.state_dict(task="0")


def test_numerics_mode_must_be_one_of_the_two_strings():
    with pytest.raises(TypeError, match=r"numerics\(mode\) must be the string 'torch' or 'higher'"):
        higher_func.optim.numerics(None)
    with pytest.raises(ValueError, match=r"numerics\(mode\) must be 'torch'.*got 'fast'"):
        higher_func.optim.numerics("fast")
    assert higher_func.optim.get_numerics() == "torch"
