"""Bad input to a patched module fails at once, with a message that names the mistake.

Hand-written cases, one per mistake, each checking the exception type and message. The same
contract over drawn input (every entry point, both the patch and the optimizer) is the
property of ``test_bad_input.py``; the optimizer's own cases are in ``test_optim_errors.py``.
"""

import re

import pytest
import torch
from zoo import ZOO, assert_module_unchanged, perturbed_params, snapshot

import higher_func
import higher_func.patch as hf_patch

ERRORS = (ValueError, TypeError, KeyError, RuntimeError)


@pytest.fixture
def mlp():
    """The zoo MLP: parameters 0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias."""
    case = ZOO["mlp"]()
    names = [n for n, _ in case.model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    return case


def _named(model, params):
    return dict(zip((n for n, _ in model.named_parameters()), params))


def test_wrong_number_of_params(mlp):
    fmodel = hf_patch.monkeypatch(mlp.model)
    params = perturbed_params(mlp.model)[:-1]
    with pytest.raises(ERRORS, match=r"(?i)param") as info:
        fmodel(*mlp.inputs, params=params)
    message = str(info.value)
    assert "6" in message and "5" in message, message


def test_update_params_with_wrong_number(mlp):
    fmodel = hf_patch.monkeypatch(mlp.model)
    params = perturbed_params(mlp.model) + [torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(ERRORS, match=r"(?i)param") as info:
        fmodel.update_params(params)
    message = str(info.value)
    assert "6" in message and "7" in message, message


@pytest.mark.parametrize("form", ["list", "dict"])
def test_param_with_wrong_shape_names_it(mlp, form):
    fmodel = hf_patch.monkeypatch(mlp.model)
    params = perturbed_params(mlp.model)
    # A bias of shape (1,) where (8,) is expected would broadcast silently in forward.
    params[3] = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    given = params if form == "list" else _named(mlp.model, params)
    with pytest.raises(ERRORS, match=re.escape("2.bias")):
        fmodel(*mlp.inputs, params=given)


@pytest.mark.parametrize("form", ["list", "dict"])
def test_non_tensor_param(mlp, form):
    fmodel = hf_patch.monkeypatch(mlp.model)
    params = perturbed_params(mlp.model)
    params[2] = params[2].tolist()
    given = params if form == "list" else _named(mlp.model, params)
    with pytest.raises(ERRORS, match=r"(?i)tensor"):
        fmodel(*mlp.inputs, params=given)


def test_dict_with_unknown_key_names_it(mlp):
    fmodel = hf_patch.monkeypatch(mlp.model)
    given = _named(mlp.model, perturbed_params(mlp.model))
    given["bogus.weight"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ERRORS, match=re.escape("bogus.weight")):
        fmodel(*mlp.inputs, params=given)


def test_dict_with_missing_key_names_it(mlp):
    fmodel = hf_patch.monkeypatch(mlp.model)
    given = _named(mlp.model, perturbed_params(mlp.model))
    del given["2.bias"]
    with pytest.raises(ERRORS, match=re.escape("2.bias")):
        fmodel(*mlp.inputs, params=given)


def test_params_required_without_fast_weights(mlp):
    fmodel = hf_patch.make_functional(mlp.model)
    with pytest.raises(ERRORS, match=r"(?i)params"):
        fmodel(*mlp.inputs)


def test_past_parameters_when_not_tracking(mlp):
    fmodel = hf_patch.monkeypatch(mlp.model, track_higher_grads=False)
    fmodel.update_params(perturbed_params(mlp.model, seed=1))
    fmodel.update_params(perturbed_params(mlp.model, seed=2))
    with pytest.raises(ERRORS, match=r"(?i)track"):
        list(fmodel.parameters(time=1))


@pytest.mark.parametrize("patch", ["monkeypatch", "make_functional"])
def test_patching_a_patched_module(mlp, patch):
    fmodel = hf_patch.monkeypatch(mlp.model)
    with pytest.raises(ERRORS, match=r"(?i)patch"):
        getattr(hf_patch, patch)(fmodel)


@pytest.mark.parametrize("patch", ["monkeypatch", "make_functional"])
def test_patching_a_module_that_holds_a_patched_module(mlp, patch):
    # The patched module is an nn.Module to torch, so it can be a child; patching the parent
    # again is refused as higher refused it, naming the child.
    parent = torch.nn.Sequential(hf_patch.monkeypatch(mlp.model), torch.nn.Identity())
    with pytest.raises(ValueError, match=r"submodule '0' of this module is a patched module"):
        getattr(hf_patch, patch)(parent)


def test_track_higher_grads_must_be_bool(mlp):
    fmodel = hf_patch.monkeypatch(mlp.model)
    with pytest.raises(TypeError, match="track_higher_grads must be a bool, got int"):
        fmodel.track_higher_grads = 1
    assert fmodel.track_higher_grads is True


def test_track_higher_grads_argument_must_be_bool(mlp):
    with pytest.raises(TypeError, match="track_higher_grads must be a bool, got int"):
        hf_patch.monkeypatch(mlp.model, track_higher_grads=1)


@pytest.mark.parametrize("flag", ["copy_initial_weights", "track_higher_grads"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_flags_of_monkeypatch_and_innerloop_ctx_must_be_bools(mlp, flag, value):
    # higher took copy_initial_weights="no" as true and silently copied.
    kind = type(value).__name__
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got {kind}"):
        hf_patch.monkeypatch(mlp.model, **{flag: value})
    opt = torch.optim.SGD(mlp.model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got {kind}"):
        with higher_func.innerloop_ctx(mlp.model, opt, **{flag: value}):
            pass


@pytest.mark.parametrize("num_tasks", [None, 2])
def test_state_dict_task_fits_the_patch(mlp, num_tasks):
    fmodel = hf_patch.monkeypatch(mlp.model, num_tasks=num_tasks)
    wrong = 0 if num_tasks is None else None
    with pytest.raises(
        ValueError, match=r"state_dict\(task=t\) selects one task of a batched patched"
    ):
        fmodel.state_dict(task=wrong)
    if num_tasks is not None:
        with pytest.raises(ValueError, match="task 2 is out of range for num_tasks=2"):
            fmodel.state_dict(task=2)
        with pytest.raises(TypeError, match="state_dict\\(task=\\) must be an int, got float"):
            fmodel.state_dict(task=1.0)


def test_rejected_params_change_nothing(mlp):
    # Validation happens before anything is stored or lent: the fast weights, their history
    # and the module are as they were.
    before = snapshot(mlp.model)
    fmodel = hf_patch.monkeypatch(mlp.model)
    current = list(fmodel.fast_params)
    bad = perturbed_params(mlp.model)
    bad[0] = bad[0].t()
    with pytest.raises(ERRORS, match=re.escape("0.weight")):
        fmodel(*mlp.inputs, params=bad)
    with pytest.raises(ERRORS, match=re.escape("0.weight")):
        fmodel.update_params(bad)
    assert all(a is b for a, b in zip(fmodel.fast_params, current))
    assert len(list(fmodel.parameters(time=0))) == len(current)
    with pytest.raises((IndexError, *ERRORS)):
        list(fmodel.parameters(time=1))  # no step was recorded
    assert_module_unchanged(mlp.model, before)


@pytest.mark.parametrize("num_tasks", [None, 2])
@pytest.mark.parametrize("method", ["to", "cuda", "double", "half", "load_state_dict", "_apply"])
def test_module_methods_that_would_overwrite_fast_weights_are_refused(method, num_tasks):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    fmodel = hf_patch.monkeypatch(model, num_tasks=num_tasks)
    with pytest.raises(AttributeError, match=rf"no {method}\(\).*fast weights"):
        getattr(fmodel, method)
    if num_tasks is not None:  # per-task proxies of submodules refuse them too
        with pytest.raises(AttributeError, match=rf"no {method}\(\).*fast weights"):
            getattr(fmodel[0], method)
