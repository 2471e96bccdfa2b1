"""Every model a per-task loop runs, ``num_tasks=T`` runs, with the loop's results.

The oracle is the loop of ``test_batched``: T unbatched inner loops, one after the other.
Over the whole zoo and the models at the limits of ``torch.vmap`` (``zoo.VMAP_LIMITS``), the
batched inner loop gives the same per-task losses, fast weights after every step, buffers,
eval-mode outputs and meta-gradients, whether it ends up vmapped or looped. Then: how the
choice between the two is made (once, visibly), keyword inputs (``in_dims`` with a dict),
``randomness=`` and the attention fast path.
"""

from __future__ import annotations

import pytest
import torch
from test_batched import (
    BatchingFallbackWarning,
    assert_close,
    assert_same_outcome,
    losses_of,
    mlp,
    mlp_tasks,
    run_batched,
    run_looped,
    task_inputs,
)
from torch import nn
from zoo import NOT_TWICE_DIFFERENTIABLE, VMAP_LIMITS, ZOO, with_params

import higher_func
from higher_func import _batching

DTYPE = torch.float64
CASES = {**ZOO, **VMAP_LIMITS}
# Patched at patch time: their kind of module has no vmap batching rule (or, on a CPU, the
# loop is faster); the rest start vmapped, and some of them switch at their first call.
LOOPED_AT_PATCH_TIME = {"lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell", "conv_bn"}
SWITCH_AT_FIRST_CALL = {"spectral_norm", "spectral_norm_hook", "legacy_function"}
# torch warns that scaled dot-product attention on a CPU has no batching rule of its own
# (vmap runs it through its slower generic fallback): expected here.
SDPA_FALLBACK = "ignore:There is a performance drop because we have not yet implemented"


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which fallbacks already warned: each test sees its own one-time warning."""
    monkeypatch.setattr(_batching, "_warned", set())


def tasks_of(inputs: tuple, num_tasks: int, seed: int) -> tuple:
    """Per-task variants of a zoo model's inputs: noise for floats, new ids for tokens."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if x.is_floating_point():
            out.append(task_inputs((x,), num_tasks, seed)[0])
        else:
            high = int(x.max()) + 1
            out.append(torch.randint(0, high, (num_tasks, *x.shape), generator=generator))
    return tuple(out)


@pytest.mark.filterwarnings("ignore::higher_func.BatchingFallbackWarning")
@pytest.mark.filterwarnings(SDPA_FALLBACK)
@pytest.mark.parametrize("batching", ["auto", "loop"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_batched_equals_the_loop_over_the_zoo(name, batching):
    case = CASES[name]()
    support, query = tasks_of(case.inputs, 3, 1), tasks_of(case.inputs, 3, 2)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.05, momentum=0.5)
    first_order = name in NOT_TWICE_DIFFERENTIABLE
    batched = run_batched(
        case.model, opt, support, query, steps=2, first_order=first_order, batching=batching
    )
    looped = run_looped(case.model, opt, support, query, steps=2, first_order=first_order)
    assert_same_outcome(batched, looped)


@pytest.mark.filterwarnings("ignore::higher_func.BatchingFallbackWarning")
@pytest.mark.filterwarnings(SDPA_FALLBACK)
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_choice_is_made_once_and_visible(name):
    case = CASES[name]()
    fmodel = higher_func.monkeypatch(case.model, copy_initial_weights=False, num_tasks=2)
    expected = "loop" if name in LOOPED_AT_PATCH_TIME else "vmap"
    assert higher_func.patch.batching(fmodel).mode == expected
    assert (higher_func.patch.batching(fmodel).reason is None) == (expected == "vmap")
    xs = tasks_of(case.inputs, 2, 3)
    fmodel(*xs)
    expected = "loop" if name in LOOPED_AT_PATCH_TIME | SWITCH_AT_FIRST_CALL else "vmap"
    assert higher_func.patch.batching(fmodel).mode == expected
    # Decided for good: a looped patch never tries vmap again (a failed vmap attempt would
    # run the forward once more than the loop's one call per task).
    calls = _Calls()
    handle = case.model.register_forward_pre_hook(calls.count)
    try:
        counted = higher_func.monkeypatch(case.model, copy_initial_weights=False, num_tasks=2)
    finally:
        handle.remove()
    counted(*xs)
    calls.n = 0
    counted(*xs)
    assert calls.n == (1 if expected == "vmap" else 2)
    assert higher_func.monkeypatch(case.model, num_tasks=2).num_tasks == 2


class _Calls:
    """Counts a module's calls (a plain object: a hook that wrote into a captured list or
    dict would be refused by a batched patch)."""

    def __init__(self) -> None:
        self.n = 0

    def count(self, module: nn.Module, inputs: tuple) -> None:
        self.n += 1


def test_switching_warns_once_naming_the_reason(fresh_warnings):
    case = VMAP_LIMITS["spectral_norm"]()
    fmodel = higher_func.monkeypatch(case.model, copy_initial_weights=False, num_tasks=2)
    xs = tasks_of(case.inputs, 2, 3)
    with pytest.warns(BatchingFallbackWarning, match="Batching rule not implemented"):
        fmodel(*xs)
    assert "Batching rule not implemented" in higher_func.patch.batching(fmodel).reason
    fmodel(*xs)  # warnings are errors in this suite: the second call is silent
    higher_func.monkeypatch(case.model, num_tasks=2)(*xs)  # and so is a second patch


def test_a_failed_vmap_attempt_leaves_no_trace(fresh_warnings):
    # BatchNorm updates its running statistics in place before the old-style
    # autograd.Function stops vmap: the loop runs from the statistics as they were.
    case = VMAP_LIMITS["legacy_function"]()
    xs = tasks_of(case.inputs, 2, 3)
    with pytest.warns(BatchingFallbackWarning, match="setup_context"):
        batched = higher_func.monkeypatch(case.model, copy_initial_weights=False, num_tasks=2)
        out = batched(*xs)
    stats = dict(batched.named_buffers())
    for t in range(2):
        single = higher_func.monkeypatch(case.model, copy_initial_weights=False)
        assert_close(out[t], single(xs[0][t]), f"task {t}")
        for key, value in single.named_buffers():
            assert_close(stats[key][t], value, f"{key} of task {t}")
    assert torch.equal(stats["norm.num_batches_tracked"], torch.full((2,), 3))  # 2 + 1 call


def test_a_user_error_is_not_a_batching_limit(fresh_warnings):
    # Spectral norm meets vmap's limit before the shape error: the loop runs, and raises the
    # user's error.
    case = VMAP_LIMITS["spectral_norm"]()
    fmodel = higher_func.monkeypatch(case.model, copy_initial_weights=False, num_tasks=2)
    bad = tasks_of(case.bad_inputs, 2, 3)
    with pytest.warns(BatchingFallbackWarning):
        with pytest.raises(RuntimeError, match="size|shape"):
            fmodel(*bad)
    model = mlp()
    fmodel = higher_func.monkeypatch(model, num_tasks=2)
    with pytest.raises(RuntimeError, match="size|shape"):
        fmodel(torch.randn(2, 5, 3, dtype=DTYPE))
    assert higher_func.patch.batching(fmodel).mode == "vmap"


class _LegacyOnRequest(nn.Module):
    """BatchNorm, then (only when asked) an old-style autograd.Function."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = VMAP_LIMITS["legacy_function"]().model

    def forward(self, x: torch.Tensor, legacy: bool = False) -> torch.Tensor:
        if legacy:
            return self.inner(x)
        return self.inner.head(torch.tanh(self.inner.norm(self.inner.fc(x))))


def test_a_vmap_limit_met_in_a_later_call_switches_then(fresh_warnings):
    model = _LegacyOnRequest().double()
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False, num_tasks=2)
    single = higher_func.monkeypatch(model, copy_initial_weights=False)
    xs = torch.randn(2, 5, 4, dtype=DTYPE)
    fmodel(xs)
    assert higher_func.patch.batching(fmodel).mode == "vmap"
    with pytest.warns(BatchingFallbackWarning, match="setup_context"):
        out = fmodel(xs, legacy=True)
    assert higher_func.patch.batching(fmodel).mode == "loop"
    stats = dict(fmodel.named_buffers())
    for t in range(2):
        single.update_params(list(model.parameters()))
        higher_func.patch.buffer_sync(model, single)
        single(xs[t])
        assert_close(out[t], single(xs[t], legacy=True), f"task {t}")
        for key, value in single.named_buffers():  # two calls' updates, not three
            assert_close(stats[key][t], value, f"{key} of task {t}")


# ---------------------------------------------------------------------------------------------
# The speed rule: convolutions with BatchNorm loop on a CPU; vmap gives the same results.
# ---------------------------------------------------------------------------------------------


def test_conv_with_batchnorm_loops_on_cpu():
    fmodel = higher_func.monkeypatch(ZOO["conv_bn"]().model, num_tasks=2)
    assert higher_func.patch.batching(fmodel).mode == "loop"
    assert "Conv2d with BatchNorm2d on a CPU" in higher_func.patch.batching(fmodel).reason
    fmodel = higher_func.monkeypatch(ZOO["none_bias"]().model, num_tasks=2)  # no convolution
    assert higher_func.patch.batching(fmodel).mode == "vmap"


def test_conv_with_batchnorm_vmapped_equals_the_loop():
    case = ZOO["conv_bn"]()
    support, query = tasks_of(case.inputs, 3, 1), tasks_of(case.inputs, 3, 2)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.05, momentum=0.5)
    batched = run_batched(case.model, opt, support, query, steps=2, batching="vmap")
    assert_same_outcome(batched, run_looped(case.model, opt, support, query, steps=2))


# ---------------------------------------------------------------------------------------------
# Keyword inputs.
# ---------------------------------------------------------------------------------------------


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0):
        out = scale * self.fc(x)
        return out if mask is None else out * mask


@pytest.fixture(params=["vmap", "loop"])
def masked(request):
    torch.manual_seed(0)
    model = _Masked().double()
    fmodel = higher_func.monkeypatch(
        model, copy_initial_weights=False, num_tasks=3, batching=request.param
    )
    assert higher_func.patch.batching(fmodel).mode == request.param
    stacked = [p.detach() + 0.1 * torch.randn(3, *p.shape, dtype=DTYPE) for p in model.parameters()]
    fmodel.update_params(stacked)
    return model, fmodel, stacked


def test_keyword_tensor_per_task(masked):
    model, fmodel, stacked = masked
    xs, masks = torch.randn(3, 5, 4, dtype=DTYPE), torch.rand(3, 5, 3, dtype=DTYPE)
    out = fmodel(xs, mask=masks, scale=2.0, in_dims=(0, {"mask": 0}))
    assert out.shape == (3, 5, 3)
    for t in range(3):
        single = with_params(model, [w[t] for w in stacked])
        assert_close(out[t], single(xs[t], mask=masks[t], scale=2.0), f"task {t}")
    # The task dim of a keyword input may be another dim, as in torch.vmap.
    moved = fmodel(xs, mask=masks.movedim(0, 1), scale=2.0, in_dims=(0, {"mask": 1}))
    assert_close(moved, out, "in_dims 1 for the keyword")


def test_keyword_tensor_shared(masked):
    model, fmodel, stacked = masked
    xs, mask = torch.randn(3, 5, 4, dtype=DTYPE), torch.rand(5, 3, dtype=DTYPE)
    out = fmodel(xs, mask=mask, in_dims=(0, {"mask": None}))
    assert_close(out, fmodel(xs, mask=mask.expand(3, 5, 3), in_dims=(0, {"mask": 0})), "shared")


def test_keyword_tensor_without_a_declared_dim_is_refused(masked):
    _, fmodel, _ = masked
    xs, masks = torch.randn(3, 5, 4, dtype=DTYPE), torch.rand(3, 5, 3, dtype=DTYPE)
    with pytest.raises(TypeError, match=r"mask= holds a tensor.*'mask': 0.*'mask': None"):
        fmodel(xs, mask=masks)
    with pytest.raises(TypeError, match="mask="):
        fmodel(xs, mask=masks, in_dims=(0,))
    with pytest.raises(ValueError, match=r"\['mask'\]"):  # a dim for a keyword not passed
        fmodel(xs, in_dims=(0, {"mask": 0}))
    with pytest.raises(ValueError, match="keyword input mask= has shape"):
        fmodel(xs, mask=masks[:2], in_dims=(0, {"mask": 0}))
    with pytest.raises(TypeError, match="int or None"):
        fmodel(xs, mask=masks, in_dims=(0, {"mask": "tasks"}))
    # Keywords that hold no tensor need no entry.
    fmodel(xs, scale=3.0)


# ---------------------------------------------------------------------------------------------
# randomness=: dropout per task, as a loop draws it.
# ---------------------------------------------------------------------------------------------


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5)).double()


def _masks(fmodel, x) -> torch.Tensor:
    """Which outputs each task dropped, for one input shared by all tasks."""
    return fmodel(x, in_dims=(None,)) == 0


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_default_randomness_draws_each_task_its_own_mask(mode):
    model = _dropout_model()
    fmodel = higher_func.monkeypatch(model, num_tasks=8, batching=mode)
    assert higher_func.patch.batching(fmodel).mode == mode
    masks = _masks(fmodel, torch.ones(200, 4, dtype=DTYPE))
    rates = masks.double().flatten(1).mean(1)
    assert torch.allclose(rates, torch.full((8,), 0.5, dtype=DTYPE), atol=0.03)
    for t in range(1, 8):  # masks of different tasks agree on about half the entries
        agreement = (masks[0] == masks[t]).double().mean()
        assert 0.45 < agreement < 0.55


def test_looped_randomness_is_the_loops_own():
    # With the same seed, the looped fallback draws exactly what a plain loop draws.
    model = _dropout_model()
    x = torch.ones(50, 4, dtype=DTYPE)
    fmodel = higher_func.monkeypatch(model, num_tasks=3, batching="loop")
    torch.manual_seed(7)
    batched = fmodel(x, in_dims=(None,))
    torch.manual_seed(7)
    single = higher_func.monkeypatch(model)
    looped = torch.stack([single(x) for _ in range(3)])
    assert torch.equal(batched, looped)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_same_and_error_randomness(mode):
    model = _dropout_model()
    x = torch.ones(100, 4, dtype=DTYPE)
    same = higher_func.monkeypatch(model, num_tasks=4, randomness="same", batching=mode)
    masks = _masks(same, x)
    assert 0.3 < masks.double().mean() < 0.7
    assert all(torch.equal(masks[0], masks[t]) for t in range(4))
    strict = higher_func.monkeypatch(model, num_tasks=4, randomness="error", batching=mode)
    with pytest.raises(RuntimeError, match="random"):
        strict(x, in_dims=(None,))
    strict.eval()
    strict(x, in_dims=(None,))  # eval-mode dropout draws nothing
    with pytest.raises(ValueError, match="randomness"):
        higher_func.monkeypatch(model, num_tasks=4, randomness="each")


def test_randomness_reaches_innerloop_ctx():
    model = _dropout_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(model, opt, num_tasks=3, randomness="same") as (fmodel, _):
        masks = _masks(fmodel, torch.ones(30, 4, dtype=DTYPE))
        assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


# ---------------------------------------------------------------------------------------------
# Attention's fused inference kernel.
# ---------------------------------------------------------------------------------------------


def _fastpath_enabled() -> bool:
    mha = getattr(torch.backends, "mha", None)
    if mha is not None:
        return mha.get_fastpath_enabled()
    # torch < 2.2 has no switch: its attention modules skip the fused kernel while a torch
    # function override is active (see higher_func._compat.attention_fastpath_off).
    return not torch.overrides.has_torch_function((torch.empty(()),))


@pytest.mark.filterwarnings(SDPA_FALLBACK)
def test_attention_fast_path_is_off_only_inside_batched_calls():
    case = VMAP_LIMITS["transformer_eval"]()
    seen = []
    layer = case.model
    original = type(layer).forward

    def spy(self, *args, **kwargs):
        seen.append(_fastpath_enabled())
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(layer), "forward", spy)
        fmodel = higher_func.monkeypatch(layer, copy_initial_weights=False, num_tasks=2)
        out = fmodel(*tasks_of(case.inputs, 2, 1))
    assert seen == [False]
    assert _fastpath_enabled()
    loss = losses_of(out).sum()
    grads = torch.autograd.grad(loss, list(layer.parameters()))  # no fused-kernel derivative
    assert all(g.abs().sum() > 0 for g in grads[:2])


def test_batched_mlp_inputs_still_checked():
    fmodel = higher_func.monkeypatch(mlp(), num_tasks=3)
    with pytest.raises(ValueError, match="num_tasks=3"):
        fmodel(mlp_tasks(2)[0][0])


class _PythonBranch(nn.Module):
    def __init__(self, item: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.item = item

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        total = y.sum().item() if self.item else y.sum()
        return 2 * y if total > 0 else y


@pytest.mark.parametrize("item", [True, False], ids=["item", "tensor-branch"])
def test_data_dependent_python_loops(item, fresh_warnings):
    model = _PythonBranch(item).double()
    fmodel = higher_func.monkeypatch(model, num_tasks=4)
    xs = torch.randn(4, 5, 4, dtype=DTYPE)
    with pytest.warns(BatchingFallbackWarning, match="vmap"):
        out = fmodel(xs)
    assert higher_func.patch.batching(fmodel).mode == "loop"
    for t in range(4):
        assert_close(out[t], model(xs[t]), f"task {t}")
