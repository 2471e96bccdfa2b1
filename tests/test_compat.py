"""Canaries for ``higher_func._compat``: every private torch name and matched torch message the
library relies on, checked against the installed torch. When a torch release renames, moves or
changes one of them, the test named after it fails here, before anything that uses it breaks in
a less legible way. Blocks are grouped by the area of the library that uses the names."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

import higher_func
from higher_func import _compat

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "higher_func"

# -- the whole package ------------------------------------------------------------------------

# A private torch name in code: ``torch._x`` / ``torch.y._x`` attribute paths, imports of an
# underscore name from torch, and ``sys._getframe``.
PRIVATE = re.compile(
    r"\btorch(?:\.[A-Za-z]\w*)*\._[A-Za-z]\w*|from torch[\w.]* import _|\bsys\._getframe"
)
# Modules whose private names other branches move into _compat (issues 19 and 20); once those
# are merged this set is empty.
NOT_MOVED_YET: set = set()


def test_no_private_torch_name_outside_compat():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_compat.py" or path.name in NOT_MOVED_YET:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "private torch names belong in higher_func/_compat.py:\n" + "\n".join(found)


# -- compile and update rules (_compile.py, _rules.py) ----------------------------------------


def test_dynamo_has_the_recurrent_module_switch():
    # higher_func.compile turns it on so that nn.RNN/GRU/LSTM trace.
    if not _compat.can_trace_autograd():
        pytest.skip(f"higher_func.compile does not run on torch {torch.__version__}")
    assert getattr(torch._dynamo.config, _compat.ALLOW_RNN) is False  # off unless asked for
    with _compat.tracing_rnns():
        assert getattr(torch._dynamo.config, _compat.ALLOW_RNN) is True
    assert getattr(torch._dynamo.config, _compat.ALLOW_RNN) is False


def test_dynamo_has_the_autograd_tracing_switch():
    if not _compat.can_trace_autograd():
        pytest.skip(f"torch {torch.__version__} is older than {_compat.MIN_TORCH}")
    with _compat.tracing_autograd():
        assert getattr(torch._dynamo.config, _compat.TRACE_AUTOGRAD_OPS) is True


def _lists():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 2)]
    return [
        [torch.rand(s, generator=generator, dtype=torch.float64) + 0.5 for s in shapes]
        for _ in range(3)
    ]


# Each multi-tensor op against the per-tensor op it stands for, with the argument forms the
# rules use (a scalar, a list of scalars, a list of tensors).
FOREACH = {
    "add scalar alpha": (
        lambda a, b, c: _compat.foreach_add(a, b, alpha=0.5),
        lambda a, b, c: a + 0.5 * b,
    ),
    "add scalar": (lambda a, b, c: _compat.foreach_add(a, 1e-8), lambda a, b, c: a + 1e-8),
    "add list": (lambda a, b, c: _compat.foreach_add(a, b), lambda a, b, c: a + b),
    "addcmul": (
        lambda a, b, c: _compat.foreach_addcmul(a, b, c, 0.1),
        lambda a, b, c: torch.addcmul(a, b, c, value=0.1),
    ),
    "div list": (lambda a, b, c: _compat.foreach_div(a, b), lambda a, b, c: a / b),
    "div scalars": (lambda a, b, c: _compat.foreach_div(a, [2.0, 4.0]), None),
    "lerp": (lambda a, b, c: _compat.foreach_lerp(a, b, 0.1), lambda a, b, c: a.lerp(b, 0.1)),
    "maximum": (lambda a, b, c: _compat.foreach_maximum(a, b), lambda a, b, c: a.maximum(b)),
    "mul scalar": (lambda a, b, c: _compat.foreach_mul(a, 0.9), lambda a, b, c: a * 0.9),
    "mul list": (lambda a, b, c: _compat.foreach_mul(a, b), lambda a, b, c: a * b),
    "neg": (lambda a, b, c: _compat.foreach_neg(a), lambda a, b, c: -a),
    "sqrt": (lambda a, b, c: _compat.foreach_sqrt(a), lambda a, b, c: a.sqrt()),
}


@pytest.mark.parametrize("name", FOREACH)
def test_multi_tensor_op_equals_the_per_tensor_op_and_is_differentiable(name):
    multi, single = FOREACH[name]
    a, b, c = _lists()
    for x in a:
        x.requires_grad_(True)
    got = list(multi(a, b, c))
    if single is None:  # a list of scalars, one per tensor
        expected = [x / s for x, s in zip(a, [2.0, 4.0])]
    else:
        expected = [single(x, y, z) for x, y, z in zip(a, b, c)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-15)
    # The rules differentiate through them (tracked steps with foreach=True) where torch can
    # (2.1 on). torch 2.0 differentiates only some (neg, sqrt): foreach_differentiable() says
    # not, tracked steps take the per-tensor path, and the rest must fail loudly, not wrongly.
    loss = sum(g.sum() for g in got)
    if not _compat.foreach_differentiable():
        try:
            torch.autograd.grad(loss, a, retain_graph=True)
        except RuntimeError as error:
            assert "derivative for aten::_foreach_" in str(error)
            return
    grads = torch.autograd.grad(loss, a)
    expected_grads = torch.autograd.grad(sum(e.sum() for e in expected), a)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-15)


def test_a_dropped_gradient_is_not_kept():
    leaf = torch.zeros((), requires_grad=True)
    _compat.drop_accumulated_grad(leaf)  # runs on every torch (higher_func.compile's import)
    if not hasattr(leaf, "register_post_accumulate_grad_hook"):
        pytest.skip(f"post-accumulate-grad hooks need torch >= 2.1, this is {torch.__version__}")
    (leaf * 3).backward()
    assert leaf.grad is None


# -- attention and embeddings (higher_func._attention, _embedding, _reroute; issue 22) --------


def test_sdpa_math_kernel_takes_sdpa_arguments():
    schema = str(_compat.sdpa_math.default._schema)
    for argument in ("attn_mask", "dropout_p", "is_causal", "dropout_mask"):
        assert argument in schema
    q = torch.randn(1, 1, 3, 2)
    out, weights = _compat.sdpa_math(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


def test_sdpa_options_and_the_vmap_rule_query():
    # scale= since torch 2.1, enable_gqa= since 2.5, read from the op's schema.
    names = {a.name for a in _compat.sdpa_math.default._schema.arguments}
    assert _compat.SDPA_OPTIONS == names & {"scale", "enable_gqa"}
    # The dispatch-key query answers; ops vmap batches itself (matmul) have a rule.
    assert _compat._vmap_has_rule(torch.ops.aten.mm.default)
    q = torch.randn(2, 1, 1, 3, 2)
    batched = torch.vmap(lambda t: _compat.sdpa_math_call(t, t, t)[0])(q)
    torch.testing.assert_close(batched, torch.stack([_compat.sdpa_math(t, t, t)[0] for t in q]))


def test_multi_head_attention_calls_sdpa_by_its_global_name():
    # _attention.multi_head_attention_forward rebinds that name in a copy of the function.
    assert "scaled_dot_product_attention" in F.multi_head_attention_forward.__code__.co_names


def test_torch_function_modes_see_sdpa_and_embedding_as_themselves():
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 1, 3, 2)
    with Record():
        F.scaled_dot_product_attention(q, q, q)
        F.embedding(torch.tensor([0, 1]), torch.randn(3, 2), padding_idx=0)
    assert F.scaled_dot_product_attention in seen and F.embedding in seen


def test_vmap_still_gives_other_tasks_padding_rows_a_gradient():
    # When this fails, torch fixed its vmap rule and higher_func._embedding can go.
    weight = torch.randn(2, 4, 3, requires_grad=True)
    ids = torch.tensor([[0, 1, 0], [0, 2, 0]])  # per task, as a batched patch's inputs are
    out = torch.vmap(lambda i, w: F.embedding(i, w, padding_idx=0))(ids, weight)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert torch.count_nonzero(grad[0, 0]) == 0 and torch.count_nonzero(grad[1, 0]) > 0


# -- issue 19: the patch's private copies (_tree, _graph, _tensors) ---------------------------


def test_lazy_clone_copies_on_write():
    original = torch.arange(6.0)
    clone = _compat.lazy_clone(original)
    assert torch.equal(clone, original)
    clone.add_(1)
    assert torch.equal(original, torch.arange(6.0))
    assert torch.equal(clone, torch.arange(6.0) + 1)
    # Copy-on-write from torch 2.3 (a plain clone before: right, only slower).
    if torch.__version__ >= "2.3":
        assert hasattr(torch, "_lazy_clone"), "torch._lazy_clone is gone: every patch copies"
        assert _compat.lazy_clone is torch._lazy_clone


def test_storage_key_identifies_the_memory_of_every_view():
    def key(tensor):
        return _compat.storage_key(tensor.untyped_storage())

    t = torch.zeros(4)
    assert key(t) == key(t[2:]) == key(t.view(2, 2))
    assert key(t) != key(t.clone())


def test_storage_key_does_not_materialize_a_lazy_clone():
    original = torch.zeros(1000)
    clone = _compat.lazy_clone(original)
    _compat.storage_key(clone.untyped_storage())
    _compat.storage_key(original.untyped_storage())
    clone.add_(1)  # only now is memory copied
    assert original.sum() == 0


def _seen_inside(use_reentrant):
    seen = []

    def fn(x):
        seen.append(_compat.inside_checkpoint())
        return x * 2

    x = torch.randn(3, requires_grad=True)
    checkpoint(fn, x, use_reentrant=use_reentrant).sum().backward()
    return seen


def test_inside_checkpoint_sees_both_kinds_of_checkpointing():
    assert not _compat.inside_checkpoint()
    assert _seen_inside(use_reentrant=False)[0]
    assert _seen_inside(use_reentrant=True)[0]


def test_rnn_weight_lists_are_where_the_patch_expects_them():
    rnn = nn.LSTM(2, 3)
    assert _compat.FLAT_WEIGHTS in rnn.__dict__ and _compat.FLAT_WEIGHT_NAMES in rnn.__dict__
    extra = set(rnn.__dict__) & (_compat.RNN_WEIGHT_LISTS - {_compat.FLAT_WEIGHTS})
    for name in extra:  # torch >= 2.2 keeps weakrefs to the weights as well
        assert all(ref() is w for ref, w in zip(rnn.__dict__[name], rnn._flat_weights))


def test_compiled_call_is_where_the_patch_expects_it():
    if not hasattr(nn.Module, "compile"):
        pytest.skip(f"nn.Module.compile needs torch >= 2.2, this is {torch.__version__}")
    module = nn.Linear(2, 2)
    module.compile(backend="eager")
    assert module.__dict__.get(_compat.COMPILED_CALL) is not None


# -- batching over tasks (issue 20: higher_func/_batching.py) ------------------------------------


def test_convnd_is_the_base_of_every_convolution():
    for conv in (
        nn.Conv1d(1, 1, 1),
        nn.Conv2d(1, 1, 1),
        nn.Conv3d(1, 1, 1),
        nn.ConvTranspose2d(1, 1, 1),
    ):
        assert isinstance(conv, _compat.ConvNd)


def _message(fn) -> str:
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


def test_vmap_limit_messages_read_as_matched():
    # Each message higher_func reads to fall back to a loop, raised by torch itself.
    def item(x: torch.Tensor) -> torch.Tensor:
        return x * x.sum().item()

    def branch(x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x

    def dynamic(x: torch.Tensor) -> torch.Tensor:
        return x.nonzero()

    def inplace(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(3).mul_(x)

    class Legacy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    xs = torch.randn(2, 3)
    found = [
        _message(lambda: torch.vmap(item)(xs)),
        _message(lambda: torch.vmap(branch)(xs)),
        _message(lambda: torch.vmap(dynamic)(xs)),
        _message(lambda: torch.vmap(inplace)(xs)),
        _message(lambda: torch.vmap(Legacy.apply)(xs)),
    ]
    for message in found:
        assert any(limit in message for limit in _compat.VMAP_LIMITS), message
    # A missing batching rule: the LSTM op, on every torch (higher_func loops over RNNs by
    # type; torch 2.0's nn.LSTM fails before the op, reading `.data` in flatten_parameters).
    weights = [w.detach().expand(2, *w.shape) for w in nn.LSTM(3, 2).parameters()]
    state = (torch.zeros(1, 2), torch.zeros(1, 2))

    def run(ws, x):
        return torch.lstm(x, state, ws, True, 1, 0.0, False, False, False)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = _message(lambda: torch.vmap(run)(weights, torch.randn(2, 4, 3)))
    assert "Batching rule not implemented" in message


def test_user_stacklevel_points_past_the_package():
    with pytest.warns(higher_func.BatchingFallbackWarning) as record:
        _warn_from_the_library()
    assert record[0].filename == __file__


def _warn_from_the_library() -> None:
    # An unbatchable module warns at patch time, from inside higher_func.
    from higher_func import _batching

    _batching._warned.discard(("GRU has no vmap batching rule in torch " + torch.__version__,))
    higher_func.monkeypatch(nn.GRU(2, 2), num_tasks=2)


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
def test_inside_checkpoint_sees_both_kinds_on_every_torch(use_reentrant):
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
