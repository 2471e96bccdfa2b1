"""The per-task contract of ``num_tasks``, generated: Python-side state equals a loop of patches.

Each example builds a module whose forward, hooks and methods keep state of several kinds
(tensors reassigned or updated in place, tuples, numbers, lists appended to, dicts, ``None``
alternating with a tensor), on the module itself or on a submodule, read back by the output
(so that meta-gradients go through it) and by the test after the calls. It runs batched in
both modes (``batching="vmap"`` and ``"loop"``) and as T separate patches, each with its own
slice of the inputs; outputs, the attributes read afterwards, meta-gradients and
``state_dict(task=t)`` must agree.
"""

from __future__ import annotations

import warnings
from typing import Any, List, NamedTuple, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import higher_func
from higher_func._compat import pytree

DTYPE = torch.float64
KINDS = ("tensor", "inplace", "tuple", "counter", "item", "list", "dict", "set", "maybe")
WHERE = ("forward", "hook", "method")


class Attr(NamedTuple):
    name: str
    kind: str  # one of KINDS
    where: str  # one of WHERE: which code updates it
    on_child: bool  # kept on the submodule ``fc`` instead of the module itself


def _initial(kind: str) -> Any:
    return {
        "tensor": None,
        "inplace": torch.zeros(3, dtype=DTYPE),
        "tuple": None,
        "counter": 0,
        "item": 0.0,
        "list": [],
        "dict": {},
        "set": set(),
        "maybe": None,
    }[kind]


def _update(kind: str, prev: Any, h: torch.Tensor) -> Any:
    """The attribute's next value after an update with activation ``h`` ([K, 3])."""
    m = h.mean(0)
    if kind == "tensor":
        return m if prev is None else 0.5 * prev + m
    if kind == "inplace":
        prev.mul_(0.5).add_(m)  # in place: the same tensor, each task its own
        return prev
    if kind == "tuple":
        return (m, h.sum()) if prev is None else (prev[0] + m, prev[1] * 0.5)
    if kind == "counter":
        return prev + 1
    if kind == "item":
        return prev + h.sum().item()
    if kind == "list":
        prev.append(m)
        return prev
    if kind == "dict":
        prev[f"step{len(prev)}"] = m
        prev["last"] = h.sum()
        return prev
    if kind == "set":
        prev.add(len(prev))  # a set added to in place, each task its own
        return prev
    return m if prev is None else None  # "maybe": a tensor, then None, then a tensor...


def _feedback(kind: str, value: Any) -> Any:
    """What of the attribute flows back into the output (0 where nothing does)."""
    if kind in ("tensor", "inplace", "maybe") and value is not None:
        return value.sum()
    if kind == "tuple" and value is not None:
        return value[0].sum() + value[1]
    if kind == "list" and value:
        return value[-1].sum()
    if kind == "dict" and value:
        return value["last"]
    return 0.0


class Stateful(nn.Module):
    """A module whose attributes ``attrs`` are updated where each says."""

    def __init__(self, attrs: Tuple[Attr, ...]) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 1)
        self.attrs = attrs
        for attr in attrs:
            setattr(self._holder(attr), attr.name, _initial(attr.kind))
        if any(a.where == "hook" for a in attrs):
            self.fc.register_forward_hook(self._record)

    def _holder(self, attr: Attr) -> nn.Module:
        return self.fc if attr.on_child else self

    def _step(self, where: str, h: torch.Tensor) -> None:
        for attr in self.attrs:
            if attr.where == where:
                holder = self._holder(attr)
                setattr(holder, attr.name, _update(attr.kind, getattr(holder, attr.name), h))

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._step("hook", output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        self._step("forward", h)
        back = sum(_feedback(a.kind, getattr(self._holder(a), a.name)) for a in self.attrs)
        return self.out(h) + 0.01 * back

    def read_state(self) -> dict:
        """Every attribute as the module holds it (called per task on a batched patch)."""
        return {a.name: getattr(self._holder(a), a.name) for a in self.attrs}

    def update_state(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        self._step("method", h)
        return h.sum()


@st.composite
def stateful_specs(draw: Any) -> Tuple[Attr, ...]:
    count = draw(st.integers(1, 3))
    return tuple(
        Attr(
            f"s{i}", draw(st.sampled_from(KINDS)), draw(st.sampled_from(WHERE)), draw(st.booleans())
        )
        for i in range(count)
    )


class Plan(NamedTuple):
    attrs: Tuple[Attr, ...]
    steps: int
    reset_after: int  # the step after which every attribute is reset from outside; -1: never
    num_tasks: int


@st.composite
def plans(draw: Any) -> Plan:
    return Plan(
        draw(stateful_specs()),
        draw(st.integers(1, 3)),
        draw(st.integers(-1, 2)),
        draw(st.integers(2, 3)),
    )


def _run(plan: Plan, model: nn.Module, xs: torch.Tensor, **kwargs: Any) -> dict:
    """The plan's inner loop on ``model`` (batched with ``num_tasks`` in ``kwargs``, or one
    task); returns outputs, attributes, the state_dict and the meta-loss."""
    batched = "num_tasks" in kwargs
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs) as (f, d):
        outputs, methods = [], []
        for step in range(plan.steps):
            out = f(xs)
            outputs.append(out)
            methods.append(f.update_state(xs))
            loss = out.pow(2).mean(dim=(-2, -1)) if batched else out.pow(2).mean()
            d.step(loss)
            if step == plan.reset_after:
                for attr in plan.attrs:  # from outside the module, as a user resets state
                    holder = f.fc if attr.on_child else f
                    setattr(holder, attr.name, _initial(attr.kind))
        final = f(xs)
        attributes = {a.name: getattr(f.fc if a.on_child else f, a.name) for a in plan.attrs}
        return {
            "read_by_method": f.read_state(),
            "outputs": [*outputs, final],
            "methods": methods,
            "attributes": attributes,
            "meta_loss": final.pow(2).mean(dim=(-2, -1)) if batched else final.pow(2).mean(),
            "state_dicts": [f.state_dict(task=t) for t in range(plan.num_tasks)]
            if batched
            else [f.state_dict()],
        }


def _assert_task(batched: Any, single: Any, t: int, what: str) -> None:
    """``batched`` (stacked over tasks) holds ``single`` as task ``t``'s part."""
    b_leaves, b_spec = pytree.tree_flatten(batched)
    s_leaves, s_spec = pytree.tree_flatten(single)
    assert b_spec == s_spec, f"{what}: structure {b_spec} != {s_spec}"
    for b, s in zip(b_leaves, s_leaves):
        if isinstance(b, torch.Tensor) and not isinstance(s, torch.Tensor):
            b = b[t].item()  # numbers that differ between tasks come back as a [T] tensor
        elif isinstance(b, torch.Tensor):
            b = b[t]
        if isinstance(s, torch.Tensor):
            torch.testing.assert_close(b, s, msg=f"{what} (task {t})")
        elif isinstance(s, set):
            assert b == s, f"{what} (task {t}): {b} != {s}"
        else:
            assert b == pytest.approx(s), f"{what} (task {t}): {b} != {s}"


def _loop_of_patches(plan: Plan, model: nn.Module, xs: torch.Tensor) -> Tuple[List[dict], list]:
    model.zero_grad()
    runs = []
    for t in range(plan.num_tasks):
        run = _run(plan, model, xs[t])
        (run["meta_loss"] / plan.num_tasks).backward()
        runs.append(run)
    return runs, [p.grad.clone() for p in model.parameters()]


def check_plan(plan: Plan, mode: str) -> None:
    torch.manual_seed(0)
    model = Stateful(plan.attrs).double()
    xs = torch.randn(plan.num_tasks, 5, 4, dtype=DTYPE)
    singles, looped_grads = _loop_of_patches(plan, model, xs)
    model.zero_grad()
    batched = _run(plan, model, xs, num_tasks=plan.num_tasks, batching=mode)
    batched["meta_loss"].mean().backward()
    for t, single in enumerate(singles):
        for i, (b, s) in enumerate(zip(batched["outputs"], single["outputs"])):
            _assert_task(b, s, t, f"output of call {i}")
        for i, (b, s) in enumerate(zip(batched["methods"], single["methods"])):
            _assert_task(b, s, t, f"method's result {i}")
        for name, value in batched["attributes"].items():
            _assert_task(value, single["attributes"][name], t, f"attribute {name}")
        _assert_task(batched["read_by_method"], single["read_by_method"], t, "read_state()")
        sd, single_sd = batched["state_dicts"][t], single["state_dicts"][0]
        assert list(sd) == list(single_sd)
        for key in sd:
            torch.testing.assert_close(sd[key], single_sd[key], msg=f"state_dict[{key!r}]")
    for p, g in zip(model.parameters(), looped_grads):
        torch.testing.assert_close(p.grad, g, msg="meta-gradient")


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@settings(max_examples=40, deadline=None)
@given(plan=plans())
def test_stateful_forwards_equal_a_loop_of_patches(mode: str, plan: Plan) -> None:
    if mode == "vmap" and any(a.kind == "item" for a in plan.attrs):
        # .item() cannot run under vmap: batching="vmap" refuses it (tested below).
        plan = plan._replace(attrs=tuple(a for a in plan.attrs if a.kind != "item"))
        if not plan.attrs:
            return
    check_plan(plan, mode)


def test_item_under_forced_vmap_is_torchs_error() -> None:
    plan = Plan((Attr("s0", "item", "forward", False),), 1, -1, 2)
    with pytest.raises(RuntimeError, match=r"\.item\(\)"):
        check_plan(plan, "vmap")


# ---------------------------------------------------------------------------------------------
# Each case of the contract, by hand.
# ---------------------------------------------------------------------------------------------

MODES = pytest.mark.parametrize("mode", ["vmap", "loop"])
T = 3


def _per_task_params(fmodel: Any, seed: int = 1) -> None:
    """Give each task its own weights (else every task would compute the same)."""
    generator = torch.Generator().manual_seed(seed)
    fmodel.update_params(
        [p + torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in fmodel.parameters()]
    )


def _single(model: nn.Module, fmodel: Any, t: int) -> Any:
    """A separate unbatched patch of ``model`` holding task ``t``'s weights."""
    single = higher_func.monkeypatch(model)
    single.update_params([p[t] for p in fmodel.parameters()])
    return single


class Recurrent(nn.Module):
    """Keeps ``(h, c)`` between calls, counts its calls, records activations with a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.state: Any = None
        self.total = torch.zeros(4)
        self.acts: List[torch.Tensor] = []
        self.fc.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.acts.append(output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) if self.state is None else self.fc(x) + self.state[1]
        self.state = (h, torch.tanh(h))
        self.total += h.sum(0)  # a plain tensor attribute updated in place
        return h

    def reset_state(self) -> None:
        self.state = None


@MODES
def test_tuple_state_in_place_tensors_and_hook_records_are_per_task(mode: str) -> None:
    model = Recurrent().double()
    fmodel = higher_func.monkeypatch(model, num_tasks=T, batching=mode)
    _per_task_params(fmodel)
    xs = torch.randn(T, 2, 4, dtype=DTYPE)
    fmodel(xs)
    out = fmodel(xs)
    assert isinstance(fmodel.state, tuple) and fmodel.state[0].shape == (T, 2, 4)
    assert len(fmodel.acts) == 2 and fmodel.acts[1].shape == (T, 2, 4)
    for t in range(T):
        single = _single(model, fmodel, t)
        single(xs[t])
        torch.testing.assert_close(out[t], single(xs[t]))
        torch.testing.assert_close(fmodel.state[1][t], single.state[1])
        torch.testing.assert_close(fmodel.total[t], single.total)
        torch.testing.assert_close(fmodel.acts[1][t], single.acts[1])
    assert model.state is None and model.acts == [] and not model.total.any()  # untouched


@MODES
def test_state_reset_from_outside_applies_to_every_task(mode: str) -> None:
    model = Recurrent().double()
    fmodel = higher_func.monkeypatch(model, num_tasks=T, batching=mode)
    _per_task_params(fmodel)
    xs = torch.randn(T, 2, 4, dtype=DTYPE)
    first = fmodel(xs)
    fmodel(xs)
    fmodel.reset_state()  # a method: runs once per task
    assert fmodel.state is None
    torch.testing.assert_close(fmodel(xs), first)
    fmodel.state = None  # an assignment: one value for every task
    torch.testing.assert_close(fmodel(xs), first)
    fmodel.acts.clear()  # an in-place change of what a call left
    fmodel(xs)
    assert len(fmodel.acts) == 1


class Scores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.fc(x)
        score = y.sum().item()
        if score > 0:
            self.pos = y
        else:
            self.neg = y
        self.last = score
        return y, score


def test_numbers_are_per_task_and_attributes_are_keyed_by_name() -> None:
    model = Scores().double()
    fmodel = higher_func.monkeypatch(model, num_tasks=2, batching="loop")
    fmodel.update_params([torch.stack([p, -p]) for p in model.parameters()])
    xs = torch.ones(2, 3, 4, dtype=DTYPE)
    y, score = fmodel(xs)
    expected = [_single(model, fmodel, t)(xs[t])[1] for t in range(2)]
    assert score.dtype == torch.float64 and score.tolist() == pytest.approx(expected)
    assert fmodel.last.tolist() == pytest.approx(expected)
    # One task set pos, the other neg: neither can be shown as one value, each task has its own.
    positive = 0 if expected[0] > 0 else 1
    with pytest.raises(higher_func.PerTaskError, match=rf"'pos'.*set only in tasks \[{positive}\]"):
        _ = fmodel.pos
    with pytest.raises(higher_func.PerTaskError, match="'neg'"):
        _ = fmodel.neg


def test_item_in_a_forward_falls_back_to_the_loop_under_auto() -> None:
    model = Scores().double()
    with pytest.warns(higher_func.BatchingFallbackWarning, match=r"\.item\(\)"):
        fmodel = higher_func.monkeypatch(model, num_tasks=2)
        fmodel(torch.ones(2, 3, 4, dtype=DTYPE))
    assert higher_func.patch.batching(fmodel).mode == "loop"


def test_hook_writing_into_a_captured_dict_is_an_error_naming_it() -> None:
    activations: dict = {}
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).double()

    def remember(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        activations["fc"] = output

    model[0].register_forward_hook(remember)
    for mode in ("vmap", "loop"):
        fmodel = higher_func.monkeypatch(model, num_tasks=T, batching=mode)
        with pytest.raises(higher_func.PerTaskError, match=r"variable 'activations'.*remember"):
            fmodel(torch.randn(T, 2, 4, dtype=DTYPE))
        assert activations == {}  # put back: no tensor escaped from vmap


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 3)
        self.embed = self._embed  # a method kept as an attribute

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


@MODES
def test_a_method_alias_runs_once_per_task(mode: str) -> None:
    model = Aliased().double()
    fmodel = higher_func.monkeypatch(model, num_tasks=T, batching=mode)
    _per_task_params(fmodel)
    xs = torch.randn(T, 2, 4, dtype=DTYPE)
    out = fmodel.embed(xs)
    assert out.shape == (T, 2, 3)
    for t in range(T):
        torch.testing.assert_close(out[t], _single(model, fmodel, t).embed(xs[t]))


class TiedBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        shared = torch.zeros(4)
        self.a.register_buffer("ema", shared)
        self.b.register_buffer("ema", shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        self.b.ema = self.b.ema + y.mean(0)  # reassigned in one of its two modules
        return y + self.a.ema + self.b.ema


@MODES
def test_a_buffer_of_two_modules_reassigned_in_one(mode: str) -> None:
    model = TiedBuffer().double()
    fmodel = higher_func.monkeypatch(model, num_tasks=T, batching=mode)
    _per_task_params(fmodel)
    xs = torch.randn(T, 2, 4, dtype=DTYPE)
    fmodel(xs)
    out = fmodel(xs)
    for t in range(T):
        single = _single(model, fmodel, t)
        single(xs[t])
        torch.testing.assert_close(out[t], single(xs[t]))
        torch.testing.assert_close(fmodel.b.ema[t], single.b.ema)
        torch.testing.assert_close(fmodel.a.ema[t], single.a.ema)


@MODES
def test_batchnorm_in_eval_then_train_has_the_meta_gradients_of_functional_call(mode: str) -> None:
    # Each call gets its own running statistics: the training call's in-place update must not
    # change what the eval call saved for backward. The oracle is functional_call with a new
    # copy of the buffers per call.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = torch.randn(T, 5, 4, dtype=DTYPE)
    kwargs = dict(copy_initial_weights=False, num_tasks=T, batching=mode)
    with higher_func.innerloop_ctx(model, opt, **kwargs) as (fmodel, diffopt):
        for training in (False, True):
            fmodel.train(training)
            diffopt.step(fmodel(xs).pow(2).mean(dim=(1, 2)))
        fmodel(xs).pow(2).mean().backward()
    batched = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for t in range(T):
        params = dict(model.named_parameters())
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        for training in (False, True, True):  # two steps, then the query
            model.train(training)
            buffers = {n: b.clone() for n, b in buffers.items()}
            out = torch.func.functional_call(model, {**params, **buffers}, (xs[t],))
            loss = out.pow(2).mean()
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
        (loss / T).backward()
    model.train()
    for p, g in zip(model.parameters(), batched):
        torch.testing.assert_close(g, p.grad)


def test_none_input_on_the_vmap_path() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, mask: Any = None) -> torch.Tensor:
            return self.fc(x) if mask is None else self.fc(x) * mask

    model = Masked().double()
    fmodel = higher_func.monkeypatch(model, num_tasks=T, batching="vmap")
    xs = torch.randn(T, 2, 4, dtype=DTYPE)
    torch.testing.assert_close(fmodel(xs, None), fmodel(xs))


@pytest.mark.parametrize(
    ("lr_shape", "per_task"), [((4, 3), False), ((4,), True), ((4, 4, 3), True), ((), False)]
)
def test_optimizer_state_dict_of_a_task_knows_shared_values_from_the_step(lr_shape, per_task):
    # T = 4 = the weight's first dim: a shared (4, 3) lr must not be read as one row per task.
    model = nn.Linear(3, 4, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lr = torch.rand(lr_shape, dtype=DTYPE)
    with higher_func.innerloop_ctx(model, opt, num_tasks=4, override={"lr": [lr]}) as (f, d):
        d.step(f(torch.randn(4, 2, 3, dtype=DTYPE)).pow(2).mean(dim=(1, 2)))
        exported = d.state_dict(task=1)["param_groups"][0]["lr"]
    expected = lr[1] if per_task else lr
    torch.testing.assert_close(torch.as_tensor(exported, dtype=DTYPE), expected)


def test_two_threads_leave_the_attention_fast_path_as_it_was() -> None:
    import threading

    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    errors: list = []

    def work() -> None:
        try:
            fmodel = higher_func.monkeypatch(model, num_tasks=2)
            for _ in range(5):
                fmodel(torch.randn(2, 3, 4, 8))
        except Exception as error:  # surfaced below
            errors.append(error)

    # torch < 2.2 has no process-wide switch (torch.backends.mha): the fast path is turned off
    # per thread there, and the threads must still run; with the switch, it must end as it was.
    switch = getattr(torch.backends, "mha", None)
    assert switch is None or switch.get_fastpath_enabled()
    threads = [threading.Thread(target=work) for _ in range(4)]
    with warnings.catch_warnings():
        # SDPA's generic vmap rule warns of a performance drop when torch's fused kernel runs
        # (tracked patches compute attention with the math kernel instead: no warning then).
        warnings.filterwarnings("ignore", message=".*performance drop", category=UserWarning)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert switch is None or switch.get_fastpath_enabled()


def test_batching_values_are_checked() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"batching must be one of \('auto', 'vmap', 'loop'\)"):
        higher_func.monkeypatch(model, num_tasks=2, batching="fast")
    with pytest.raises(ValueError, match="needs num_tasks"):
        higher_func.monkeypatch(model, batching="loop")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="batching must be one of"):
        with higher_func.innerloop_ctx(model, opt, num_tasks=2, batching=None):
            pass
    looped = higher_func.monkeypatch(model, num_tasks=2, batching="loop")
    assert higher_func.patch.batching(looped).mode == "loop"  # and no warning


@pytest.mark.slow  # compiles a meta-step: about a minute on a shared 2-core machine
def test_compiled_batched_meta_step_calling_and_reading_submodules_equals_eager() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = torch.randn(2, 5, 3), torch.randn(2, 5, 1)

    def meta_loss(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        kwargs = dict(copy_initial_weights=False, num_tasks=2, batching="vmap")
        with higher_func.innerloop_ctx(model, opt, **kwargs) as (fmodel, diffopt):
            h = fmodel[1](fmodel[0](xs))  # calls of submodules
            out = fmodel[3](fmodel[2](h))
            diffopt.step(torch.vmap(nn.functional.mse_loss)(out, ys))
            stats = fmodel[1].running_mean  # a read of a submodule's buffer
            loss = torch.vmap(nn.functional.mse_loss)(fmodel(xs), ys).mean()
            return loss + stats.sum() * 0

    eager = meta_loss(xs, ys)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = higher_func.compile(meta_loss)(xs, ys)
    grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


class _Box:
    """A plain object holding a tensor (not a pytree node)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class Boxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        self.box = _Box(y)
        return y


def test_an_object_holding_tensors_is_refused_by_vmap_and_kept_per_task_by_the_loop():
    model = Boxed().double()
    xs = torch.randn(T, 2, 4, dtype=DTYPE)
    strict = higher_func.monkeypatch(model, num_tasks=T, batching="vmap")
    with pytest.raises(higher_func.PerTaskError, match=r"'box' holds a _Box"):
        strict(xs)
    with pytest.warns(higher_func.BatchingFallbackWarning, match="per-task state"):
        fmodel = higher_func.monkeypatch(model, num_tasks=T)
        out = fmodel(xs)
    assert higher_func.patch.batching(fmodel).mode == "loop"
    with pytest.raises(higher_func.PerTaskError, match="'box'"):
        _ = fmodel.box  # one object per task: no single value shows them
    torch.testing.assert_close(out[1], model(xs[1]))


class _StatefulNoHook(Recurrent):
    """Recurrent's tuple state and in-place tensor, without the hook (a hook that is a bound
    method does not compile: the patch's private pass rebinds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc._forward_hooks.clear()


@pytest.mark.slow  # compiles a meta-step
def test_compiled_batched_meta_step_with_per_task_state_equals_eager() -> None:
    torch.manual_seed(0)
    model = _StatefulNoHook()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = torch.randn(2, 3, 4)

    def meta_loss(xs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(copy_initial_weights=False, num_tasks=2, batching="vmap")
        with higher_func.innerloop_ctx(model, opt, **kwargs) as (fmodel, diffopt):
            diffopt.step(fmodel(xs).pow(2).mean(dim=(1, 2)))
            out = fmodel(xs)
            return out.pow(2).mean() + 0.1 * fmodel.state[1].sum() + 0.01 * fmodel.total.sum()

    torch.testing.assert_close(higher_func.compile(meta_loss)(xs), meta_loss(xs))


def test_a_hook_registered_after_the_first_call_is_checked_too() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).double()
    fmodel = higher_func.monkeypatch(model, num_tasks=T)
    xs = torch.randn(T, 2, 4, dtype=DTYPE)
    fmodel(xs)
    seen: list = []
    fmodel[0].register_forward_hook(lambda module, inputs, output: seen.append(output))
    with pytest.raises(higher_func.PerTaskError, match="variable 'seen'"):
        fmodel(xs)
    assert seen == []
