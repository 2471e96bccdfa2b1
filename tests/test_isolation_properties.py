"""Property (issue 19): however a model's forward, hooks and attributes reach its submodules,
buffers and parameters, a patched module computes what ``torch.func.functional_call`` on the
model itself computes (outputs, and a second-order meta-gradient through two inner steps),
leaves everything reachable from the model unchanged, or refuses at patch time naming the
path of the reference it cannot re-point (a parameter held outside its module).

The strategy draws references as chains of wrappers around a target (a submodule, the root
module, a buffer or a parameter): containers of every standard kind, container keys,
namedtuples, dataclasses, ``SimpleNamespace``, closures, ``functools.partial``, bound methods
and weakrefs, nested; stored on the root, on a submodule, or in a hook's closure; and the
forward writes state (a counter, a list, a defaultdict, a random generator, a buffer in
place) as it goes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import types
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import oracle_check

import higher_func
from higher_func._graph import PatchRefused

Point = collections.namedtuple("Point", "value tag")


@dataclasses.dataclass
class Box:
    value: object
    calls: int = 0


def _identity(value):
    return value


def _value_of(self):
    return self.value


# Each shape: (wrap(target) -> reference, unwrap(reference) -> target).
OUTER = {
    "list": (lambda t: [t], lambda r: r[0]),
    "tuple": (lambda t: (t, 1), lambda r: r[0]),
    "dict": (lambda t: {"k": t}, lambda r: r["k"]),
    "ordered": (lambda t: collections.OrderedDict(k=t), lambda r: r["k"]),
    "defaultdict": (lambda t: collections.defaultdict(list, k=t), lambda r: r["k"]),
    "deque": (lambda t: collections.deque([t], maxlen=4), lambda r: r[0]),
    "namedtuple": (lambda t: Point(t, "x"), lambda r: r.value),
    "dataclass": (lambda t: Box(t), lambda r: r.value),
    "namespace": (lambda t: types.SimpleNamespace(value=t), lambda r: r.value),
    "closure": (lambda t: lambda: t, lambda r: r()),
    "partial": (lambda t: functools.partial(_identity, t), lambda r: r()),
    "bound": (lambda t: types.MethodType(_value_of, Box(t)), lambda r: r()),
}
# Only around the target itself: a key must be hashable, a weakref's referent weakref-able.
INNER = {
    **OUTER,
    "key": (lambda t: {t: 1.0}, lambda r: next(iter(r))),
    "weakref": (lambda t: weakref.ref(t), lambda r: r()),
}

references = st.tuples(
    st.sampled_from(["submodule", "root", "buffer", "parameter"]),
    st.sampled_from(sorted(INNER)),
    st.lists(st.sampled_from(sorted(OUTER)), max_size=2),
    st.sampled_from(["root", "submodule", "hook"]),
)


def _unwrap(reference, shapes):
    for name in reversed(shapes):
        reference = INNER[name][1](reference)
    return reference


def _use(target, kind, x):
    """What the forward adds for one reference (reading the fast weights through it)."""
    if kind == "submodule":
        return target(x)
    if kind == "root":
        return target.b.bias.sum() * x
    if kind == "buffer":
        target.mul_(0.5)  # a forward that writes state through the reference
        return target.clone() * x
    return x * target.sum()  # a parameter (refused at patch time)


class Generated(nn.Module):
    def __init__(self, uses) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, dtype=torch.float64)
        self.b = nn.Linear(3, 2, dtype=torch.float64)
        self.register_buffer("buf", torch.ones(3, dtype=torch.float64))
        self.log: list = []
        self.box = Box(None)
        self.counts: collections.defaultdict = collections.defaultdict(int)
        self.gen = torch.Generator().manual_seed(0)
        self.on_root, self.a.refs = [], []
        for kind, inner, outer, where in uses:
            target = {"submodule": self.a, "root": self, "buffer": self.buf}.get(kind)
            target = self.a.weight if target is None else target
            shapes = [inner, *outer]
            reference = target
            for name in shapes:
                reference = INNER[name][0](reference)
            use = (kind, reference, tuple(shapes))
            if where == "root":
                self.on_root.append(use)
            elif where == "submodule":
                self.a.refs.append(use)
            else:
                self.b.register_forward_hook(_hook(*use))

    def forward(self, x):
        self.log.append(len(self.log))
        self.box.calls += 1
        self.counts["calls"] += 1
        noise = torch.rand(x.shape, generator=self.gen, dtype=x.dtype)
        h = self.a(x + 1e-3 * noise)
        for kind, reference, shapes in [*self.on_root, *self.a.refs]:
            h = h + 0.1 * _use(_unwrap(reference, shapes), kind, x)
        return self.b(torch.tanh(h))


def _hook(kind, reference, shapes):
    def hook(module, args, output):
        return output * (1 + 0.1 * _use(_unwrap(reference, shapes), kind, args[0]).mean())

    return hook


@settings(max_examples=40, deadline=None)
@given(uses=st.lists(references, min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_every_reference_path_sees_the_fast_weights_or_is_refused(uses, seed):
    torch.manual_seed(seed)
    model = Generated(uses)
    if any(kind == "parameter" for kind, *_ in uses):
        with pytest.raises(PatchRefused, match=r"model\.(on_root|a\.refs|b\._forward_hooks)"):
            higher_func.monkeypatch(model)
        return
    oracle_check(model, torch.randn(4, 3, dtype=torch.float64))
