"""Reliability of patched modules and differentiable optimizers under stress.

* Threads: many patched views of one shared module, used from several threads at once, each
  see only their own fast weights, and the module is never left changed. Races are forced
  deterministically (a layer that pauses a call at a known point) rather than hoped for.
* Faults: a step that raises anywhere (forward, loss, backward, ``grad_callback``, a bad
  ``override``, ``KeyboardInterrupt``) leaves fast weights, history, optimizer state and
  parameter groups as they were; the next good step equals a run that never failed.
* Memory: nothing of an inner loop outlives it, with the cyclic garbage collector off so that
  reference cycles show; live tensors stay flat over many meta-steps.
* Saving: an adapted model's ``state_dict`` loads into a fresh instance of the module's class;
  ``copy.deepcopy`` of a patched module or optimizer is refused with a ``TypeError`` that
  says what to do instead, and leaves it working.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import threading
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    RECURRENT,
    ZOO,
    assert_module_unchanged,
    assert_same_objects,
    assert_trees_close,
    perturbed_params,
    scalar_loss,
    snapshot,
    state_tensors,
    tensors_in,
    with_params,
)

import higher_func as higher
from higher_func._rules import OPTIMIZERS

# How long a deliberately paused call waits for the other thread before giving up. A correct
# lock makes the other thread wait, so every such test spends this long once.
PAUSE_S = 0.3


def _history(fmodel) -> list[list[torch.Tensor]]:
    """Every recorded step's fast weights, read through the public ``parameters(time=k)``."""
    steps = []
    while True:
        try:
            steps.append(list(fmodel.parameters(time=len(steps))))
        except ValueError:
            return steps


def _run_threads(targets) -> None:
    """Run each target in its own thread, all starting together; re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def run(target):
        try:
            barrier.wait()
            target()
        except BaseException as error:  # noqa: B036 - reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------

THREADS = 4
CALLS = 40
INNER_STEPS = 3


@pytest.mark.parametrize("name", ["mlp", "conv_bn", "lstm"])
def test_threads_with_their_own_views_of_one_module(name, fast_thread_switching):
    case = ZOO[name]()
    model, inputs = case.model, case.inputs
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reference = list(model.parameters())
    weights = [perturbed_params(model, seed=10 + t, scale=0.5) for t in range(THREADS)]

    # What each thread must see, computed one thread at a time: the plain module with that
    # thread's weights loaded, and that thread's weights after a few steps.
    expected_out = [with_params(model, w)(*inputs).detach() for w in weights]
    expected_adapted = []
    for w in weights:
        fmodel = higher.monkeypatch(model, copy_initial_weights=True)
        fmodel.update_params(w)
        diffopt = higher.get_diff_optim(opt, reference, fmodel=fmodel)
        for _ in range(INNER_STEPS):
            diffopt.step(scalar_loss(fmodel(*inputs)))
        expected_adapted.append([p.detach() for p in fmodel.parameters()])

    # The views and optimizers are built before the threads start: building one while
    # another thread is inside a call is the subject of a test of its own below.
    views = []
    for w in weights:
        fmodel = higher.monkeypatch(model, copy_initial_weights=True)
        fmodel.update_params(w)
        views.append((fmodel, higher.get_diff_optim(opt, reference, fmodel=fmodel)))
    wrong_outputs = [0] * THREADS
    adapted: list = [None] * THREADS

    def work(t):
        fmodel, diffopt = views[t]
        for _ in range(CALLS):
            out = fmodel(*inputs)
            if not torch.allclose(out, expected_out[t], rtol=0, atol=1e-12):
                wrong_outputs[t] += 1
        for _ in range(INNER_STEPS):
            diffopt.step(scalar_loss(fmodel(*inputs)))
            fmodel(*inputs)  # more calls between the steps
        adapted[t] = [p.detach() for p in fmodel.parameters()]

    _run_threads([lambda t=t: work(t) for t in range(THREADS)])

    assert wrong_outputs == [0] * THREADS, "a thread saw another thread's weights"
    for got, expected in zip(adapted, expected_adapted):
        assert_trees_close(got, expected, atol=1e-12, rtol=0)
    assert_module_unchanged(model, before)


class Checkpoint(nn.Module):
    """An identity layer that calls ``self.gate.hook`` if set: a place to pause a forward.

    The hook lives in an object the layer shares with every patched copy of it, so a test can
    set it after patching: in a function's closure (code, which patches share), not in an
    attribute (the module's state, of which each patch owns a copy)."""

    def __init__(self) -> None:
        super().__init__()
        gate = types.SimpleNamespace(hook=None)
        self.gate = lambda: gate

    @property
    def hook(self):
        return self.gate().hook

    @hook.setter
    def hook(self, value):
        self.gate().hook = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate().hook is not None:
            self.gate().hook()
        return x


def _gated_model() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(Checkpoint(), nn.Linear(3, 2)).double()


def _weights(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, 3, generator=generator, dtype=torch.float64),
        torch.randn(2, generator=generator, dtype=torch.float64),
    ]


def _worst_interleaving(call_a, call_b, pause_points):
    """Run ``call_a`` and ``call_b`` in two threads in the worst order for a missing lock.

    Each call pauses at the first of ``pause_points`` (functions installing a hook) it meets:
    A, inside its call, waits until B is inside its own call too; B then waits until A has
    returned. Without a lock, A finishes while B's tensors are lent. With a lock held across
    each call, B cannot get in while A is inside, A's wait times out after ``PAUSE_S`` and the
    two calls run one after the other. Returns ``(out_a, out_b)``.
    """
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    roles: dict[int, str] = {}
    paused: set[str] = set()

    def checkpoint(*_args):
        role = roles.get(threading.get_ident())
        if role is None or role in paused:
            return
        paused.add(role)
        if role == "a":
            a_inside.set()
            b_inside.wait(PAUSE_S)
        else:
            b_inside.set()
            a_done.wait(PAUSE_S)

    removers = [install(checkpoint) for install in pause_points]
    results: dict[str, object] = {}

    def run(role, call):
        roles[threading.get_ident()] = role
        try:
            if role == "b":
                a_inside.wait(5)
            results[role] = call()
        except BaseException as error:  # noqa: B036 - reported in the main thread
            results[role] = error
        finally:
            if role == "a":
                a_done.set()

    threads = [threading.Thread(target=run, args=rc) for rc in (("a", call_a), ("b", call_b))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for remove in removers:
            remove()
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    return results["a"], results["b"]


def _pause_at(checkpoint: Checkpoint):
    def install(hook):
        checkpoint.hook = hook
        return lambda: setattr(checkpoint, "hook", None)

    return install


def _pause_before(module: nn.Module):
    def install(hook):
        return module.register_forward_pre_hook(lambda *_: hook()).remove

    return install


def test_two_views_of_one_module_never_see_each_others_weights():
    model = _gated_model()
    before = snapshot(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    wa, wb = _weights(1), _weights(2)
    fa = higher.monkeypatch(model)
    fa.update_params(wa)
    fb = higher.monkeypatch(model)
    fb.update_params(wb)

    out_a, out_b = _worst_interleaving(lambda: fa(x), lambda: fb(x), [_pause_at(model[0])])

    torch.testing.assert_close(out_a, F.linear(x, *wa))
    torch.testing.assert_close(out_b, F.linear(x, *wb))
    assert_module_unchanged(model, before)


def test_the_interleaving_breaks_bare_functional_call():
    # The control for the test above: the same forced interleaving with
    # torch.func.functional_call, which lends weights into the user's module, does go wrong,
    # so the interleaving really exercises the hazard that patched modules avoid by never
    # writing into the module.
    model = _gated_model()
    originals = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3, dtype=torch.float64)
    wa, wb = _weights(1), _weights(2)

    def call(w):
        return torch.func.functional_call(model, {"1.weight": w[0], "1.bias": w[1]}, (x,))

    out_a, out_b = _worst_interleaving(lambda: call(wa), lambda: call(wb), [_pause_at(model[0])])
    # A runs its layer while B's weights are lent; B, entering after A lent its own, restores
    # A's weights on exit, and ran on them.
    assert not torch.allclose(out_a, F.linear(x, *wa))
    assert torch.allclose(out_a, F.linear(x, *wb))
    assert not torch.allclose(out_b, F.linear(x, *wb))
    assert not all(torch.equal(p, o) for p, o in zip(model.parameters(), originals))


def test_a_module_and_its_submodule_patched_in_two_threads():
    # Two patched modules share slots when one wraps a submodule of the other (or two models
    # share an encoder): the lending of one must exclude the lending of the other.
    model = _gated_model()
    before = snapshot(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    wa, wb = _weights(1), _weights(2)
    froot = higher.monkeypatch(model)
    froot.update_params(wa)
    fsub = higher.monkeypatch(model[1])
    fsub.update_params(wb)

    out_a, out_b = _worst_interleaving(
        lambda: froot(x), lambda: fsub(x), [_pause_at(model[0]), _pause_before(model[1])]
    )

    torch.testing.assert_close(out_a, F.linear(x, *wa), msg="root view saw other weights")
    torch.testing.assert_close(out_b, F.linear(x, *wb), msg="submodule view saw other weights")
    assert_module_unchanged(model, before)


@contextlib.contextmanager
def _while_another_thread_is_inside(checkpoint: Checkpoint, call):
    """Run ``call`` in another thread, paused inside (its tensors lent), around the body."""
    inside, release = threading.Event(), threading.Event()
    owner: dict[str, int] = {}
    result: dict[str, object] = {}

    def hook():
        if threading.get_ident() == owner.get("id"):
            inside.set()
            release.wait(PAUSE_S)

    def run():
        owner["id"] = threading.get_ident()
        try:
            result["out"] = call()
        except BaseException as error:  # noqa: B036 - reported in the main thread
            result["error"] = error

    checkpoint.hook = hook
    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert inside.wait(5), "the other thread never got inside its call"
        yield result
    finally:
        release.set()
        thread.join()
        checkpoint.hook = None
    if "error" in result:
        raise result["error"]


@pytest.mark.parametrize("how", ["monkeypatch", "innerloop_ctx"])
def test_patching_while_another_thread_is_inside_a_call(how):
    model = _gated_model()
    before = snapshot(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    busy = higher.monkeypatch(model)
    busy.update_params(_weights(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_while_another_thread_is_inside(model[0], lambda: busy(x)))
        if how == "monkeypatch":
            fmodel = higher.monkeypatch(model, copy_initial_weights=False)
        else:
            fmodel, _ = stack.enter_context(
                higher.innerloop_ctx(model, opt, copy_initial_weights=False)
            )
        initial = [p.detach().clone() for p in fmodel.parameters()]

    # The new view starts from the module's own weights, not from the other thread's.
    for got, own in zip(initial, model.parameters()):
        assert torch.equal(got, own.detach()), "initial fast weights are another thread's"
    torch.testing.assert_close(fmodel(x), model(x))
    assert_module_unchanged(model, before)


def test_state_dict_while_another_thread_is_inside_a_call():
    model = _gated_model()
    x = torch.randn(4, 3, dtype=torch.float64)
    mine, theirs = _weights(1), _weights(2)
    fmodel = higher.monkeypatch(model)
    fmodel.update_params(mine)
    busy = higher.monkeypatch(model)
    busy.update_params(theirs)

    with _while_another_thread_is_inside(model[0], lambda: busy(x)):
        state = fmodel.state_dict()

    assert torch.equal(state["1.weight"], mine[0]), "state_dict holds another thread's weights"
    assert torch.equal(state["1.bias"], mine[1]), "state_dict holds another thread's weights"


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


class Faulty(nn.Module):
    """Raises in forward, after its first layer ran, while ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, 2)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        if self.fail:
            raise RuntimeError("injected fault in forward")
        return self.head(hidden)


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("injected fault in backward")


class _Interrupting(torch.Tensor):
    """A tensor whose every operation raises KeyboardInterrupt (a Ctrl-C mid-update)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise KeyboardInterrupt


def _interrupt_last(grads):
    grads = list(grads)
    grads[-1] = torch.Tensor._make_subclass(_Interrupting, grads[-1].detach())
    return grads


def _raise_in_callback(grads):
    raise ValueError("injected fault in grad_callback")


def _raise_interrupt(*_args):
    raise KeyboardInterrupt


def _faulty_setup(num_tasks):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = Faulty().double()
    # Two groups and a stateful optimizer: a rollback must restore both.
    opt = torch.optim.Adam(
        [{"params": model.body.parameters()}, {"params": model.head.parameters(), "lr": 0.05}],
        lr=0.1,
    )
    lead = () if num_tasks is None else (num_tasks,)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(*lead, 6, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(*lead, 6, 2, generator=generator, dtype=torch.float64)
    return model, opt, x, y


def _loss(out, y, num_tasks):
    if num_tasks is None:
        return (out - y).pow(2).mean()
    return torch.vmap(lambda o, t: (o - t).pow(2).mean())(out, y)


FAULTS = [
    "forward",
    "loss",
    "backward",
    "grad_callback",
    "override_of_wrong_type",
    "override_on_wrong_device",
    "keyboard_interrupt_in_forward_hook",
    "keyboard_interrupt_in_backward_hook",
    "keyboard_interrupt_in_update",
]


def _faulty_step(fault, model, fmodel, diffopt, x, y, num_tasks):
    """One step that must raise because of ``fault``."""
    loss = _loss
    if fault == "forward":
        fmodel.fail = True  # set on the patch's copy, where its forward reads it
        try:
            with pytest.raises(RuntimeError, match="injected"):
                diffopt.step(loss(fmodel(x), y, num_tasks))
        finally:
            fmodel.fail = False
    elif fault == "loss":
        with pytest.raises(RuntimeError):
            diffopt.step(loss(fmodel(x), y[..., :1, :1].expand(*y.shape[:-2], 5, 2), num_tasks))
    elif fault == "backward":
        with pytest.raises((ValueError, RuntimeError), match="injected"):
            diffopt.step(loss(_FailInBackward.apply(fmodel(x)), y, num_tasks))
    elif fault == "grad_callback":
        with pytest.raises(ValueError, match="injected"):
            diffopt.step(loss(fmodel(x), y, num_tasks), grad_callback=_raise_in_callback)
    elif fault == "override_of_wrong_type":
        with pytest.raises(TypeError, match="lr"):
            diffopt.step(loss(fmodel(x), y, num_tasks), override={"lr": [0.1, "0.05"]})
    elif fault == "override_on_wrong_device":
        # Passes validation; the second group's update raises after the first one's ran.
        meta_lr = torch.tensor(0.05, dtype=torch.float64, device="meta")
        with pytest.raises(RuntimeError):
            diffopt.step(loss(fmodel(x), y, num_tasks), override={"lr": [0.1, meta_lr]})
    elif fault == "keyboard_interrupt_in_forward_hook":
        handle = fmodel.head.register_forward_hook(_raise_interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                diffopt.step(loss(fmodel(x), y, num_tasks))
        finally:
            handle.remove()
    elif fault == "keyboard_interrupt_in_backward_hook":
        out = fmodel(x)
        out.register_hook(_raise_interrupt)
        with pytest.raises(KeyboardInterrupt):
            diffopt.step(loss(out, y, num_tasks))
    elif fault == "keyboard_interrupt_in_update":
        with pytest.raises(KeyboardInterrupt):
            diffopt.step(loss(fmodel(x), y, num_tasks), grad_callback=_interrupt_last)
    else:
        raise AssertionError(fault)


def _vmap_level_open() -> bool:
    functorch = torch._C._functorch
    if hasattr(functorch, "maybe_current_level"):
        return functorch.maybe_current_level() is not None
    try:  # torch 2.0: no maybe_current_level, and current_level fails when no level is open
        functorch.current_level()
    except RuntimeError:
        return False
    return True


def _optimizer_record(diffopt):
    groups = [dict(group, params=list(group["params"])) for group in diffopt.param_groups]
    state = [{i: dict(s) for i, s in states.items() if s} for states in diffopt.state]
    return groups, state


@pytest.mark.parametrize("num_tasks", [None, 2], ids=["single", "batched"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_step_that_raises_changes_nothing(fault, num_tasks):
    model, opt, x, y = _faulty_setup(num_tasks)
    twin, twin_opt, _, _ = _faulty_setup(num_tasks)
    before = snapshot(model)
    kwargs = dict(copy_initial_weights=False, num_tasks=num_tasks)
    with (
        higher.innerloop_ctx(model, opt, **kwargs) as (fmodel, diffopt),
        higher.innerloop_ctx(twin, twin_opt, **kwargs) as (ftwin, twinopt),
    ):
        diffopt.step(_loss(fmodel(x), y, num_tasks))
        twinopt.step(_loss(ftwin(x), y, num_tasks))
        history = _history(fmodel)
        record = _optimizer_record(diffopt)

        _faulty_step(fault, model, fmodel, diffopt, x, y, num_tasks)

        assert_same_objects(_history(fmodel), history, "fast weight history")
        assert_same_objects(_optimizer_record(diffopt), record, "optimizer groups and state")
        assert_module_unchanged(model, before)
        assert not _vmap_level_open()

        # Still usable: the next step equals a run that never failed.
        diffopt.step(_loss(fmodel(x), y, num_tasks))
        twinopt.step(_loss(ftwin(x), y, num_tasks))
        assert_trees_close(list(fmodel.parameters()), list(ftwin.parameters()))
        assert len(_history(fmodel)) == len(_history(ftwin)) == 3
        _loss(fmodel(x), y, num_tasks).sum().backward()
        _loss(ftwin(x), y, num_tasks).sum().backward()
    assert_trees_close([p.grad for p in model.parameters()], [p.grad for p in twin.parameters()])


@pytest.mark.parametrize("name", ["lstm", "gru", "conv_bn"])
def test_a_forward_that_raises_restores_the_module(name):
    case = ZOO[name]()
    before = snapshot(case.model)
    fmodel = higher.monkeypatch(case.model)
    fmodel.update_params(perturbed_params(case.model))
    with pytest.raises(RuntimeError):
        fmodel(*case.bad_inputs)
    assert_module_unchanged(case.model, before)
    assert_trees_close(
        fmodel(*case.inputs), with_params(case.model, fmodel.fast_params)(*case.inputs)
    )


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_cycle_collection():
    """Only reference counting frees objects inside: a reference cycle keeps its members."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _maml_refs(case, opt_type, num_tasks=None, use_view=False):
    """One MAML inner loop; weak references to everything it made, taken inside it."""
    model, inputs = case.model, case.inputs
    if num_tasks is not None:
        inputs = tuple(torch.stack([x] * num_tasks) for x in inputs)
    opt = opt_type(model.parameters(), lr=0.01)

    def loss(out):
        return scalar_loss(out) if num_tasks is None else torch.vmap(scalar_loss)(out)

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=num_tasks) as (
        fmodel,
        diffopt,
    ):
        for _ in range(3):
            diffopt.step(loss(fmodel(*inputs)))
        if use_view:
            fmodel.encoder(*inputs)
        refs = [weakref.ref(p) for step in _history(fmodel) for p in step]
        refs += [weakref.ref(t) for t in state_tensors(diffopt)]
        refs += [weakref.ref(b) for b in fmodel.buffers()]
        out = fmodel(*inputs)
        refs += [weakref.ref(t) for t in tensors_in(out)]
        loss(out).sum().backward()
        del out
    del fmodel, diffopt
    return refs


@pytest.mark.filterwarnings("ignore::higher_func.BatchingFallbackWarning")
@pytest.mark.parametrize("num_tasks", [None, 2], ids=["single", "batched"])
@pytest.mark.parametrize("name", ["mlp", "conv_bn", "lstm", "tied"])
def test_nothing_of_an_inner_loop_outlives_it(name, num_tasks):
    case = ZOO[name]()
    with _no_cycle_collection():
        refs = _maml_refs(case, torch.optim.Adam, num_tasks)
        alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} tensors of the inner loop are still alive"


def test_nothing_outlives_an_inner_loop_that_called_a_submodule():
    case = ZOO["encoder_embed"]()
    with _no_cycle_collection():
        refs = _maml_refs(case, torch.optim.SGD, use_view=True)
        alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} tensors of the inner loop are still alive"


@pytest.mark.parametrize("opt_type", list(OPTIMIZERS), ids=lambda t: t.__name__)
def test_no_tensor_hooks_on_fast_weights_or_state(opt_type):
    case = ZOO["frozen"]()
    opt = opt_type(case.model.parameters(), lr=0.01)
    with higher.innerloop_ctx(case.model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
        for step in _history(fmodel):
            for p in step:
                assert not p._backward_hooks, "a tensor hook is registered on a fast weight"
        for t in state_tensors(diffopt):
            assert not t._backward_hooks, "a tensor hook is registered on an optimizer state"


@pytest.mark.parametrize("name", RECURRENT[:3])
def test_recurrent_flat_weights_hold_the_modules_own_parameters(name):
    case = ZOO[name]()
    rnns = [m for m in case.model.modules() if isinstance(m, nn.RNNBase)]
    opt = torch.optim.SGD(case.model.parameters(), lr=0.01)
    with higher.innerloop_ctx(case.model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
        with pytest.raises(RuntimeError):
            fmodel(*case.bad_inputs)
    for rnn in rnns:
        own = dict(rnn.named_parameters(recurse=False))
        for weight_name, weight in zip(rnn._flat_weights_names, rnn._flat_weights):
            assert weight is own[weight_name], f"_flat_weights[{weight_name}] is not the Parameter"
            assert isinstance(weight, nn.Parameter)


def _live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): isinstance reads __class__, which some lazy modules warn on.
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


@contextlib.contextmanager
def _older_objects_frozen():
    """Move every object alive now out of the collector's sight: counts and collections then
    see only what is made afterwards, however large the test session's heap has grown."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_live_tensors_stay_flat_over_many_meta_steps():
    case = ZOO["conv_bn"](dtype=torch.float32)
    model, inputs = case.model, case.inputs
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def meta_step():
        meta_opt.zero_grad()
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (f, d):
            for _ in range(2):
                d.step(scalar_loss(f(*inputs)))
            scalar_loss(f(*inputs)).backward()
        meta_opt.step()

    for _ in range(3):
        meta_step()
    with _older_objects_frozen():
        meta_step()
        start = _live_tensors()
        for _ in range(200):
            meta_step()
        assert _live_tensors() == start


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam, torch.optim.ASGD])
def test_not_tracking_keeps_memory_flat_in_the_number_of_steps(opt_type):
    case = ZOO["mlp"]()
    opt = opt_type(case.model.parameters(), lr=0.01)
    with higher.innerloop_ctx(
        case.model, opt, copy_initial_weights=False, track_higher_grads=False
    ) as (fmodel, diffopt):
        for _ in range(10):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
        with _older_objects_frozen():
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
            start = _live_tensors()
            for _ in range(100):
                diffopt.step(scalar_loss(fmodel(*case.inputs)))
            assert _live_tensors() == start
        assert len(_history(fmodel)) == 1
        assert all(p.grad_fn is None for p in fmodel.parameters()), "fast weights hold a graph"
        assert all(t.grad_fn is None for t in state_tensors(diffopt)), "state holds a graph"
        # The optimizer's own view of the weights must not hold on to a graph either.
        for group in diffopt.param_groups:
            assert all(p.grad_fn is None for p in group["params"]), "param_groups hold a graph"


# ---------------------------------------------------------------------------------------------
# Saving adapted models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mlp", "conv_bn", "lstm", "tied", "weight_norm", "none_bias", "containers"]
)
def test_adapted_state_dict_loads_into_a_fresh_instance(name):
    case = ZOO[name]()
    opt = torch.optim.Adam(case.model.parameters(), lr=0.05)
    with higher.innerloop_ctx(case.model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(scalar_loss(fmodel(*case.inputs)))
        state = fmodel.state_dict()
        assert all(not t.requires_grad for t in state.values())
        fresh = ZOO[name]().model
        fresh.eval()
        fmodel.eval()
        with torch.no_grad():
            assert not torch.allclose(
                tensors_in(fresh(*case.inputs))[0], tensors_in(fmodel(*case.inputs))[0]
            )
        fresh.load_state_dict(state, strict=True)
        assert_trees_close(fresh(*case.inputs), fmodel(*case.inputs))


@pytest.mark.parametrize("track", [True, False], ids=["tracking", "not_tracking"])
def test_deepcopy_of_a_patched_module_is_refused_and_changes_nothing(track):
    # Its fast weights are part of an autograd graph that a copy could not share: refused,
    # with a message naming what to do, and the patched module works on as before.
    case = ZOO["mlp"]()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    with higher.innerloop_ctx(case.model, opt, track_higher_grads=track) as (fmodel, diffopt):
        diffopt.step(scalar_loss(fmodel(*case.inputs)))
        expected = [p.detach().clone() for p in fmodel.parameters()]
        with pytest.raises(TypeError, match=r"deepcopy of a patched module is not supported"):
            copy.deepcopy(fmodel)
        assert_trees_close(list(fmodel.parameters()), expected)
        assert_trees_close(fmodel(*case.inputs), with_params(case.model, expected)(*case.inputs))
        diffopt.step(scalar_loss(fmodel(*case.inputs)))


@pytest.mark.parametrize("track", [True, False], ids=["tracking", "not_tracking"])
def test_deepcopy_of_a_differentiable_optimizer_is_refused_and_changes_nothing(track):
    case = ZOO["mlp"]()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9)
    with higher.innerloop_ctx(case.model, opt, track_higher_grads=track) as (fmodel, diffopt):
        diffopt.step(scalar_loss(fmodel(*case.inputs)))
        momentum = [t.detach().clone() for t in state_tensors(diffopt)]
        with pytest.raises(TypeError, match=r"deepcopy of a differentiable optimizer.*state_dict"):
            copy.deepcopy(diffopt)
        assert_trees_close(state_tensors(diffopt), momentum)
        diffopt.step(scalar_loss(fmodel(*case.inputs)))
