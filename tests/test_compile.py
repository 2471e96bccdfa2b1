"""Compiled meta-steps (``higher_func.compile``) against eager: same meta-gradients, one graph."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from zoo import (
    NOT_TWICE_DIFFERENTIABLE_COMPILED,
    VMAP_LIMITS,
    ZOO,
    assert_module_unchanged,
    assert_trees_close,
    scalar_loss,
    snapshot,
    tensors_in,
)

import higher_func
from higher_func import _compat, _compile

# Compiled meta-steps need Dynamo's trace_autograd_ops; on an older torch,
# higher_func.compile is a clear error instead (tests/test_compat.py).
pytestmark = pytest.mark.skipif(
    not _compat.can_trace_autograd(),
    reason=f"higher_func.compile needs torch >= {_compat.MIN_TORCH}, this is {torch.__version__}",
)

TASKS, SHOTS, STEPS = 3, 4, 2


def make_model(batch_norm: bool) -> torch.nn.Module:
    # float64: BatchNorm over 4 samples amplifies float32 rounding differences between
    # Inductor's kernels and eager ones beyond the 1e-5 we hold compiled results to.
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1, 8)]
    if batch_norm:
        layers.append(torch.nn.BatchNorm1d(8))
    layers += [torch.nn.ReLU(), torch.nn.Linear(8, 1)]
    return torch.nn.Sequential(*layers).double()


def make_meta_loss(model, opt, batched: bool):
    """The issue's program: an inner loop inside, the query loss out."""
    if batched:

        def meta_loss(xs, ys, xq, yq):
            with higher_func.innerloop_ctx(
                model, opt, copy_initial_weights=False, num_tasks=TASKS
            ) as (fmodel, diffopt):
                for _ in range(STEPS):
                    diffopt.step(torch.vmap(F.mse_loss)(fmodel(xs), ys))
                return torch.vmap(F.mse_loss)(fmodel(xq), yq).mean()

    else:

        def meta_loss(xs, ys, xq, yq):
            total = 0.0
            for t in range(TASKS):
                with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (
                    fmodel,
                    diffopt,
                ):
                    for _ in range(STEPS):
                        diffopt.step(F.mse_loss(fmodel(xs[t]), ys[t]))
                    total = total + F.mse_loss(fmodel(xq[t]), yq[t])
            return total / TASKS

    return meta_loss


def sample(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(TASKS, SHOTS, 1, generator=generator, dtype=torch.float64) for _ in range(4)
    ]


def meta_gradients(fn, model, data):
    return torch.autograd.grad(fn(*data), list(model.parameters()))


CASES = [
    pytest.param(
        opt, batched, bn, id=f"{opt}-{'batched' if batched else 'loop'}-{'bn' if bn else 'mlp'}"
    )
    for opt in ("SGD", "Adam")
    for batched in (True, False)
    for bn in (False, True)
]
# The fast pair covers both optimizers, both paths and BatchNorm; the rest run in nox.
FAST = {"SGD-loop-mlp", "Adam-batched-bn"}
CASES = [
    case if case.id in FAST else pytest.param(*case.values, id=case.id, marks=pytest.mark.slow)
    for case in CASES
]


@pytest.mark.parametrize("opt_name, batched, batch_norm", CASES)
def test_compiled_meta_gradients_equal_eager(opt_name, batched, batch_norm):
    torch._dynamo.reset()
    model = make_model(batch_norm)
    opt = getattr(torch.optim, opt_name)(model.parameters(), lr=0.05)
    meta_loss = make_meta_loss(model, opt, batched)
    compiled = higher_func.compile(meta_loss)
    data = sample(0)
    eager = meta_gradients(meta_loss, model, data)
    got = meta_gradients(compiled, model, data)
    for e, g in zip(eager, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert dict(counters["graph_break"]) == {}


def test_new_data_of_the_same_shapes_does_not_recompile():
    torch._dynamo.reset()
    counters.clear()
    model = make_model(batch_norm=False)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    outer = torch.optim.Adam(model.parameters(), lr=1e-2)
    compiled = higher_func.compile(make_meta_loss(model, inner, batched=True))
    for step in range(20):
        outer.zero_grad()
        compiled(*sample(step)).backward()
        outer.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert dict(counters["graph_break"]) == {}


def test_autograd_tracing_is_switched_on_only_inside_the_compiled_function():
    seen = []

    def probe(x):
        seen.append(torch._dynamo.config.trace_autograd_ops)
        return x * 2

    before = torch._dynamo.config.trace_autograd_ops
    torch._dynamo.reset()
    higher_func.compile(probe, backend="eager")(torch.ones(2))
    assert seen == [True]
    assert torch._dynamo.config.trace_autograd_ops == before


def test_decorator_factory_passes_options():
    torch._dynamo.reset()

    @higher_func.compile(backend="eager")
    def double(x):
        return 2 * x

    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))


def test_fullgraph_false_is_refused():
    with pytest.raises(ValueError, match="fullgraph=True"):
        higher_func.compile(lambda x: x, fullgraph=False)


def test_too_old_torch_names_the_minimum_version(monkeypatch):
    monkeypatch.setattr(higher_func._compat, "TRACE_AUTOGRAD_OPS", "an_option_this_torch_lacks")
    with pytest.raises(RuntimeError, match=r"torch >= 2\.11"):
        higher_func.compile(lambda x: x)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        self.head = torch.nn.Linear(4, 2)

    def embed(self, x):
        return self.encoder(x)

    @property
    def scaled_head_weight(self):
        return 3 * self.head.weight

    def forward(self, x):
        return self.head(self.embed(x))


def test_submodules_methods_and_properties_use_fast_weights_when_compiled():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(5, 3)

    def reads(x):
        fmodel = higher_func.monkeypatch(net, copy_initial_weights=False)
        fmodel.update_params([2 * p for p in fmodel.parameters()])
        return (
            fmodel(x),
            fmodel.embed(x),
            fmodel.encoder(x),
            fmodel.encoder[0](x),
            fmodel.head.weight,
            fmodel.scaled_head_weight,
        )

    eager = reads(x)
    compiled = higher_func.compile(reads, backend="aot_eager")(x)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    assert torch.equal(eager[4], 2 * net.head.weight)


def test_eval_mode_of_a_patched_module_inside_a_compiled_function():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(5, 3)

    def evaluate(x):
        fmodel = higher_func.monkeypatch(net, copy_initial_weights=False)
        fmodel.eval()
        return fmodel(x)

    eager = evaluate(x)
    torch.testing.assert_close(higher_func.compile(evaluate, backend="aot_eager")(x), eager)
    assert net.training and net.encoder[1].training  # the original's flags are untouched


# ---------------------------------------------------------------------------------------------
# One contract for eager and compiled calls, over the model zoo.
# ---------------------------------------------------------------------------------------------

# Every zoo model compiles (the recurrent ones with Dynamo's allow_rnn, which
# higher_func.compile turns on) except spectral_norm as a parametrization, which Dynamo does
# not trace in torch 2.13 ("SourcelessBuilder ... <class 'method'>").
NOT_COMPILABLE = ("spectral_norm",)
COMPILABLE = {n: f for n, f in {**ZOO, **VMAP_LIMITS}.items() if n not in NOT_COMPILABLE}
# Compiled, the meta-gradient through an old-style autograd.Function's backward comes out
# wrong in torch 2.13 (its double backward): it compiles for first-order and untracked loops.
SECOND_ORDER_COMPILABLE = [n for n in COMPILABLE if n != "legacy_function"]
# Forward-set state, tied weights, parameter containers and an LSTM run in the default suite;
# the rest of the zoo in nox.
_ZOO_FAST = {"ema_norm", "parameter_containers", "tied", "lstm"}
_TTA_FAST = {"mlp", "lstm", "dict_output"}


# Dynamo instantiates an old-style autograd.Function (legacy_function) while tracing it, and
# torch warns about that instantiation itself.
FUNCTION_INSTANCE = "ignore:.*should not be instantiated:DeprecationWarning"


def _marked(names, fast):
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings(FUNCTION_INSTANCE)
@pytest.mark.parametrize("name", _marked(SECOND_ORDER_COMPILABLE, _ZOO_FAST))
def test_compiled_inner_loop_equals_eager_over_the_zoo(name):
    torch._dynamo.reset()
    case = COMPILABLE[name]()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.01)
    first_order = name in NOT_TWICE_DIFFERENTIABLE_COMPILED

    def inner_loop(*inputs):
        with higher_func.innerloop_ctx(
            case.model, opt, copy_initial_weights=False, first_order=first_order
        ) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(scalar_loss(fmodel(*inputs)))
            out = fmodel(*inputs)
            state = dict(fmodel.state_dict(keep_vars=True))
            left = getattr(fmodel, "last_hidden", None)  # set by the forward (ema_norm)
            return scalar_loss(out), out, state, left

    before = snapshot(case.model)
    eager = inner_loop(*case.inputs)
    compiled = higher_func.compile(inner_loop, backend="aot_eager")(*case.inputs)
    assert_module_unchanged(case.model, before)
    assert_trees_close(compiled[1:], eager[1:], atol=1e-9, rtol=1e-7)
    trainable_params = [p for p in case.model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(eager[0], trainable_params)
    # Relative to the largest meta-gradient: a weight whose true gradient is 0 (a bias before
    # BatchNorm) carries rounding noise of the others' size.
    scale = max(g.abs().max().item() for g in expected)
    got = torch.autograd.grad(compiled[0], trainable_params)
    assert_trees_close(got, expected, atol=1e-10 * scale, rtol=1e-7)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings(FUNCTION_INSTANCE)
@pytest.mark.parametrize("name", _marked(COMPILABLE, _TTA_FAST))
def test_compiled_test_time_adaptation_equals_eager_over_the_zoo(name):
    # track_higher_grads=False with higher's default copy_initial_weights=True: each step's
    # weights are new leaves in eager code, which Dynamo cannot return anything computed from.
    torch._dynamo.reset()
    case = COMPILABLE[name]()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.01, momentum=0.5, weight_decay=0.01)

    def adapt(*inputs):
        with higher_func.innerloop_ctx(case.model, opt, track_higher_grads=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(3):
                diffopt.step(scalar_loss(fmodel(*inputs)))
            return fmodel(*inputs), dict(fmodel.state_dict(keep_vars=True))

    before = snapshot(case.model)
    eager = adapt(*case.inputs)
    compiled = higher_func.compile(adapt, backend="aot_eager")(*case.inputs)
    assert_module_unchanged(case.model, before)
    assert_trees_close(compiled, eager, atol=1e-9, rtol=1e-7)


def test_new_leaves_send_no_gradient_into_a_shared_tensor():
    weight = torch.randn(3, requires_grad=True)
    copy = _compile.new_leaf(weight, requires_grad=True)
    assert copy.requires_grad and torch.equal(copy, weight)
    (copy * 2).sum().backward()
    assert weight.grad is None and _compile._ZERO.grad is None


def test_copy_initial_weights_compiles_and_reaches_no_model_gradient():
    torch._dynamo.reset()
    model = make_model(batch_norm=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def query_loss(xs, ys, xq, yq):
        with higher_func.innerloop_ctx(model, opt, num_tasks=TASKS) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(torch.vmap(F.mse_loss)(fmodel(xs), ys))
            return torch.vmap(F.mse_loss)(fmodel(xq), yq).mean()

    data = sample(0)
    eager = query_loss(*data)
    compiled = higher_func.compile(query_loss, backend="aot_eager")(*data)
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
    assert all(p.grad is None for p in model.parameters())
    # The library's own zero, from which the copies are made while compiling, is no leaf that
    # gradients accumulate into (it would be shared by every meta-step and thread).
    assert _compile._ZERO.grad is None


def test_batched_recurrent_meta_step_compiles():
    torch._dynamo.reset()
    case = ZOO["lstm"]()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.05)
    xs = torch.randn(2, *case.inputs[0].shape, dtype=torch.float64)

    def meta_loss(xs):
        with higher_func.innerloop_ctx(
            case.model, opt, copy_initial_weights=False, num_tasks=2
        ) as (fmodel, diffopt):
            diffopt.step(fmodel(xs).pow(2).flatten(1).mean(1))
            return fmodel(xs).pow(2).mean()

    with pytest.warns(higher_func.BatchingFallbackWarning) if _first_lstm_patch() else _quiet():
        eager = meta_loss(xs)
    compiled = higher_func.compile(meta_loss, backend="aot_eager")(xs)
    params = list(case.model.parameters())
    expected = torch.autograd.grad(eager, params)
    got = torch.autograd.grad(compiled, params)
    assert_trees_close(got, expected, atol=1e-10, rtol=1e-7)


def _first_lstm_patch() -> bool:
    return not any("LSTM" in " ".join(key) for key in higher_func._batching._warned)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize(
    "name", ["dict_output", pytest.param("transformer_eval", marks=pytest.mark.slow)]
)
def test_batched_vmap_limit_models_compile(name):
    # Outputs that are not tensors leave vmap as they are; attention's fused kernel stays off.
    torch._dynamo.reset()
    case = VMAP_LIMITS[name]()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.05)
    xs = torch.randn(2, *case.inputs[0].shape, dtype=torch.float64)

    def meta_loss(xs):
        with higher_func.innerloop_ctx(
            case.model, opt, copy_initial_weights=False, num_tasks=2, first_order=True
        ) as (fmodel, diffopt):
            diffopt.step(scalar_losses(fmodel(xs)))
            return scalar_losses(fmodel(xs)).mean()

    eager = meta_loss(xs)
    compiled = higher_func.compile(meta_loss, backend="aot_eager")(xs)
    params = list(case.model.parameters())
    expected = torch.autograd.grad(eager, params)
    got = torch.autograd.grad(compiled, params)
    assert_trees_close(got, expected, atol=1e-10, rtol=1e-7)
    assert torch.backends.mha.get_fastpath_enabled()


def scalar_losses(output):
    """One loss per task of a batched output (its tensors, whatever else it holds)."""
    return sum((t * t + torch.sin(t)).flatten(1).mean(1) for t in tensors_in(output))


@pytest.mark.slow  # compiles a meta-step
def test_a_model_without_attention_compiles_with_torchs_python_tensor_methods():
    # Tensor.unflatten calls super() in Python, which Dynamo cannot trace under a torch
    # function mode: the attention rerouting mode covers only steps whose models need it.
    class Unflattening(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, x):
            return self.lin(x).unflatten(-1, (2, 3)).sum(-1)

    torch.manual_seed(0)
    model = Unflattening()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 6)

    def meta_loss(x):
        with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fm, diffopt):
            diffopt.step(fm(x).pow(2).sum())
            return fm(x).pow(2).sum()

    expected = torch.autograd.grad(meta_loss(x), list(model.parameters()))
    compiled = higher_func.compile(meta_loss, backend="aot_eager")
    got = torch.autograd.grad(compiled(x), list(model.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
