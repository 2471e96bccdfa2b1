"""``higher_func.utils`` against ``higher.utils`` of higher 0.2.1: same names, same results."""

import higher.utils as theirs
import pytest
import torch
from zoo import ZOO

import higher_func.utils as ours

# What legacy code imports from higher.utils: its two public helpers and the private one that
# shows up in user code.
NAMES = ["flatten", "get_func_params", "_recursive_map"]

NESTED = [
    1,
    [],
    [1, [2, [3, [4]]]],
    (1, (2, 3), [4, {"a": 5, "b": (6,)}]),
    {"x": [1, 2], "y": {"z": (3, 4)}, "w": 5},
    {7},
    [torch.ones(2), (torch.zeros(1), {"t": torch.arange(3)})],
]


@pytest.mark.parametrize("name", NAMES)
def test_every_name_legacy_code_uses_exists(name):
    assert callable(getattr(ours, name))


def test_public_names_match():
    public = {n for n in vars(theirs) if not n.startswith("_") and callable(getattr(theirs, n))}
    assert set(ours.__all__) == {"flatten", "get_func_params"} <= public


@pytest.mark.parametrize("nested", NESTED, ids=range(len(NESTED)))
def test_flatten_agrees(nested):
    got, expected = ours.flatten(nested), theirs.flatten(nested)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a is b


@pytest.mark.parametrize("nested", NESTED, ids=range(len(NESTED)))
def test_recursive_map_agrees(nested):
    def double(x):
        return 2 * x

    got = ours._recursive_map(nested, double)
    expected = theirs._recursive_map(nested, double)
    assert type(got) is type(expected)
    assert repr(got) == repr(expected)


def test_recursive_map_takes_map_fn_by_keyword():
    assert ours._recursive_map([1, (2,)], map_fn=str) == theirs._recursive_map([1, (2,)], str)


@pytest.mark.parametrize("safe_copy", [True, False])
@pytest.mark.parametrize("name", ZOO)
def test_get_func_params_agrees(name, safe_copy):
    model = ZOO[name]().model
    got = ours.get_func_params(model, safe_copy=safe_copy)
    expected = theirs.get_func_params(model, safe_copy=safe_copy)
    assert len(got) == len(expected) == len(list(model.parameters()))
    for a, b, p in zip(got, expected, model.parameters()):
        assert torch.equal(a, b)
        assert a.is_leaf and b.is_leaf
        assert a.requires_grad == b.requires_grad == p.requires_grad
        assert a is not p
        # safe_copy=False shares storage with the parameter, as higher's does.
        assert (a.data_ptr() == p.data_ptr()) == (b.data_ptr() == p.data_ptr()) == (not safe_copy)


def test_get_func_params_moves_to_device():
    model = torch.nn.Linear(2, 2)
    got = ours.get_func_params(model, device=torch.device("cpu"))
    expected = theirs.get_func_params(model, device=torch.device("cpu"))
    assert [a.device for a in got] == [b.device for b in expected]
