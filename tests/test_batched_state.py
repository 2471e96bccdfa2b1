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

from typing import Any, List, NamedTuple, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import higher_func
from higher_func._compat import pytree

DTYPE = torch.float64
KINDS = ("tensor", "inplace", "tuple", "counter", "item", "list", "dict", "maybe")
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

    def update_state(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        self._step("method", h)
        return h.sum()


@st.composite
def stateful_specs(draw: Any) -> Tuple[Attr, ...]:
    count = draw(st.integers(1, 3))
    return tuple(
        Attr(f"s{i}", draw(st.sampled_from(KINDS)), draw(st.sampled_from(WHERE)), draw(st.booleans()))
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
        draw(stateful_specs()), draw(st.integers(1, 3)), draw(st.integers(-1, 2)), draw(st.integers(2, 3))
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
        sd, single_sd = batched["state_dicts"][t], single["state_dicts"][0]
        assert list(sd) == list(single_sd)
        for key in sd:
            torch.testing.assert_close(sd[key], single_sd[key], msg=f"state_dict[{key!r}]")
    for p, g in zip(model.parameters(), looped_grads):
        torch.testing.assert_close(p.grad, g, msg="meta-gradient")


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@settings(max_examples=25, deadline=None)
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
