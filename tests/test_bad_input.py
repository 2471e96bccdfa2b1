"""Bad input, drawn by Hypothesis, is refused loudly and changes nothing.

Every entry point a user feeds (fast weights through ``update_params``, ``fmodel(x,
params=...)`` and ``diffopt.step(loss, params=...)``, losses, ``override`` values, what a
``grad_callback`` returns, inputs of a batched module, ``parameters(time=...)``) is given
wrong shapes, dtypes, devices ("meta" stands in for another device), keys, counts and
non-tensors; ``override`` values go to every optimizer of the registry. The contract checked
for each:

* only ``ValueError``, ``TypeError``, ``KeyError`` or ``RuntimeError`` is raised, never a
  silent result;
* the message names the problem (the parameter, key, count or argument at fault);
* the module, the patched module's fast weights and history, and the optimizer's groups and
  state are as they were.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import ZOO, assert_module_unchanged, assert_same_objects, snapshot

import higher_func as higher
from higher_func._rules import OPTIMIZERS

ERRORS = (ValueError, TypeError, KeyError, RuntimeError)
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
SHAPES = [(8, 4), (8,), (8, 8), (8,), (3, 8), (3,)]

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


class Setup:
    """A float32 MLP, its patched module after one step, and the optimizer (two groups)."""

    def __init__(self, num_tasks=None, optimizer=torch.optim.SGD, **opt_kwargs):
        case = ZOO["mlp"](dtype=torch.float32)
        self.model = case.model
        assert [n for n, _ in self.model.named_parameters()] == NAMES
        lead = () if num_tasks is None else (num_tasks,)
        self.num_tasks = num_tasks
        self.x = case.inputs[0].expand(*lead, *case.inputs[0].shape)
        opt_kwargs.setdefault("lr", 0.1)
        self.opt = optimizer(
            [
                {"params": list(self.model[0].parameters())},
                {"params": list(self.model[2].parameters()) + list(self.model[4].parameters())},
            ],
            **opt_kwargs,
        )
        self.before = snapshot(self.model)
        self.fmodel = higher.monkeypatch(self.model, num_tasks=num_tasks)
        self.diffopt = higher.get_diff_optim(self.opt, self.model.parameters(), fmodel=self.fmodel)
        self.diffopt.step(self.loss())

    def loss(self, params=None):
        out = self.fmodel(self.x, params=params)
        if self.num_tasks is None:
            return out.pow(2).mean()
        return out.pow(2).mean(dim=(1, 2))

    def record(self):
        history = []
        while True:
            try:
                history.append(list(self.fmodel.parameters(time=len(history))))
            except ValueError:
                break
        groups = [dict(g, params=list(g["params"])) for g in self.diffopt.param_groups]
        state = [{i: dict(s) for i, s in per.items() if s} for per in self.diffopt.state]
        return history, groups, state

    def assert_refused(self, action, names_problem):
        """``action()`` raises a documented error matching ``names_problem``, changing nothing."""
        record = self.record()
        with pytest.raises(ERRORS) as info:
            action()
        message = _message(info.value)
        assert re.search(names_problem, message), f"message does not name the problem: {message}"
        assert_same_objects(self.record(), record, "patched module and optimizer")
        assert_module_unchanged(self.model, self.before)
        return message


def _message(error: BaseException) -> str:
    # str(KeyError) is the repr of its argument: read the argument itself.
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


class _Shown:
    """A callable with a readable repr, so that Hypothesis reports what it drew."""

    def __init__(self, text: str, fn) -> None:
        self.text, self.fn = text, fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return self.text


def _counts(expected: int, got: int) -> str:
    return rf"(?s)(\b{expected}\b.*\b{got}\b|\b{got}\b.*\b{expected}\b)"


def _fresh(shape, dtype=torch.float32, device="cpu"):
    tensor = torch.zeros(shape, dtype=dtype, device=device)
    return tensor.requires_grad_() if tensor.is_floating_point() else tensor


NON_TENSORS = st.sampled_from([None, 0.5, 3, "weights", [1.0, 2.0], (1.0,), object()])
WRONG_SHAPES = st.lists(st.integers(0, 9), max_size=3).map(tuple)
UNKNOWN_KEYS = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=10).filter(
    lambda k: k not in NAMES
)


@st.composite
def malformed_params(draw):
    """``(params, pattern)``: fast weights wrong in one way, and what the message must name.

    ``diffopt.step(params=...)`` takes a list only: given a dict, it must say so.
    """
    good = [_fresh(shape) for shape in SHAPES]
    kind = draw(
        st.sampled_from(
            [
                "drop",
                "extra",
                "shape",
                "non_tensor",
                "unknown_key",
                "missing_key",
                "single",
                "scalar",
            ]
        )
    )
    i = draw(st.integers(0, len(NAMES) - 1))
    if kind == "drop":
        count = draw(st.integers(0, len(NAMES) - 1))
        return good[:count], _counts(len(NAMES), count)
    if kind == "extra":
        extra = draw(st.lists(WRONG_SHAPES.map(_fresh), min_size=1, max_size=3))
        return good + extra, _counts(len(NAMES), len(NAMES) + len(extra))
    if kind == "shape":
        good[i] = _fresh(draw(WRONG_SHAPES.filter(lambda s: s != SHAPES[i])))
        return good, re.escape(NAMES[i])
    if kind == "non_tensor":
        good[i] = draw(NON_TENSORS)
        return good, re.escape(NAMES[i])
    if kind == "unknown_key":
        key = draw(UNKNOWN_KEYS)
        return {**dict(zip(NAMES, good)), key: good[0]}, re.escape(key)
    if kind == "missing_key":
        named = dict(zip(NAMES, good))
        del named[NAMES[i]]
        return named, re.escape(NAMES[i])
    if kind == "single":
        return good[i], r"(?i)list|dict|tensor|param"
    return draw(st.sampled_from([3, 2.5, object()])), r"(?i)param|iterable|list|tensor"


def _give(setup: Setup, entry: str, params):
    if entry == "update_params":
        return lambda: setup.fmodel.update_params(params)
    if entry == "call":
        return lambda: setup.fmodel(setup.x, params=params)
    loss = setup.loss()
    return lambda: setup.diffopt.step(loss, params=params)


# ---------------------------------------------------------------------------------------------
# Fast weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["update_params", "call", "step"])
@SETTINGS
@given(bad=malformed_params())
def test_malformed_fast_weights_are_refused(entry, bad):
    params, pattern = bad
    if entry == "step" and isinstance(params, dict):
        pattern = r"(?i)dict|mapping"
    setup = Setup()
    setup.assert_refused(_give(setup, entry, params), pattern)


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool]


@pytest.mark.parametrize("entry", ["update_params", "call"])
@SETTINGS
@given(index=st.integers(0, len(NAMES) - 1), dtype=st.sampled_from(DTYPES))
def test_fast_weight_of_another_dtype_is_refused(entry, index, dtype):
    # A float16 weight in a float32 module fails later with a kernel's dtype error that does
    # not name the weight, or, where the weight only scales an activation, promotes silently;
    # an integer weight cannot require grad, so a step would silently never update it.
    setup = Setup()
    params = [p.detach().clone() for p in setup.fmodel.parameters()]
    params[index] = params[index].to(dtype)
    setup.assert_refused(_give(setup, entry, params), re.escape(NAMES[index]) + "|dtype")


@pytest.mark.parametrize("entry", ["update_params", "call"])
@SETTINGS
@given(index=st.integers(0, len(NAMES) - 1))
def test_fast_weight_on_another_device_is_refused(entry, index):
    setup = Setup()
    params = [p.detach().clone() for p in setup.fmodel.parameters()]
    params[index] = params[index].to("meta")
    setup.assert_refused(_give(setup, entry, params), re.escape(NAMES[index]) + "|device")


@SETTINGS
@given(
    time=st.one_of(
        st.text(max_size=3), st.floats(), st.integers(2, 10**6), st.integers(max_value=-3)
    )
)
def test_parameters_at_an_unknown_time_is_refused(time):
    setup = Setup()  # initial weights and one step recorded: times 0, 1 (and -1, -2)
    setup.assert_refused(lambda: list(setup.fmodel.parameters(time=time)), r"time")


# ---------------------------------------------------------------------------------------------
# Losses, overrides, gradients
# ---------------------------------------------------------------------------------------------


@st.composite
def bad_losses(draw):
    kind = draw(
        st.sampled_from(["non_tensor", "shape", "integer", "detached", "other_model", "meta"])
    )
    if kind == "non_tensor":
        value = draw(NON_TENSORS)
        return _Shown(f"loss {value!r}", lambda setup: value)
    if kind == "shape":
        shape = draw(WRONG_SHAPES.filter(lambda s: math.prod(s) != 1))
        return _Shown(f"loss of shape {shape}", lambda setup: setup.loss() * torch.ones(shape))
    if kind == "integer":
        value = draw(st.integers(-100, 100))
        return _Shown(f"loss tensor({value})", lambda setup: torch.tensor(value))
    if kind == "detached":
        return _Shown("detached loss", lambda setup: setup.loss().detach())
    if kind == "other_model":
        return _Shown("loss of the module", lambda setup: setup.model(setup.x).pow(2).mean())
    return _Shown("meta loss", lambda setup: torch.zeros((), device="meta", requires_grad=True))


@SETTINGS
@given(make_loss=bad_losses())
def test_bad_losses_are_refused(make_loss):
    setup = Setup()
    loss = make_loss(setup)
    setup.assert_refused(lambda: setup.diffopt.step(loss), r"(?i)loss|fast weight")


HYPER = ["lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"]


@st.composite
def malformed_overrides(draw):
    """``(override, pattern)`` for the two-group SGD optimizer of ``Setup``."""
    kind = draw(st.sampled_from(["unknown_key", "params", "not_a_list", "count", "value"]))
    key = draw(st.sampled_from(HYPER))
    if kind == "unknown_key":
        unknown = draw(UNKNOWN_KEYS.filter(lambda k: k not in HYPER + ["params"]))
        return {unknown: [0.1]}, re.escape(unknown)
    if kind == "params":
        return {"params": [[]]}, "params"
    if kind == "not_a_list":
        return {key: draw(st.sampled_from([0.1, "0.1", None, torch.tensor(0.1)]))}, key
    if kind == "count":
        return {key: [0.1] * draw(st.sampled_from([0, 3, 4]))}, key
    flag = key in ("nesterov", "maximize")
    wrong = ["x", None, [0.1], torch.tensor([0.1, 0.2]), torch.tensor(1), 1j]
    wrong += [0.5, 1] if flag else [True]
    return {key: [draw(st.sampled_from(wrong))]}, key


@pytest.mark.parametrize("where", ["innerloop_ctx", "step"])
@SETTINGS
@given(bad=malformed_overrides())
def test_malformed_overrides_are_refused(where, bad):
    override, pattern = bad
    setup = Setup(momentum=0.5)
    if where == "step":
        loss = setup.loss()
        setup.assert_refused(lambda: setup.diffopt.step(loss, override=override), pattern)
    else:

        def enter():
            with higher.innerloop_ctx(setup.model, setup.opt, override=override):
                pass

        setup.assert_refused(enter, pattern)


NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


@st.composite
def non_finite_overrides(draw):
    """``(optimizer, override, key)``: one numeric hyperparameter made NaN or infinite."""
    optimizer = draw(st.sampled_from(list(OPTIMIZERS)))
    defaults = optimizer([torch.zeros(1, requires_grad=True)], lr=0.1).param_groups[0]
    keys = [k for k, v in defaults.items() if isinstance(v, (int, float, tuple))]
    keys = [k for k in keys if not isinstance(defaults[k], bool)]
    key = draw(st.sampled_from(keys))
    value = draw(NON_FINITE)
    if isinstance(defaults[key], tuple):
        position = draw(st.integers(0, len(defaults[key]) - 1))
        value = tuple(value if j == position else v for j, v in enumerate(defaults[key]))
    return optimizer, {key: [value]}, key


@pytest.mark.parametrize("where", ["innerloop_ctx", "step"])
@SETTINGS
@given(bad=non_finite_overrides())
def test_non_finite_hyperparameters_are_refused(where, bad):
    # torch.optim refuses e.g. lr=-1 at construction; a NaN or infinite learning rate (or
    # momentum, eps...) turns every fast weight into NaN at the next step, silently.
    optimizer, override, key = bad
    setup = Setup(optimizer=optimizer)
    if where == "step":
        loss = setup.loss()
        setup.assert_refused(lambda: setup.diffopt.step(loss, override=override), key)
    else:

        def enter():
            with higher.innerloop_ctx(setup.model, setup.opt, override=override) as (f, d):
                d.step(f(setup.x).pow(2).mean())
                assert all(torch.isfinite(p).all() for p in f.parameters()), "NaN fast weights"

        setup.assert_refused(enter, key)


@st.composite
def bad_gradients(draw):
    """``(grad_callback, pattern)``: a callback returning gradients wrong in one way."""
    i = draw(st.integers(0, len(NAMES) - 1))
    kind = draw(st.sampled_from(["shape", "dtype", "non_tensor", "count", "device"]))
    pattern = re.escape(NAMES[i])
    if kind == "count":
        count = draw(st.integers(0, 9).filter(lambda n: n != len(NAMES)))
        callback = _Shown(f"{count} gradients", lambda grads: (list(grads) * 2)[:count])
        return callback, _counts(len(NAMES), count)
    if kind == "shape":
        shape = draw(WRONG_SHAPES.filter(lambda s: s != SHAPES[i]))
        what, replace = f"ones{shape}", lambda g: torch.ones(shape)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64]))
        what, replace = str(dtype), lambda g: g.to(dtype)
        pattern += "|dtype"
    elif kind == "device":
        what, replace = "a meta tensor", lambda g: g.to("meta")
        pattern += "|device"
    else:
        value = draw(NON_TENSORS.filter(lambda v: v is not None))
        what, replace = repr(value), lambda g: value

    def callback(grads):
        grads = list(grads)
        grads[i] = replace(grads[i])
        return grads

    return _Shown(f"gradient of {NAMES[i]} replaced by {what}", callback), pattern


@SETTINGS
@given(bad=bad_gradients())
def test_bad_gradients_from_grad_callback_are_refused(bad):
    # A gradient of shape (1,) for a bias broadcasts silently in the update; one of another
    # dtype silently changes the fast weight's dtype; a float is silently used as a gradient.
    callback, pattern = bad
    setup = Setup(momentum=0.5)
    loss = setup.loss()
    setup.assert_refused(lambda: setup.diffopt.step(loss, grad_callback=callback), pattern)


# ---------------------------------------------------------------------------------------------
# Inputs and batched tasks
# ---------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "features": lambda x: torch.cat([x, x[..., :1]], dim=-1),
    "float64": lambda x: x.double(),
    "float16": lambda x: x.half(),
    "int64": lambda x: x.long(),
    "meta": lambda x: x.to("meta"),
    "scalar": lambda x: torch.tensor(1.0),
    "none": lambda x: None,
    "string": lambda x: "inputs",
    "list": lambda x: x.tolist(),
}


@SETTINGS
@given(kind=st.sampled_from(sorted(BAD_INPUTS)), num_tasks=st.sampled_from([None, 2]))
def test_bad_inputs_to_the_patched_module_are_refused(kind, num_tasks):
    setup = Setup(num_tasks=num_tasks)
    x = BAD_INPUTS[kind](setup.x)
    setup.assert_refused(lambda: setup.fmodel(x), r".")


@st.composite
def task_mismatches(draw):
    """``(num_tasks, action(setup), pattern)``: a count of tasks that does not fit."""
    tasks = draw(st.integers(1, 4))
    other = draw(st.integers(1, 5).filter(lambda n: n != tasks))
    kind = draw(st.sampled_from(["inputs", "losses", "params", "optimizer", "in_dims"]))
    if kind == "inputs":

        def action(setup):
            x = setup.x[0].expand(other, *setup.x.shape[1:])
            return lambda: setup.fmodel(x)

        action = _Shown(f"inputs for {other} tasks", action)

        return tasks, action, _counts(tasks, other)
    if kind == "losses":

        def action(setup):
            losses = setup.loss()[:1].expand(other)
            return lambda: setup.diffopt.step(losses)

        action = _Shown(f"{other} losses", action)

        return tasks, action, str(tasks)
    if kind == "params":

        def action(setup):
            params = [p[0].expand(other, *p.shape[1:]) for p in setup.fmodel.parameters()]
            return lambda: setup.fmodel.update_params(params)

        action = _Shown(f"fast weights for {other} tasks", action)

        return tasks, action, re.escape(NAMES[0])
    if kind == "optimizer":

        def action(setup):
            def build():
                higher.get_diff_optim(
                    setup.opt, setup.model.parameters(), fmodel=setup.fmodel, num_tasks=other
                )

            return build

        return tasks, _Shown(f"optimizer for {other} tasks", action), _counts(tasks, other)
    in_dims = draw(st.sampled_from(["0", 0.5, (0, 0), [None, 0], (3,), (-4,)]))
    action = _Shown(
        f"in_dims={in_dims!r}", lambda setup: lambda: setup.fmodel(setup.x, in_dims=in_dims)
    )
    return tasks, action, "in_dims|dim"


@SETTINGS
@given(bad=task_mismatches())
def test_task_counts_that_do_not_fit_are_refused(bad):
    tasks, action, pattern = bad
    setup = Setup(num_tasks=tasks)
    setup.assert_refused(action(setup), pattern)


# ---------------------------------------------------------------------------------------------
# Elementwise hyperparameters
# ---------------------------------------------------------------------------------------------

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
            higher.optim.get_diff_optim(opt, [weight], override={"lr": [lr]})
        return
    diffopt = higher.optim.get_diff_optim(opt, [weight], override={"lr": [lr]})
    fast = weight.clone()
    (new,) = diffopt.step((fast * torch.arange(fast.numel()).reshape(shape)).sum(), params=[fast])
    assert new.shape == weight.shape
    torch.testing.assert_close(
        new, -0.5 * torch.arange(fast.numel(), dtype=new.dtype).reshape(shape)
    )
