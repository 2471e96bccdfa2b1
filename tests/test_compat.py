"""Canaries for higher_func._compat: each private torch name or version shim the library relies
on still does what the library needs, on the installed torch. A torch release that moves one
fails here, by name, before it fails somewhere inside a meta-step."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import higher_func
from higher_func import _compat

# ---------------------------------------------------------------------------------------------
# Supported torch and Python versions (issue 22, item 1): the shims for torch 2.0 to the newest.
# ---------------------------------------------------------------------------------------------


def test_pytree_has_what_the_library_calls():
    tree = {"a": (torch.zeros(1), [torch.ones(2), 1.5]), "b": 3}
    leaves = _compat.pytree.tree_leaves(tree)
    assert [type(x) for x in leaves] == [torch.Tensor, torch.Tensor, float, int]
    flat, spec = _compat.pytree.tree_flatten(tree)
    assert _compat.pytree.tree_unflatten(flat, spec)["b"] == 3
    doubled = _compat.pytree.tree_map(lambda x: x * 2, tree)
    assert torch.equal(doubled["a"][1][0], torch.full((2,), 2.0)) and doubled["b"] == 6
    summed = _compat.pytree.tree_map(lambda x, y: x + y, tree, doubled)  # several trees
    assert summed["a"][1][1] == 4.5 and summed["b"] == 9
    with pytest.raises(ValueError):
        _compat.pytree.tree_map(lambda x, y: x + y, tree, {"a": 1, "b": 2})


def test_is_compiling_is_false_in_eager_code():
    assert _compat.is_compiling() is False


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_autocast_enabled_follows_autocast(device_type):
    assert _compat.autocast_enabled(device_type) is False
    if device_type == "cuda" and not torch.cuda.is_available():
        return
    dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
    with torch.autocast(device_type, dtype=dtype):
        assert _compat.autocast_enabled(device_type) is True
    assert _compat.autocast_enabled(device_type) is False


def test_attention_fastpath_off_skips_the_fused_kernel_and_restores_it():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        fast = layer(x)
    # A weight requiring grad under no_grad: torch would take the fused kernel; with the
    # fast path off it computes the general path, with the same values.
    with torch.no_grad(), _compat.attention_fastpath_off():
        general = layer(x)
    torch.testing.assert_close(general, fast)
    calls = []
    original = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
        with torch.no_grad():
            layer(x)
        assert calls == [1]  # the fused kernel, outside the context
        with torch.no_grad(), _compat.attention_fastpath_off():
            layer(x)
        assert calls == [1]  # not inside it
        with torch.no_grad():
            layer(x)
        assert calls == [1, 1]  # and again after it


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_inside_checkpoint_sees_both_kinds_of_checkpointing(use_reentrant):
    seen = []

    def forward(x):
        seen.append(_compat.inside_checkpoint())
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    assert _compat.inside_checkpoint() is False
    out = checkpoint(forward, x, use_reentrant=use_reentrant)
    assert seen == [True]
    out.sum().backward()  # recomputes `forward`
    assert len(seen) == 2
    assert _compat.inside_checkpoint() is False


def test_compile_names_the_torch_it_needs():
    if _compat.can_trace_autograd():
        pytest.skip(f"torch {torch.__version__} compiles meta-steps")
    with pytest.raises(RuntimeError, match=f"needs torch >= {_compat.MIN_TORCH}") as info:
        higher_func.compile(lambda x: x)
    assert torch.__version__ in str(info.value)


def test_handle_extra_dicts_round_trip_and_remove_still_cleans_them():
    import collections
    import weakref

    from torch.utils.hooks import RemovableHandle

    # OrderedDicts, as modules keep their hooks in (a plain dict cannot be weakly referenced).
    hooks, extra, other = (collections.OrderedDict() for _ in range(3))
    handle = RemovableHandle(hooks, extra_dict=extra)
    hooks[handle.id] = extra[handle.id] = other[handle.id] = "hook"
    (ref,) = _compat.handle_extra_dicts(handle)
    assert ref() is extra
    _compat.set_handle_extra_dicts(handle, (weakref.ref(other),))
    handle.remove()
    assert not hooks and not other and extra  # the new extra dict is the one cleaned
    assert _compat.handle_extra_dicts(RemovableHandle(collections.OrderedDict())) == ()


def test_a_group_key_the_torch_optim_class_lacks_is_ignored_as_it_ignores_it():
    # As torch 2.0's NAdam ignores a `maximize` written into its groups (it has no such
    # option), so does the differentiable copy; simulated here by a class without it.
    class NoMaximize(torch.optim.SGD):
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)
            del self.defaults["maximize"]
            for group in self.param_groups:
                group["maximize"] = True  # written by hand, unknown to the class

    higher_func.optim.register_optim(NoMaximize, higher_func.optim.DifferentiableSGD)
    weight = torch.ones(2, requires_grad=True)
    opt = NoMaximize([weight], lr=0.1)
    diffopt = higher_func.optim.get_diff_optim(opt, [weight])
    (new,) = diffopt.step((weight**2).sum(), params=[weight])
    torch.testing.assert_close(new, weight - 0.1 * 2 * weight)  # minimised, not maximised
