"""Dtypes end to end: float64 (against higher), float16 and bfloat16 models, and autocast.

* float64: fast weights, optimizer state, outputs and meta-gradients stay float64 for every
  optimizer, and the MAML meta-gradient equals higher's.
* float16 / bfloat16 (a model converted with ``.to(dtype)``): forward equals the plain module
  for every zoo model, steps keep the dtype and match ``torch.optim`` on the same model, and
  meta-gradients are finite and point the way the float32 ones do.
* ``torch.autocast("cpu", dtype=torch.bfloat16)`` around a patched call gives what the plain
  module gives under autocast, also batched, and steps taken under autocast match
  ``torch.optim``'s.
"""

from __future__ import annotations

import copy

import higher as higher_oracle
import pytest
import torch
from zoo import ZOO, assert_trees_close, scalar_loss, state_tensors, tensors_in

import higher_func as higher
from higher_func.optim import _opt_mapping

OPTIMIZERS = list(_opt_mapping)


def _cpu_float16_matmul() -> bool:
    half = torch.ones(1, 1, dtype=torch.float16)
    try:
        half @ half
    except RuntimeError:  # "addmm_impl_cpu_" not implemented for 'Half'
        return False
    return True


LOW_PRECISION = [
    pytest.param(
        torch.float16,
        marks=pytest.mark.skipif(
            not _cpu_float16_matmul(),
            reason=f"torch {torch.__version__} has no float16 matmul on a CPU (torch 2.4 has)",
        ),
    ),
    torch.bfloat16,
]


def _ids(value):
    return getattr(value, "__name__", str(value).replace("torch.", ""))


def _opt_kwargs(opt_type, dtype):
    kwargs = {"lr": 0.01}
    if opt_type is torch.optim.SGD:
        kwargs["momentum"] = 0.9
    # eps=1e-8 is 0 in float16, so an Adam-type step divides 0 by 0 where a squared gradient
    # underflows (torch.optim gives the same NaNs); users of float16 raise eps.
    if dtype is torch.float16 and "eps" in opt_type([torch.zeros(1)], lr=0.1).defaults:
        kwargs["eps"] = 1e-3
    return kwargs


def _mlp(dtype):
    return ZOO["mlp"](dtype=dtype)


# ---------------------------------------------------------------------------------------------
# float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_type", OPTIMIZERS, ids=_ids)
def test_float64_stays_float64_end_to_end(opt_type):
    assert torch.get_default_dtype() == torch.float32  # float64 must not come from a default
    case = _mlp(torch.float64)
    opt = opt_type(case.model.parameters(), **_opt_kwargs(opt_type, torch.float64))
    with higher.innerloop_ctx(case.model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            out = fmodel(*case.inputs)
            assert out.dtype == torch.float64
            diffopt.step(scalar_loss(out))
        assert {p.dtype for p in fmodel.parameters()} == {torch.float64}
        assert {t.dtype for t in state_tensors(diffopt)} <= {torch.float64}
        scalar_loss(fmodel(*case.inputs)).backward()
    assert {p.grad.dtype for p in case.model.parameters()} == {torch.float64}


def _maml_meta_gradient(innerloop_ctx, case, steps=3):
    opt = torch.optim.SGD(case.model.parameters(), lr=0.01, momentum=0.5)
    with innerloop_ctx(case.model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
        out = fmodel(*case.inputs)
        scalar_loss(out).backward()
    return [p.grad for p in case.model.parameters()], tensors_in(out)


@pytest.mark.parametrize("name", ["mlp", "conv_bn", "encoder_embed", "tied"])
def test_float64_maml_meta_gradient_equals_highers(name):
    ours, theirs = ZOO[name](dtype=torch.float64), ZOO[name](dtype=torch.float64)
    grads, outputs = _maml_meta_gradient(higher.innerloop_ctx, ours)
    expected_grads, expected_outputs = _maml_meta_gradient(higher_oracle.innerloop_ctx, theirs)
    assert {g.dtype for g in grads} == {torch.float64}
    assert {o.dtype for o in outputs} == {torch.float64}
    # Rounding scales with the largest meta-gradient (a convolution bias before BatchNorm has
    # a true meta-gradient of 0, and gets noise of that size).
    atol = 1e-10 + 1e-13 * max(g.abs().max().item() for g in expected_grads)
    assert_trees_close(outputs, expected_outputs)
    assert_trees_close(grads, expected_grads, atol=atol)


# ---------------------------------------------------------------------------------------------
# float16 and bfloat16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=_ids)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_low_precision_models_run_forward_and_steps(name, dtype):
    case = ZOO[name](dtype=dtype)
    expected = case.model(*case.inputs)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.01, momentum=0.9)
    with higher.innerloop_ctx(case.model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        # The fast weights are the module's, so the patched forward is the plain one, exactly.
        assert_trees_close(fmodel(*case.inputs), expected, atol=0, rtol=0)
        for _ in range(2):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
        for p in fmodel.parameters():
            assert p.dtype == dtype
            assert torch.isfinite(p).all()
        moved = [
            not torch.equal(p, own) for p, own in zip(fmodel.parameters(), case.model.parameters())
        ]
        assert any(moved), "the steps did not move any weight"
        assert all(o.dtype == dtype for o in tensors_in(fmodel(*case.inputs)))


_ADAM_FAMILY = {
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
}


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=_ids)
@pytest.mark.parametrize("opt_type", OPTIMIZERS, ids=_ids)
def test_low_precision_steps_match_torch_optim(opt_type, dtype):
    case = _mlp(dtype)
    twin = copy.deepcopy(case.model)
    kwargs = _opt_kwargs(opt_type, dtype)
    opt = opt_type(case.model.parameters(), **kwargs)
    twin_opt = opt_type(twin.parameters(), foreach=False, **kwargs)
    with higher.innerloop_ctx(case.model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
            twin_opt.zero_grad()
            scalar_loss(twin(*case.inputs)).backward()
            twin_opt.step()
        weights = list(fmodel.parameters())
        assert {p.dtype for p in weights} == {dtype}
        for t in state_tensors(diffopt):
            # Per-weight state in the weights' dtype; scalar state (ASGD's eta, NAdam's
            # mu_product) may be kept in float32, as documented in higher_func._rules.
            assert t.dtype == dtype or (t.dim() == 0 and t.dtype == torch.float32), t.dtype
    assert all(torch.isfinite(p).all() for p in weights)
    # Two units in the last place: the rules keep NAdam's mu_product and ASGD's eta/mu as
    # tensors where torch.optim uses Python floats (documented in higher_func._rules).
    tolerance = {"rtol": 2e-3, "atol": 1e-5} if dtype is torch.float16 else {}
    if opt_type in _ADAM_FAMILY and torch.__version__ < "2.13":
        # The rules round as torch 2.13's kernels do; older ones (torch 2.0's mul_ and add_
        # where the rules lerp_, torch 2.4's NAdam) round an element apart now and then, which
        # in bfloat16 is a visible step.
        tolerance = {"rtol": 1.6e-2, "atol": 1e-3}
    torch.testing.assert_close(weights, [p.detach() for p in twin.parameters()], **tolerance)


def _meta_gradient(opt_type, model, inputs):
    # The same hyperparameters in every dtype (float16-safe eps), for a fair comparison.
    opt = opt_type(model.parameters(), **_opt_kwargs(opt_type, torch.float16))
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(scalar_loss(fmodel(*inputs)))
        scalar_loss(fmodel(*inputs)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=_ids)
@pytest.mark.parametrize("opt_type", OPTIMIZERS, ids=_ids)
def test_low_precision_meta_gradients_follow_float32(opt_type, dtype):
    case = _mlp(dtype)
    # The float32 reference starts from the very same (rounded) weights and inputs.
    wide = copy.deepcopy(case.model).float()
    reference = _meta_gradient(opt_type, wide, tuple(x.float() for x in case.inputs))
    low = _meta_gradient(opt_type, case.model, case.inputs)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    cosine = torch.nn.functional.cosine_similarity(low.float(), reference, dim=0)
    assert cosine > 0.99, f"the {dtype} meta-gradient points elsewhere (cosine {cosine:.3f})"


# ---------------------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------------------


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["mlp", "conv_bn", "lstm", "encoder_embed", "tied"])
def test_autocast_inside_the_patched_forward_matches_the_plain_module(name):
    case = ZOO[name](dtype=torch.float32)
    fmodel = higher.monkeypatch(case.model, copy_initial_weights=False)
    with _autocast():
        try:
            expected = case.model(*case.inputs)
        except RuntimeError as error:  # torch's own module fails: nothing to compare against
            if "could not create a primitive descriptor" not in str(error):
                raise
            pytest.skip(f"this CPU's oneDNN cannot run {name} under bfloat16 autocast")
        got = fmodel(*case.inputs)
    assert_trees_close(got, expected, atol=0, rtol=0)
    assert [o.dtype for o in tensors_in(got)] == [o.dtype for o in tensors_in(expected)]
    # Autocast is off again outside, for the patched module too.
    assert_trees_close(fmodel(*case.inputs), case.model(*case.inputs), atol=0, rtol=0)


def test_autocast_inside_a_batched_patched_forward_matches_the_plain_module():
    case = _mlp(torch.float32)
    xs = torch.stack([case.inputs[0], 2 * case.inputs[0], -case.inputs[0]])
    fmodel = higher.monkeypatch(case.model, copy_initial_weights=False, num_tasks=3)
    higher._batching._warned.discard(("autocast",))  # the warning is once per process
    with _autocast():
        # vmap drops autocast for F.linear with a bias, so the library loops over the tasks.
        with pytest.warns(higher.BatchingFallbackWarning, match="autocast"):
            got = fmodel(xs)
        expected = torch.stack([case.model(x) for x in xs])
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam], ids=_ids)
def test_steps_under_autocast_match_torch_optim(opt_type):
    case = _mlp(torch.float32)
    twin = copy.deepcopy(case.model)
    opt = opt_type(case.model.parameters(), lr=0.01)
    twin_opt = opt_type(twin.parameters(), lr=0.01, foreach=False)
    with higher.innerloop_ctx(case.model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            with _autocast():
                diffopt.step(scalar_loss(fmodel(*case.inputs).float()))
                twin_opt.zero_grad()
                scalar_loss(twin(*case.inputs).float()).backward()
            twin_opt.step()
        assert {p.dtype for p in fmodel.parameters()} == {torch.float32}
        torch.testing.assert_close(
            [p.detach() for p in fmodel.parameters()], [p.detach() for p in twin.parameters()]
        )
        with _autocast():
            scalar_loss(fmodel(*case.inputs).float()).backward()
    grads = [p.grad for p in case.model.parameters()]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
