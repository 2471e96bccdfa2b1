"""higher 0.2.1's whole surface, diffed against installed higher: every name of its modules and
every attribute of its patched modules and differentiable optimizers exists here, except the
deliberate exceptions listed (with their reasons) in docs/porting.md, which this test reads.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import higher
import higher.optim
import higher.patch
import higher.utils
import pytest
import torch
from torch import nn
from zoo import ZOO, assert_trees_close

import higher_func
import higher_func.optim
import higher_func.patch
import higher_func.utils
from higher_func._rules import OPTIMIZERS

PORTING = Path(__file__).resolve().parent.parent / "docs" / "porting.md"
SECTION = "### Names of higher left out, and why"

MODULES = [
    ("higher", higher, higher_func),
    ("higher.patch", higher.patch, higher_func.patch),
    ("higher.optim", higher.optim, higher_func.optim),
    ("higher.utils", higher.utils, higher_func.utils),
]


def _exceptions() -> set[str]:
    """The names docs/porting.md lists as left out on purpose: ``higher.X.name``,
    ``fmodel.name`` (a patched module's attribute), ``diffopt.name`` (an optimizer's)."""
    text = PORTING.read_text()
    assert SECTION in text, f"docs/porting.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n#", 1)[0]
    pattern = r"`((?:higher(?:\.\w+)?|fmodel|diffopt)\._\w*)`"
    return set(re.findall(pattern, section))


EXCEPTIONS = _exceptions()


# Made by Python at run time, not by higher: a module that has warned has a registry.
RUNTIME_NAMES = {"__warningregistry__"}


def _missing(theirs: object, ours: object, prefix: str) -> set[str]:
    return {f"{prefix}.{n}" for n in set(dir(theirs)) - set(dir(ours)) - RUNTIME_NAMES}


def _patched_pair(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case, twin = ZOO[name](), ZOO[name]()
        return higher.monkeypatch(twin.model), higher_func.monkeypatch(case.model)


def test_the_exception_list_is_not_empty_and_names_only_real_names():
    assert EXCEPTIONS
    for name in EXCEPTIONS:
        kind, attr = name.rsplit(".", 1)
        if kind.startswith("higher"):
            module = dict((m, theirs) for m, theirs, _ in MODULES)[kind]
            assert hasattr(module, attr), f"{name} is not a name of higher 0.2.1"


@pytest.mark.parametrize("label, theirs, ours", MODULES, ids=[m[0] for m in MODULES])
def test_every_module_name_of_higher_exists(label, theirs, ours):
    missing = _missing(theirs, ours, label) - EXCEPTIONS
    assert not missing, f"names of {label} missing here (add them, or list them in porting.md)"
    # Each listed exception is really absent: the list in porting.md is the complete truth.
    present = {
        n for n in EXCEPTIONS if n.startswith(label + ".") and n.count(".") == label.count(".") + 1
    }
    assert not {n for n in present if n.rsplit(".", 1)[1] in dir(ours)}


@pytest.mark.parametrize("name", ["mlp", "tied", "lstm", "conv_bn"])
def test_every_attribute_of_a_patched_module_exists(name):
    theirs, ours = _patched_pair(name)
    missing = _missing(theirs, ours, "fmodel") - EXCEPTIONS
    assert not missing
    listed = {n.split(".", 1)[1] for n in EXCEPTIONS if n.startswith("fmodel.")}
    assert not listed & set(dir(ours))


@pytest.mark.filterwarnings("ignore:Differentiable R:UserWarning")
@pytest.mark.parametrize("opt_type", list(higher.optim._opt_mapping), ids=lambda t: t.__name__)
def test_every_attribute_of_a_differentiable_optimizer_exists(opt_type):
    model = nn.Linear(3, 2)
    opt = opt_type(model.parameters(), lr=0.1)
    theirs = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=higher.monkeypatch(model))
    fmodel = higher_func.monkeypatch(model)
    ours = higher_func.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    assert not _missing(theirs, ours, "diffopt") - EXCEPTIONS
    # The instance attributes that subclasses replacing step() read, with higher's types.
    for attr in set(vars(theirs)) - {"_fmodel"}:
        assert type(getattr(ours, attr)) is type(getattr(theirs, attr)), attr
    assert ours._fmodel is fmodel and isinstance(ours._fmodel, nn.Linear)
    assert ours._group_to_param_list == theirs._group_to_param_list
    assert [len(g["params"]) for g in ours.param_groups] == [
        len(g["params"]) for g in theirs.param_groups
    ]


@pytest.mark.parametrize("name", ["mlp", "tied", "lstm", "conv_bn"])
def test_patched_module_attributes_have_highers_values(name):
    theirs, ours = _patched_pair(name)
    for attr in ("_param_mapping", "_param_names", "_wrapped_name", "is_root"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    for attr in ("direct_submodule_call", "_being_modified_internally", "_root_ref"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.root is ours and theirs.root is theirs
    assert [p.shape for p in ours._original_params] == [p.shape for p in theirs._original_params]
    expanded = ours._expand_params(ours.fast_params)
    expected = theirs._expand_params(theirs.fast_params)
    assert [p.shape for p in expanded] == [p.shape for p in expected]
    index = {id(p): i for i, p in enumerate(ours.fast_params)}
    assert [index[id(p)] for p in expanded] == ours._param_mapping
    inputs = ZOO[name]().inputs
    assert_trees_close(ours.boxed_forward(*inputs), ours(*inputs), atol=0, rtol=0)


def test_an_attribute_of_the_module_wins_over_highers_of_the_same_name():
    class Tree(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.root = "the tree's root"
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x)

    assert higher_func.monkeypatch(Tree()).root == "the tree's root"


def test_refill_params_box_and_private_patch_helpers():
    model = nn.Linear(2, 2)
    fmodel = higher_func.patch.make_functional(model)
    with pytest.raises(ValueError, match="no fast weights"):
        fmodel._refill_params_box(None)
    params = [p.detach().clone() for p in model.parameters()]
    fmodel._refill_params_box(params)
    assert all(a is b for a, b in zip(fmodel.fast_params, params))
    assert list(higher_func.patch._patched_parameters(fmodel)) == list(fmodel.parameters())
    with higher_func.patch._modify_internally(fmodel):
        pass
    assert repr(higher_func.patch._ParameterPlaceholder("w")) == repr(
        higher.patch._ParameterPlaceholder("w")
    )
    for helper in (higher_func.patch._make_functional, higher_func.patch._update_patched_params):
        with pytest.raises(NotImplementedError, match="update_params|make_functional"):
            helper(model, [None], 0)


def test_internal_attrs_has_highers_contents():
    assert higher_func.patch._internal_attrs == higher.patch._internal_attrs
    assert higher_func.patch._BufferType == higher.patch._BufferType


TENSORS = [torch.ones(2, requires_grad=True), torch.arange(3.0)]


@pytest.mark.parametrize("safe_copy", [True, False])
def test_private_utils_helpers_match_highers(safe_copy):
    for t in TENSORS:
        ours, theirs = (
            higher_func.utils._copy_tensor(t, safe_copy),
            higher.utils._copy_tensor(t, safe_copy),
        )
        assert torch.equal(ours, theirs) and ours.requires_grad == theirs.requires_grad
        assert (ours.data_ptr() == t.data_ptr()) == (theirs.data_ptr() == t.data_ptr())
    nested = {"a": [TENSORS[0], (TENSORS[1], 3)], "b": {4}}
    ours = higher_func.utils._recursive_copy_and_cast(nested, None)
    theirs = higher.utils._recursive_copy_and_cast(nested, None)
    assert ours["b"] == theirs["b"] and ours["a"][1][1] == 3
    assert torch.equal(ours["a"][0], theirs["a"][0]) and ours["a"][0] is not TENSORS[0]
    for value in ([], (), {}, set(), 1, "s", torch.zeros(1)):
        assert higher_func.utils._is_container(value) == higher.utils._is_container(value)
    a, b = torch.zeros(1), torch.zeros(1)
    for needle in (a, b, torch.zeros(1)):
        assert higher_func.utils._find_param_in_list(
            needle, [a, b]
        ) == higher.utils._find_param_in_list(needle, [a, b])


@pytest.mark.parametrize("name", ["mlp", "tied", "containers", "frozen"])
def test_param_mapping_matches_highers(name):
    model = ZOO[name]().model
    assert higher_func.utils._get_param_mapping(model, [], []) == higher.utils._get_param_mapping(
        model, [], []
    )


@pytest.mark.parametrize(
    "replacement, target",
    [
        (torch.tensor(0.7), 1),
        (torch.tensor(0.7), 0.5),
        ((torch.tensor(0.2), torch.tensor(0.3)), (0.9, 0.99)),
        ([torch.tensor(2.0)], [1.0]),
        ({"x": torch.tensor(2.0)}, {"y": 1.0}),
    ],
)
def test_recursive_apply_matches_highers(replacement, target):
    ours = higher_func.optim._recursive_apply(replacement, target)
    assert ours == higher.optim._recursive_apply(replacement, target)
    assert type(ours) is type(target)


def test_recursive_apply_writes_a_tensor_into_a_tensor_and_refuses_mismatches():
    target = torch.zeros(2)
    assert higher_func.optim._recursive_apply(torch.ones(2), target) is target
    assert torch.equal(target, torch.ones(2))
    for replacement, target in [(1.0, 2), ("a", 1.0)]:
        with pytest.raises(ValueError):
            higher_func.optim._recursive_apply(replacement, target)


def test_mask_hooks_zero_masked_gradients_as_highers():
    for lib in (higher.optim, higher_func.optim):
        x = torch.tensor([0.0, 4.0], requires_grad=True)
        y = x * 1.0
        lib._maybe_mask(y, y == 0)
        (grad,) = torch.autograd.grad(y.sqrt().sum(), x)
        assert torch.equal(grad, torch.tensor([0.0, 0.25]))


def test_the_differentiable_classes_are_the_registrys():
    # One static class per registry entry (IDEs and the API reference see them), each running
    # its entry's rule, and no class without an entry.
    source = inspect.getsource(higher_func.optim)
    for opt_type, rule in OPTIMIZERS.items():
        name = f"Differentiable{opt_type.__name__}"
        cls = getattr(higher_func.optim, name)
        assert cls.rule is rule and higher_func.optim._opt_mapping[opt_type] is cls
        assert f"class {name}(DifferentiableOptimizer):" in source
        assert name in higher_func.optim.__all__
    defined = {
        n
        for n in vars(higher_func.optim)
        if n.startswith("Differentiable") and n != "DifferentiableOptimizer"
    }
    assert defined == {f"Differentiable{t.__name__}" for t in OPTIMIZERS}
