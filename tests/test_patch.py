"""``higher_func.patch`` against the ``higher`` 0.2.1 oracle and the plain module, over the zoo.

Every zoo model is patched twice from identical seeds, once by ``higher_func`` and once by
``higher``; both must give the same outputs, gradients and meta-gradients, and both must agree
with the plain module carrying the same weights. A patched module must also never leave the
user's module changed, whether its forward succeeds or raises.
"""

import copy
import gc
import importlib
import os
import subprocess
import sys
import weakref

import higher
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from zoo import (
    HIGHER_TWINS,
    RECURRENT,
    WITH_BATCHNORM,
    ZOO,
    assert_module_unchanged,
    assert_trees_close,
    perturbed_params,
    scalar_loss,
    snapshot,
    tensors_in,
    trainable,
    with_params,
)

import higher_func
import higher_func.patch as hf_patch

NAMES = list(ZOO)
over_zoo = pytest.mark.parametrize("name", NAMES)

TOLERANCE = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 1e-6, "rtol": 1e-5},
}


def _pair(name, dtype=torch.float64, **kwargs):
    """The same zoo model patched by higher_func and by higher, each with its own module."""
    ours, theirs = ZOO[name](dtype), HIGHER_TWINS.get(name, ZOO[name])(dtype)
    return (
        ours,
        hf_patch.monkeypatch(ours.model, **kwargs),
        theirs,
        higher.monkeypatch(theirs.model, **kwargs),
    )


def _detached_copies(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def _assert_same_tensors(actual, expected):
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a is e


def _grads(loss, wrt):
    assert wrt, "nothing to differentiate"
    return torch.autograd.grad(loss, wrt)


# ---------------------------------------------------------------------------------------------
# (1) Forward outputs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@over_zoo
def test_forward_matches_higher_and_plain_module(name, dtype):
    tol = TOLERANCE[dtype]
    ours, fmodel, theirs, hmodel = _pair(name, dtype)
    plain = copy.deepcopy(ours.model)

    # The initial fast weights are the module's own.
    out = fmodel(*ours.inputs)
    assert_trees_close(out, hmodel(*theirs.inputs), **tol)
    assert_trees_close(out, plain(*ours.inputs), **tol)

    # Explicit fast weights.
    params = perturbed_params(ours.model, seed=3)
    out = fmodel(*ours.inputs, params=params)
    assert_trees_close(out, hmodel(*theirs.inputs, params=_detached_copies(params)), **tol)
    assert_trees_close(out, with_params(ours.model, params)(*ours.inputs), **tol)
    # The output really depends on the fast weights given.
    assert not torch.allclose(tensors_in(out)[0], tensors_in(plain(*ours.inputs))[0])


@over_zoo
def test_dict_params_match_list_params(name):
    case = ZOO[name]()
    fmodel = hf_patch.monkeypatch(case.model)
    params = perturbed_params(case.model, seed=4)
    names = [n for n, _ in case.model.named_parameters()]
    assert len(names) == len(params)
    by_name = dict(zip(names, params))
    out_dict = fmodel(*case.inputs, params=by_name)
    out_list = fmodel(*case.inputs, params=params)
    assert_trees_close(out_dict, out_list)
    assert_trees_close(out_dict, with_params(case.model, params)(*case.inputs))


@over_zoo
def test_passed_params_become_current_fast_weights(name):
    case = ZOO[name]()
    fmodel = hf_patch.monkeypatch(case.model)
    params = perturbed_params(case.model, seed=5)
    fmodel(*case.inputs, params=params)
    _assert_same_tensors(fmodel.fast_params, params)
    _assert_same_tensors(fmodel.parameters(), params)
    # A later call without params runs on them.
    assert_trees_close(fmodel(*case.inputs), with_params(case.model, params)(*case.inputs))


@over_zoo
def test_initial_fast_weights_are_detached_copies(name):
    case = ZOO[name]()
    originals = list(case.model.parameters())
    fmodel = hf_patch.monkeypatch(case.model)
    fast = list(fmodel.fast_params)
    assert len(fast) == len(originals)
    for f, p in zip(fast, originals):
        assert f is not p
        assert f.is_leaf
        assert f.requires_grad == p.requires_grad
        assert f.dtype == p.dtype and f.shape == p.shape
        assert torch.equal(f, p.detach())
        assert f.data_ptr() != p.data_ptr(), "fast weight shares storage with the module"


@over_zoo
def test_uncopied_initial_fast_weights_are_in_the_graph(name):
    case = ZOO[name]()
    originals = list(case.model.parameters())
    fmodel = hf_patch.monkeypatch(case.model, copy_initial_weights=False)
    fast = list(fmodel.fast_params)
    assert len(fast) == len(originals)
    for f, p in zip(fast, originals):
        assert f is not p
        assert torch.equal(f.detach(), p.detach())
        assert f.requires_grad == p.requires_grad
        if p.requires_grad:
            assert not f.is_leaf, "fast weight is cut off from the module's parameter"


@over_zoo
def test_named_parameters_and_buffers_follow_the_module(name):
    case = ZOO[name]()
    fmodel = hf_patch.monkeypatch(case.model)
    params = perturbed_params(case.model, seed=6)
    fmodel.update_params(params)

    module_names = [n for n, _ in case.model.named_parameters()]
    named = list(fmodel.named_parameters())
    assert [n for n, _ in named] == module_names
    _assert_same_tensors([t for _, t in named], params)

    module_buffers = dict(case.model.named_buffers())
    fbuffers = list(fmodel.named_buffers())
    assert [n for n, _ in fbuffers] == list(module_buffers)
    assert len(list(fmodel.buffers())) == len(module_buffers)
    for n, b in fbuffers:
        assert b is not module_buffers[n]
        assert torch.equal(b, module_buffers[n])
        assert b.dtype == module_buffers[n].dtype


@over_zoo
def test_proxy_identity_and_repr(name):
    case = ZOO[name]()
    fmodel = hf_patch.monkeypatch(case.model)
    assert isinstance(fmodel, hf_patch._MonkeyPatchBase)
    # An instance of the user's class to isinstance, as in higher, without being a subclass.
    assert isinstance(fmodel, type(case.model)) and isinstance(fmodel, nn.Module)
    assert not issubclass(type(fmodel), type(case.model))
    text = repr(fmodel)
    assert isinstance(text, str)
    first_leaf = next(m for m in case.model.modules() if not list(m.children()))
    assert type(first_leaf).__name__ in text


def test_patched_module_is_a_proxy_not_a_copy_of_the_class():
    # The patched module is a plain proxy (Dynamo must be able to build one inside a compiled
    # meta-step), never a subclass or copy of the module's class; isinstance and torch see an
    # instance of the module's class, as with higher.
    case = ZOO["mlp"]()
    cls = type(case.model)
    for fmodel in (hf_patch.monkeypatch(case.model), hf_patch.make_functional(case.model)):
        assert isinstance(fmodel, hf_patch._MonkeyPatchBase)
        assert isinstance(fmodel, nn.Module) and isinstance(fmodel, cls)
        assert fmodel.__class__ is cls
        assert type(fmodel).__module__ == "higher_func.patch"
    assert type(case.model) is cls


def test_repr_shows_the_wrapped_layers():
    case = ZOO["mlp"]()
    text = repr(hf_patch.monkeypatch(case.model))
    assert "in_features=4" in text and "out_features=3" in text


def test_keyword_arguments_reach_forward():
    case = ZOO["gru_cell"]()
    x, h = case.inputs
    fmodel = hf_patch.monkeypatch(case.model)
    assert_trees_close(fmodel(x, hx=h), case.model(x, h))
    params = perturbed_params(case.model)
    assert_trees_close(fmodel(x, params=params, hx=h), with_params(case.model, params)(x, h))


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_device_casts_fast_weights_and_buffers(device, dtype):
    case = ZOO["conv_bn"](dtype)
    fmodel = hf_patch.monkeypatch(case.model, device=device)
    for f, p in zip(fmodel.fast_params, case.model.parameters()):
        assert f.device == torch.device("cpu")
        assert f.dtype == p.dtype == dtype
        assert f.requires_grad == p.requires_grad
    module_buffers = dict(case.model.named_buffers())
    for n, b in fmodel.named_buffers():
        assert b.device == torch.device("cpu")
        assert b.dtype == module_buffers[n].dtype
        assert b is not module_buffers[n]
    assert module_buffers["1.num_batches_tracked"].dtype == torch.int64
    plain = copy.deepcopy(case.model)
    assert_trees_close(fmodel(*case.inputs), plain(*case.inputs), **TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------------
# (2) First-order gradients.
# ---------------------------------------------------------------------------------------------


@over_zoo
def test_first_order_grads_match_higher_and_plain_module(name):
    ours, fmodel, theirs, hmodel = _pair(name)
    params = perturbed_params(ours.model, seed=7)
    params_h = _detached_copies(params)

    grads = _grads(scalar_loss(fmodel(*ours.inputs, params=params)), trainable(params))
    grads_h = _grads(scalar_loss(hmodel(*theirs.inputs, params=params_h)), trainable(params_h))
    assert_trees_close(grads, grads_h)

    plain = with_params(ours.model, params)
    grads_plain = _grads(scalar_loss(plain(*ours.inputs)), trainable(list(plain.parameters())))
    assert_trees_close(grads, grads_plain)


@over_zoo
def test_grads_reach_implicit_fast_weights(name):
    ours, fmodel, theirs, hmodel = _pair(name)
    fast, fast_h = list(fmodel.fast_params), list(hmodel.fast_params)
    grads = _grads(scalar_loss(fmodel(*ours.inputs)), trainable(fast))
    grads_h = _grads(scalar_loss(hmodel(*theirs.inputs)), trainable(fast_h))
    assert_trees_close(grads, grads_h)
    assert any(g.abs().sum() > 0 for g in grads)


@over_zoo
def test_grads_reach_module_params_without_copy(name):
    ours, fmodel, theirs, hmodel = _pair(name, copy_initial_weights=False)
    plain = copy.deepcopy(ours.model)
    grads = _grads(scalar_loss(fmodel(*ours.inputs)), trainable(list(ours.model.parameters())))
    grads_h = _grads(
        scalar_loss(hmodel(*theirs.inputs)), trainable(list(theirs.model.parameters()))
    )
    grads_plain = _grads(scalar_loss(plain(*ours.inputs)), trainable(list(plain.parameters())))
    assert_trees_close(grads, grads_h)
    assert_trees_close(grads, grads_plain)


@over_zoo
def test_copied_initial_weights_cut_the_graph_to_the_module(name):
    case = ZOO[name]()
    fmodel = hf_patch.monkeypatch(case.model, copy_initial_weights=True)
    loss = scalar_loss(fmodel(*case.inputs))
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, trainable(list(case.model.parameters())))


# ---------------------------------------------------------------------------------------------
# (3) Second order: a hand-written unroll through fmodule(x, params=...).
# ---------------------------------------------------------------------------------------------


def _sgd_unroll(fmodel, inputs, steps=2, lr=0.1):
    params = list(fmodel.parameters())
    for _ in range(steps):
        inner = scalar_loss(fmodel(*inputs, params=params))
        grads = iter(torch.autograd.grad(inner, trainable(params), create_graph=True))
        params = [p - lr * next(grads) if p.requires_grad else p for p in params]
    return scalar_loss(fmodel(*inputs, params=params))


@over_zoo
def test_meta_gradient_matches_higher(name):
    ours, fmodel, theirs, hmodel = _pair(name, copy_initial_weights=False)
    wrt = trainable(list(ours.model.parameters()))
    wrt_h = trainable(list(theirs.model.parameters()))
    meta = _grads(_sgd_unroll(fmodel, ours.inputs), wrt)
    meta_h = _grads(_sgd_unroll(hmodel, theirs.inputs), wrt_h)
    assert_trees_close(meta, meta_h, atol=1e-9, rtol=1e-7)


@over_zoo
def test_meta_gradient_to_initial_fast_weights_matches_higher(name):
    ours, fmodel, theirs, hmodel = _pair(name, copy_initial_weights=True)
    init, init_h = list(fmodel.init_fast_params), list(hmodel.init_fast_params)
    meta = _grads(_sgd_unroll(fmodel, ours.inputs), trainable(init))
    meta_h = _grads(_sgd_unroll(hmodel, theirs.inputs), trainable(init_h))
    assert_trees_close(meta, meta_h, atol=1e-9, rtol=1e-7)


def test_meta_gradient_has_a_second_order_part():
    # The meta-gradient of a 2-step unroll differs from the first-order approximation that
    # detaches the inner gradients: the second-order terms really flow through fmodule.
    case = ZOO["mlp"]()
    fmodel = hf_patch.monkeypatch(case.model, copy_initial_weights=False)
    wrt = list(case.model.parameters())
    full = _grads(_sgd_unroll(fmodel, case.inputs), wrt)

    params = list(fmodel.parameters(time=0))
    for _ in range(2):
        inner = scalar_loss(fmodel(*case.inputs, params=params))
        grads = torch.autograd.grad(inner, params, retain_graph=True)
        params = [p - 0.1 * g.detach() for p, g in zip(params, grads)]
    first_order = _grads(scalar_loss(fmodel(*case.inputs, params=params)), wrt)
    assert not all(torch.allclose(a, b) for a, b in zip(full, first_order))


# ---------------------------------------------------------------------------------------------
# (4) Fast-weight history: track_higher_grads, parameters(time=k), init_fast_params.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "tied", "lstm", "weight_norm"])
def test_history_while_tracking(name):
    ours, fmodel, theirs, hmodel = _pair(name)
    assert fmodel.track_higher_grads is True
    init = list(fmodel.parameters())
    _assert_same_tensors(fmodel.init_fast_params, init)

    p1, p2 = perturbed_params(ours.model, seed=1), perturbed_params(ours.model, seed=2)
    fmodel(*ours.inputs, params=p1)
    fmodel.update_params(p2)
    hmodel(*theirs.inputs, params=_detached_copies(p1))
    hmodel.update_params(_detached_copies(p2))

    _assert_same_tensors(fmodel.parameters(time=0), init)
    _assert_same_tensors(fmodel.parameters(time=1), p1)
    _assert_same_tensors(fmodel.parameters(time=2), p2)
    _assert_same_tensors(fmodel.parameters(), p2)
    _assert_same_tensors(fmodel.parameters(time=-1), p2)
    _assert_same_tensors(fmodel.fast_params, p2)
    _assert_same_tensors(fmodel.init_fast_params, init)
    # The same history as higher's, step by step.
    for time in range(3):
        assert_trees_close(list(fmodel.parameters(time=time)), list(hmodel.parameters(time=time)))
    # The latest fast weights drive forward.
    assert_trees_close(fmodel(*ours.inputs), with_params(ours.model, p2)(*ours.inputs))


@pytest.mark.parametrize("name", ["mlp", "tied", "lstm", "weight_norm"])
def test_not_tracking_keeps_only_the_latest_fast_weights(name):
    case = ZOO[name]()
    fmodel = hf_patch.monkeypatch(case.model, track_higher_grads=False)
    assert fmodel.track_higher_grads is False
    p1, p2 = perturbed_params(case.model, seed=1), perturbed_params(case.model, seed=2)
    fmodel.update_params(p1)
    fmodel.update_params(p2)
    _assert_same_tensors(fmodel.parameters(), p2)
    _assert_same_tensors(fmodel.fast_params, p2)
    assert_trees_close(fmodel(*case.inputs), with_params(case.model, p2)(*case.inputs))

    # Nothing holds on to the older fast weights.
    refs = [weakref.ref(p) for p in p1]
    del p1
    gc.collect()
    assert all(r() is None for r in refs), "older fast weights are still referenced"


def test_tracking_keeps_older_fast_weights_alive():
    # The counterpart of the test above, so that it is known to be able to fail.
    case = ZOO["mlp"]()
    fmodel = hf_patch.monkeypatch(case.model)
    p1 = perturbed_params(case.model, seed=1)
    fmodel.update_params(p1)
    fmodel.update_params(perturbed_params(case.model, seed=2))
    refs = [weakref.ref(p) for p in p1]
    del p1
    gc.collect()
    assert all(r() is not None for r in refs)


def test_track_higher_grads_can_be_switched_off():
    case = ZOO["mlp"]()
    fmodel = hf_patch.monkeypatch(case.model)
    fmodel.track_higher_grads = False
    assert fmodel.track_higher_grads is False
    p = perturbed_params(case.model, seed=1)
    fmodel.update_params(p)
    _assert_same_tensors(fmodel.parameters(), p)
    fmodel.track_higher_grads = True
    assert fmodel.track_higher_grads is True


# ---------------------------------------------------------------------------------------------
# (5) BatchNorm buffers.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_BATCHNORM)
def test_batchnorm_train_mode_updates_only_fmodule_buffers(name):
    ours, theirs = ZOO[name](), ZOO[name]()
    plain = copy.deepcopy(ours.model)
    before = snapshot(ours.model)
    fmodel = hf_patch.monkeypatch(ours.model)
    hmodel = higher.monkeypatch(theirs.model)
    assert fmodel.training and hmodel.training

    params = perturbed_params(ours.model, seed=8)
    for _ in range(2):
        fmodel(*ours.inputs, params=params)
        hmodel(*theirs.inputs, params=_detached_copies(params))
    plain = with_params(plain, params)
    for _ in range(2):
        plain(*ours.inputs)

    fbuffers, hbuffers = dict(fmodel.named_buffers()), dict(hmodel.named_buffers())
    plain_buffers, module_buffers = dict(plain.named_buffers()), dict(ours.model.named_buffers())
    assert list(fbuffers) == list(hbuffers) == list(module_buffers)
    for n, b in fbuffers.items():
        torch.testing.assert_close(b, hbuffers[n], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(b, plain_buffers[n], atol=1e-12, rtol=1e-10)
    running_means = [n for n in fbuffers if n.endswith("running_mean")]
    assert running_means
    for n in running_means:
        assert not torch.allclose(fbuffers[n], module_buffers[n])
    assert_module_unchanged(ours.model, before)


@pytest.mark.parametrize("name", WITH_BATCHNORM)
def test_batchnorm_eval_mode_uses_fmodule_running_stats(name):
    ours, theirs = ZOO[name](), ZOO[name]()
    before = snapshot(ours.model)
    fmodel = hf_patch.monkeypatch(ours.model)
    hmodel = higher.monkeypatch(theirs.model)
    plain = copy.deepcopy(ours.model)

    # Diverge the running statistics in train mode, then switch to eval.
    fmodel(*ours.inputs)
    hmodel(*theirs.inputs)
    plain(*ours.inputs)
    assert fmodel.eval() is fmodel
    hmodel.eval()
    plain.eval()
    assert fmodel.training is False
    assert all(not m.training for m in plain.modules())

    fbuffers_before = {n: b.clone() for n, b in fmodel.named_buffers()}
    params = perturbed_params(ours.model, seed=9)
    out = fmodel(*ours.inputs, params=params)
    assert_trees_close(out, hmodel(*theirs.inputs, params=_detached_copies(params)))
    assert_trees_close(out, with_params(plain, params)(*ours.inputs))
    # Eval mode reads the running statistics and does not update them.
    for n, b in fmodel.named_buffers():
        assert torch.equal(b, fbuffers_before[n])
    # The user's module is still in train mode, with its own statistics.
    assert_module_unchanged(ours.model, before)

    fmodel.train()
    assert fmodel.training is True
    out_train = fmodel(*ours.inputs, params=params)
    assert not torch.allclose(out_train, out)


@pytest.mark.parametrize("name", ["mlp", "conv_bn", "encoder_embed", "lstm"])
def test_train_and_eval_leave_the_module_mode_alone(name):
    case = ZOO[name]()
    case.model.train()
    before = snapshot(case.model)
    fmodel = hf_patch.monkeypatch(case.model)
    fmodel.eval()
    fmodel(*case.inputs)
    assert_module_unchanged(case.model, before)
    case.model.eval()
    fmodel.train()
    assert fmodel.training is True
    assert all(not m.training for m in case.model.modules())


# ---------------------------------------------------------------------------------------------
# (6) Submodules, custom methods, attribute reads.
# ---------------------------------------------------------------------------------------------


def test_submodule_and_custom_method_calls_use_fast_weights():
    ours, fmodel, theirs, hmodel = _pair("encoder_embed")
    (x,) = ours.inputs
    params = perturbed_params(ours.model, seed=10)
    fmodel.update_params(params)
    hmodel.update_params(_detached_copies(params))
    plain = with_params(ours.model, params)

    assert_trees_close(fmodel.encoder(x), plain.encoder(x))
    assert_trees_close(fmodel.encoder(x), hmodel.encoder(x))
    assert_trees_close(fmodel.encoder.fc(x), plain.encoder.fc(x))
    assert_trees_close(fmodel.embed(x), plain.embed(x))
    assert_trees_close(fmodel.embed(x), hmodel.embed(x))

    # Gradients of a custom-method call reach the fast weights it used.
    names = [n for n, _ in ours.model.named_parameters()]
    grads = _grads(scalar_loss(fmodel.embed(x)), params[:3])
    grads_plain = _grads(scalar_loss(plain.embed(x)), list(plain.parameters())[:3])
    assert names[:3] == ["scale", "encoder.fc.weight", "encoder.fc.bias"]
    assert_trees_close(grads, grads_plain)


def test_attribute_reads_give_current_fast_weights():
    case = ZOO["encoder_embed"]()
    fmodel = hf_patch.monkeypatch(case.model)
    assert fmodel.hidden_size == 6
    params = perturbed_params(case.model, seed=11)
    fmodel.update_params(params)
    assert fmodel.scale is params[0]
    assert fmodel.encoder.fc.weight is params[1]
    assert fmodel.encoder.fc.bias is params[2]
    assert fmodel.head.weight is params[3]
    assert fmodel.encoder.fc.in_features == 4
    # The module's own attributes are untouched.
    assert case.model.encoder.fc.weight is not params[1]
    # A later step is visible at once.
    newer = perturbed_params(case.model, seed=12)
    fmodel(*case.inputs, params=newer)
    assert fmodel.encoder.fc.weight is newer[1]


def test_property_reads_use_fast_weights():
    case = ZOO["encoder_embed"]()
    fmodel = hf_patch.monkeypatch(case.model)
    params = perturbed_params(case.model, seed=23)
    fmodel.update_params(params)
    expected = with_params(case.model, params).scaled_encoder_weight
    assert_trees_close(fmodel.scaled_encoder_weight, expected)


@pytest.mark.parametrize("name", ["weight_norm", "custom_parametrization"])
def test_parametrized_weight_reads_use_fast_weights(name):
    case = ZOO[name]()
    fmodel = hf_patch.monkeypatch(case.model)
    params = perturbed_params(case.model, seed=24)
    fmodel.update_params(params)
    plain = with_params(case.model, params)
    index = next(i for i, m in enumerate(case.model) if parametrize.is_parametrized(m))
    assert_trees_close(fmodel[index].weight, plain[index].weight)
    assert not torch.allclose(fmodel[index].weight, case.model[index].weight)


def test_container_indexing_and_iteration():
    case = ZOO["containers"]()
    fmodel = hf_patch.monkeypatch(case.model)
    params = perturbed_params(case.model, seed=13)
    fmodel.update_params(params)
    plain = with_params(case.model, params)
    (x,) = case.inputs
    assert_trees_close(fmodel.blocks[0](x), plain.blocks[0](x))
    assert_trees_close(fmodel.heads["b"](x), plain.heads["b"](x))
    assert len(fmodel.blocks) == 2
    for fblock, block in zip(fmodel.blocks, plain.blocks):
        assert_trees_close(fblock(x), block(x))

    mlp = ZOO["mlp"]()
    fmlp = hf_patch.monkeypatch(mlp.model)
    params = perturbed_params(mlp.model, seed=14)
    fmlp.update_params(params)
    assert_trees_close(fmlp[0](*mlp.inputs), with_params(mlp.model, params)[0](*mlp.inputs))


@pytest.mark.parametrize("name", ["lstm", "lstm_cell"])
def test_recurrent_submodule_call(name):
    case = ZOO[name]()
    before = snapshot(case.model)
    fmodel = hf_patch.monkeypatch(case.model)
    params = perturbed_params(case.model, seed=15)
    fmodel.update_params(params)
    plain = with_params(case.model, params)
    (x,) = case.inputs
    if name == "lstm":
        assert_trees_close(fmodel.lstm(x), plain.lstm(x))
    else:
        assert_trees_close(fmodel.cell(x[:, 0]), plain.cell(x[:, 0]))
    assert_module_unchanged(case.model, before)


# ---------------------------------------------------------------------------------------------
# (7) Forward hooks registered on the original module.
# ---------------------------------------------------------------------------------------------


def test_forward_hooks_on_the_module_fire():
    case = ZOO["encoder_embed"]()
    (x,) = case.inputs
    params = perturbed_params(case.model, seed=16)
    plain = with_params(case.model, params)  # copied before the hooks exist
    expected_encoder, expected_out = plain.encoder(x), plain(x)

    seen = []

    def record(module, args, output):
        seen.append((module.fc.weight.detach().clone(), output.detach().clone()))

    case.model.encoder.register_forward_hook(record)
    case.model.register_forward_hook(lambda module, args, output: 2 * output)
    fmodel = hf_patch.monkeypatch(case.model)
    out = fmodel(x, params=params)

    assert len(seen) == 1
    hook_weight, hook_output = seen[0]
    assert torch.equal(hook_weight, params[1].detach()), "the hook did not see the fast weight"
    assert_trees_close(hook_output, expected_encoder)
    assert_trees_close(out, 2 * expected_out)


# ---------------------------------------------------------------------------------------------
# (8) The user's module is never left changed.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("copy_initial_weights", [True, False], ids=["copy", "nocopy"])
@over_zoo
def test_module_unchanged_after_use(name, copy_initial_weights):
    case = ZOO[name]()
    fresh = ZOO[name]()
    before = snapshot(case.model)
    fmodel = hf_patch.monkeypatch(case.model, copy_initial_weights=copy_initial_weights)
    assert_module_unchanged(case.model, before)

    loss = scalar_loss(fmodel(*case.inputs))
    _grads(loss, trainable(list(fmodel.fast_params)))
    assert_module_unchanged(case.model, before)

    params = perturbed_params(case.model, seed=17)
    fmodel.update_params(params)
    fmodel(*case.inputs)
    fmodel(*case.inputs, params=perturbed_params(case.model, seed=18))
    fmodel.eval()
    fmodel(*case.inputs)
    fmodel.train()
    list(fmodel.parameters())
    list(fmodel.buffers())
    assert_module_unchanged(case.model, before)

    # The module still computes what an untouched copy computes.
    assert_trees_close(case.model(*case.inputs), fresh.model(*fresh.inputs))


@over_zoo
def test_module_unchanged_after_forward_raises(name):
    case = ZOO[name]()
    before = snapshot(case.model)
    fmodel = hf_patch.monkeypatch(case.model)
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        fmodel(*case.bad_inputs)
    assert_module_unchanged(case.model, before)

    params = perturbed_params(case.model, seed=19)
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        fmodel(*case.bad_inputs, params=params)
    assert_module_unchanged(case.model, before)

    # Both the module and the patched module still work.
    params = perturbed_params(case.model, seed=20)
    assert_trees_close(
        fmodel(*case.inputs, params=params), with_params(case.model, params)(*case.inputs)
    )
    assert_module_unchanged(case.model, before)


def _first_stateful_layer(model):
    kinds = (nn.RNNBase, nn.RNNCellBase, nn.modules.batchnorm._BatchNorm)
    return next(m for m in model.modules() if isinstance(m, kinds))


@pytest.mark.parametrize("name", [*RECURRENT, *WITH_BATCHNORM])
def test_module_unchanged_when_a_hook_raises(name):
    case = ZOO[name]()

    def fail(module, args, output):
        raise ValueError("hook failed on purpose")

    _first_stateful_layer(case.model).register_forward_hook(fail)
    before = snapshot(case.model)
    fmodel = hf_patch.monkeypatch(case.model)
    with pytest.raises(ValueError, match="on purpose"):
        fmodel(*case.inputs, params=perturbed_params(case.model, seed=21))
    assert_module_unchanged(case.model, before)


# ---------------------------------------------------------------------------------------------
# (9) buffer_sync, make_functional with and without an encapsulator.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [None, "cpu"])
def test_buffer_sync_copies_the_module_buffers(device):
    case = ZOO["conv_bn"]()
    before = snapshot(case.model)
    fmodel = hf_patch.monkeypatch(case.model)
    for _ in range(2):
        fmodel(*case.inputs)
    mean = "1.running_mean"
    assert not torch.allclose(dict(fmodel.named_buffers())[mean], case.model.get_buffer(mean))

    hf_patch.buffer_sync(case.model, fmodel, device=device)
    module_buffers = dict(case.model.named_buffers())
    synced = dict(fmodel.named_buffers())
    assert list(synced) == list(module_buffers)
    for n, b in synced.items():
        assert torch.equal(b, module_buffers[n])
        assert b.dtype == module_buffers[n].dtype
        assert b is not module_buffers[n]

    # The copies diverge again without touching the module.
    fmodel(*case.inputs)
    assert not torch.allclose(dict(fmodel.named_buffers())[mean], case.model.get_buffer(mean))
    assert_module_unchanged(case.model, before)


@pytest.mark.parametrize("name", ["mlp", "tied", "lstm", "custom_parametrization"])
def test_make_functional_without_encapsulator(name):
    ours, theirs = ZOO[name](), ZOO[name]()
    before = snapshot(ours.model)
    fmodel = hf_patch.make_functional(ours.model)
    hmodel = higher.patch.make_functional(theirs.model)
    assert isinstance(fmodel, hf_patch._MonkeyPatchBase)
    assert fmodel.fast_params is None

    params = perturbed_params(ours.model, seed=22)
    out = fmodel(*ours.inputs, params=params)
    assert_trees_close(out, hmodel(*theirs.inputs, params=_detached_copies(params)))
    assert_trees_close(out, with_params(ours.model, params)(*ours.inputs))
    grads = _grads(scalar_loss(out), trainable(params))
    assert any(g.abs().sum() > 0 for g in grads)
    # As in higher, the params passed become the fast weights.
    _assert_same_tensors(fmodel.fast_params, params)
    assert_module_unchanged(ours.model, before)


def test_make_functional_with_encapsulator():
    case = ZOO["conv_bn"]()
    before = snapshot(case.model)
    calls = []
    doubled = [2 * p.detach() for p in case.model.parameters()]

    def encapsulator(fmodule, module):
        calls.append((fmodule, module))
        hf_patch.buffer_sync(module, fmodule)
        fmodule.update_params(doubled)

    fmodel = hf_patch.make_functional(case.model, encapsulator=encapsulator)
    assert len(calls) == 1
    assert calls[0][0] is fmodel and calls[0][1] is case.model
    _assert_same_tensors(fmodel.fast_params, doubled)
    plain = with_params(case.model, doubled)
    assert_trees_close(fmodel(*case.inputs), plain(*case.inputs))
    assert_module_unchanged(case.model, before)


# ---------------------------------------------------------------------------------------------
# (10) Legacy import paths.
# ---------------------------------------------------------------------------------------------


def test_public_modules_and_names():
    assert importlib.import_module("higher_func.patch") is hf_patch
    importlib.import_module("higher_func.utils")
    assert higher_func.patch is hf_patch
    assert higher_func.monkeypatch is hf_patch.monkeypatch
    from higher_func.patch import buffer_sync, make_functional, monkeypatch  # noqa: F401


def test_import_alone_exposes_the_legacy_surface():
    # In a fresh interpreter, so that no earlier import of a submodule hides a missing one.
    script = (
        "import higher_func as higher\n"
        "assert callable(higher.monkeypatch)\n"
        "assert callable(higher.patch.monkeypatch)\n"
        "assert callable(higher.patch.make_functional)\n"
        "assert callable(higher.patch.buffer_sync)\n"
        "assert higher.utils is not None\n"
        "from higher_func.patch import _MonkeyPatchBase, monkeypatch\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


_LEGACY_SNIPPET = """
fmodel = higher.patch.monkeypatch(model, copy_initial_weights=False)
params = list(fmodel.parameters())
for _ in range(2):
    loss = (fmodel(x, params=params) ** 2).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    params = [p - 0.1 * g for p, g in zip(params, grads)]
meta_loss = (fmodel(x, params=params) ** 2).sum()
meta_grads = torch.autograd.grad(meta_loss, list(model.parameters()))
"""


def test_legacy_code_runs_unchanged_under_the_alias():
    results = []
    for library in (higher, higher_func):
        case = ZOO["mlp"]()
        namespace = {"higher": library, "torch": torch, "model": case.model, "x": case.inputs[0]}
        exec(_LEGACY_SNIPPET, namespace)
        results.append(namespace["meta_grads"])
    assert_trees_close(results[1], results[0], atol=1e-9, rtol=1e-7)
