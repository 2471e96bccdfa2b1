"""Second order through scaled dot-product attention.

The oracle is the same model with its attention written by hand (matmul, softmax, dropout):
every variant of ``F.scaled_dot_product_attention`` gives that model's values and
second-order meta-gradients inside a patched module, looped, batched and compiled. Untracked
and first-order calls keep torch's fused kernel; another thread's attention is never touched;
models without attention are never rerouted.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import higher_func
from higher_func import _attention, _reroute
from higher_func._compat import SDPA_OPTIONS

DTYPE = torch.float64
HAS_GQA = "enable_gqa" in SDPA_OPTIONS  # torch 2.5
HAS_SCALE = "scale" in SDPA_OPTIONS  # torch 2.1


def _bool_mask(length: int) -> torch.Tensor:
    mask = torch.rand(length, length, generator=torch.Generator().manual_seed(3)) > 0.4
    return mask | torch.eye(length, dtype=torch.bool)  # every query attends somewhere


def _float_mask(length: int) -> torch.Tensor:
    return torch.randn(length, length, generator=torch.Generator().manual_seed(4))


VARIANTS = {
    "plain": {},
    "bool_mask": {"attn_mask": _bool_mask(5)},
    "float_mask": {"attn_mask": _float_mask(5)},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
    "dropout": {"dropout_p": 0.3},
}
if HAS_GQA:
    VARIANTS["gqa"] = {"enable_gqa": True}


def variant_of(name: str) -> dict:
    """``VARIANTS[name]``; skips the test where the installed torch cannot do it."""
    if name == "scale" and not HAS_SCALE:
        pytest.skip("scale= of F.scaled_dot_product_attention needs torch >= 2.1")
    return VARIANTS[name]


def _math_only():
    """torch's switch to its math attention kernel (process-wide)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # before torch 2.3: the older switch, deprecated since
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    return sdpa_kernel(SDPBackend.MATH)


def _fused_on_cpu() -> bool:
    # torch 2.0 has no fused attention kernel on a CPU (F.scaled_dot_product_attention is the
    # math kernel there); later releases take flash attention.
    q = torch.randn(1, 1, 2, 2, requires_grad=True)
    return "Flash" in type(F.scaled_dot_product_attention(q, q, q).grad_fn).__name__


FUSED_ON_CPU = _fused_on_cpu()


def eager_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):  # fmt: skip
    """Attention by hand: what ``F.scaled_dot_product_attention`` means."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = scores.softmax(-1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


class Attention(nn.Module):
    """One attention layer whose kernel is ``attend``: torch's function or ``eager_attention``."""

    def __init__(self, variant: dict, attend=F.scaled_dot_product_attention) -> None:
        super().__init__()
        self.variant, self.attend = variant, attend
        self.kv_heads = 1 if variant.get("enable_gqa") else 2
        self.q = nn.Linear(4, 8)
        self.kv = nn.Linear(4, 2 * 4 * self.kv_heads)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *batch, length, _ = x.shape
        q = self.q(x).view(*batch, length, 2, 4).transpose(-3, -2)
        k, v = self.kv(x).view(*batch, length, 2, self.kv_heads, 4).unbind(-3)
        h = self.attend(q, k.transpose(-3, -2), v.transpose(-3, -2), **self.variant)
        return self.out(torch.tanh(h.transpose(-3, -2).flatten(-2)))


def twins(variant: dict) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fused = Attention(variant).to(DTYPE)
    eager = Attention(variant, eager_attention).to(DTYPE)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def per_task(out: torch.Tensor) -> torch.Tensor:
    """Each task's loss: the mean over one task's output (the last three dims)."""
    return out.pow(2).mean(dim=(-3, -2, -1))


def maml(model: nn.Module, x: torch.Tensor, steps: int = 2, seed: int = 0, **kwargs):
    """Query loss(es), second-order meta-gradients after ``steps`` inner SGD steps, and how
    a batched patch ran its tasks."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    torch.manual_seed(seed)  # the same dropout masks for both models
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            diffopt.step(per_task(fmodel(x)))
        loss = per_task(fmodel(x))
    grads = torch.autograd.grad(loss.sum(), list(model.parameters()))
    return loss, grads, higher_func.patch.batching(fmodel)


def assert_all_close(actual, expected) -> None:
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_function_is_torch_math_kernel(name):
    variant = variant_of(name)
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 4)
    kv = torch.randn(2, 1 if variant.get("enable_gqa") else 2, 5, 4)
    torch.manual_seed(1)
    with _math_only():  # process-wide, but this test runs alone
        expected = F.scaled_dot_product_attention(q, kv, kv, **variant)
    torch.manual_seed(1)
    assert torch.equal(_attention.scaled_dot_product_attention(q, kv, kv, **variant), expected)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "dropout"])
def test_gradgradcheck(name):
    variant = variant_of(name)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 3, dtype=DTYPE, generator=gen, requires_grad=True)
    kv = torch.randn(1, 1 if variant.get("enable_gqa") else 2, 5, 3, dtype=DTYPE, generator=gen)
    kv.requires_grad_()

    def attend(q, kv):
        return _attention.scaled_dot_product_attention(q, kv, kv, **variant)

    assert torch.autograd.gradcheck(attend, (q, kv))
    assert torch.autograd.gradgradcheck(attend, (q, kv))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_second_order_equals_eager_attention(name):
    fused, eager = twins(variant_of(name))
    x = torch.randn(3, 5, 4, dtype=DTYPE)
    loss, grads, _ = maml(fused, x)
    expected_loss, expected, _ = maml(eager, x)
    torch.testing.assert_close(loss, expected_loss)
    assert_all_close(grads, expected)


@pytest.mark.parametrize("name", ["plain", "bool_mask", "causal", "dropout"])
def test_batched_second_order_equals_the_loop(name):
    fused, eager = twins(VARIANTS[name])
    xs = torch.randn(3, 2, 5, 4, dtype=DTYPE)
    loss, grads, how = maml(fused, xs, num_tasks=3)
    assert how.mode == "vmap"
    if name == "dropout":  # vmap draws other masks than a loop: it runs, twice differentiable
        assert all(torch.isfinite(g).all() for g in grads)
        return
    looped = [maml(eager, xs[t]) for t in range(3)]
    torch.testing.assert_close(loss, torch.stack([lo for lo, _, _ in looped]))
    assert_all_close(grads, [sum(g) for g in zip(*[g for _, g, _ in looped])])


def _kernel_of(output: torch.Tensor) -> str:
    return type(output.grad_fn).__name__


@pytest.fixture
def math_calls(monkeypatch) -> list:
    """The threads that called ``_attention.scaled_dot_product_attention``, in order: whether
    a call was rerouted, also where torch's own kernel is the math kernel too (torch 2.0 on a
    CPU), so that the kernels cannot tell."""
    calls: list = []
    original = _attention.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(_attention, "scaled_dot_product_attention", spy)
    return calls


def test_patched_call_uses_the_math_kernel_and_untracked_the_fused_one(math_calls):
    torch.manual_seed(0)
    kernels, rerouted = [], []

    class Probe(Attention):
        def forward(self, x):
            q = self.q(x).view(2, 5, 2, 4).transpose(1, 2)
            before = len(math_calls)
            out = F.scaled_dot_product_attention(q, q, q)
            kernels.append(_kernel_of(out))
            rerouted.append(len(math_calls) > before)
            return out.sum()

    model = Probe({})
    x = torch.randn(2, 5, 4)
    fmodel = higher_func.monkeypatch(model, copy_initial_weights=False)
    fmodel(x)
    fmodel.track_higher_grads = False
    fmodel(x)
    fmodel.track_higher_grads = True
    model(x)  # the user's own module is not rerouted
    assert rerouted == [True, False, False]
    assert "Flash" not in kernels[0]
    if FUSED_ON_CPU:
        assert ["Flash" in k for k in kernels] == [False, True, True]


def test_another_threads_attention_keeps_the_fused_kernel(math_calls):
    torch.manual_seed(0)
    inside, other_done = threading.Event(), threading.Event()
    kernels = {}

    class Waits(Attention):
        def forward(self, x):
            q = self.q(x).view(2, 5, 2, 4).transpose(1, 2)
            inside.set()
            assert other_done.wait(30)  # the other thread's attention runs now
            out = F.scaled_dot_product_attention(q, q, q)
            kernels["patched"] = _kernel_of(out)
            return out.sum()

    def other() -> None:
        assert inside.wait(30)
        q = torch.randn(2, 2, 5, 4, requires_grad=True)
        kernels["other"] = _kernel_of(F.scaled_dot_product_attention(q, q, q))
        other_done.set()

    thread = threading.Thread(target=other, name="other")
    thread.start()
    higher_func.monkeypatch(Waits({}), copy_initial_weights=False)(torch.randn(2, 5, 4))
    thread.join()
    assert math_calls == [threading.current_thread().name]  # the patched call only
    assert "Flash" not in kernels["patched"]
    if FUSED_ON_CPU:
        assert "Flash" in kernels["other"]


@pytest.mark.skipif(HAS_SCALE, reason="only torch 2.0 lacks scale=")
def test_scale_on_torch_2_0_is_refused_like_torch():
    q = torch.randn(1, 1, 3, 2)
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, q, q, scale=0.3)
    with pytest.raises(TypeError, match=r"scale= needs torch >= 2\.1.*multiply the query"):
        _attention.scaled_dot_product_attention(q, q, q, scale=0.3)


@pytest.mark.skipif(HAS_GQA, reason="only torch before 2.5 lacks enable_gqa=")
def test_gqa_before_torch_2_5_is_refused_like_torch():
    q = torch.randn(1, 2, 3, 2)
    with pytest.raises(TypeError, match=r"enable_gqa= needs torch >= 2\.5.*repeat key"):
        _attention.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)


def test_models_without_attention_are_not_rerouted():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    fmodel = higher_func.monkeypatch(model)
    assert fmodel._hf_reroute is None
    assert all("forward" not in c.__dict__ for c in fmodel._hf_tree.copies.values())


def test_only_the_attention_modules_are_rerouted():
    class Block(nn.Module):  # mentions attention, computes none itself
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention({})
            self.mlp = nn.Linear(1, 1)

        def forward(self, x, attention_mask=None):
            return self.mlp(self.attention(x))

    fmodel = higher_func.monkeypatch(Block())
    copies = fmodel._hf_tree.copies.values()
    assert [type(c).__name__ for c in copies if "forward" in c.__dict__] == ["Attention"]


def test_helper_functions_are_read():
    assert "scaled_dot_product_attention" in _reroute.mentions(_CallsHelper)
    fmodel = higher_func.monkeypatch(_CallsHelper())
    assert isinstance(fmodel._hf_tree.root.__dict__["forward"], _reroute._Forward)


def _mix(q):
    return F.scaled_dot_product_attention(q, q, q)


class _CallsHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return _mix(self.lin(x))


def test_user_module_is_never_written():
    fused, _ = twins({})
    before = dict(fused.__dict__)
    maml(fused, torch.randn(3, 5, 4, dtype=DTYPE))
    assert "forward" not in fused.__dict__ and fused.__dict__.keys() == before.keys()


def test_multihead_attention_without_weights_second_order():
    # need_weights=False reaches F.scaled_dot_product_attention; need_weights=True is eager.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).to(DTYPE)

    class Self(nn.Module):
        def __init__(self, need_weights: bool) -> None:
            super().__init__()
            self.mha, self.need_weights = mha, need_weights

        def forward(self, x):
            return self.mha(x, x, x, need_weights=self.need_weights)[0]

    x = torch.randn(3, 5, 8, dtype=DTYPE)
    loss, grads, _ = maml(Self(False), x)
    expected_loss, expected, _ = maml(Self(True), x)
    torch.testing.assert_close(loss, expected_loss)
    assert_all_close(grads, expected)


def test_transformer_layer_second_order():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).to(DTYPE)
    x = torch.randn(3, 5, 8, dtype=DTYPE)
    loss, grads, _ = maml(layer, x)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "bool_mask", "causal"])
def test_compiled_equals_eager(name):
    fused, eager = twins(VARIANTS[name])
    x = torch.randn(3, 5, 4, dtype=DTYPE)

    opt = torch.optim.SGD(fused.parameters(), lr=0.3)

    @higher_func.compile(backend="aot_eager")
    def query_loss(x):
        with higher_func.innerloop_ctx(fused, opt, copy_initial_weights=False) as (fm, diffopt):
            for _ in range(2):
                diffopt.step(per_task(fm(x)))
            return per_task(fm(x))

    loss = query_loss(x)
    grads = torch.autograd.grad(loss, list(fused.parameters()))
    expected_loss, expected, _ = maml(eager, x)
    torch.testing.assert_close(loss, expected_loss)
    assert_all_close(grads, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["plain", "bool_mask", "causal", "scale"])
def test_second_order_on_cuda_equals_eager_attention(name):
    # float32 and half-width heads: where torch picks its flash or memory-efficient kernel.
    variant = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in variant_of(name).items()
    }
    fused, eager = twins(variant)
    fused, eager = fused.float().cuda(), eager.float().cuda()
    x = torch.randn(3, 5, 4, device="cuda")
    loss, grads, _ = maml(fused, x)
    expected_loss, expected, _ = maml(eager, x)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5)


@st.composite
def attention_cases(draw):
    """Shapes and every variant of scaled dot-product attention (no dropout: random)."""
    batch = draw(st.lists(st.integers(1, 2), max_size=2))
    kv_heads = draw(st.integers(1, 2))
    gqa = HAS_GQA and draw(st.booleans())
    heads = kv_heads * (draw(st.integers(1, 2)) if gqa else 1)
    length, source, width = (
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 3)),
    )
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, heads, length, width, dtype=DTYPE, generator=gen)
    k = torch.randn(*batch, kv_heads, source, width, dtype=DTYPE, generator=gen)
    v = torch.randn(*batch, kv_heads, source, width + 1, dtype=DTYPE, generator=gen)
    variant: dict = {"enable_gqa": True} if gqa else {}
    mask = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    if mask == "bool":
        keep = torch.rand(length, source, generator=gen) > 0.5
        keep[:, 0] = True  # every query attends somewhere
        variant["attn_mask"] = keep
    elif mask == "float":
        variant["attn_mask"] = torch.randn(length, source, dtype=DTYPE, generator=gen)
    elif mask == "causal" and length <= source:
        variant["is_causal"] = True
    if HAS_SCALE and draw(st.booleans()):
        variant["scale"] = draw(st.floats(0.1, 2.0))
    return q, k, v, variant


@settings(max_examples=40, deadline=None)
@given(attention_cases())
def test_property_values_and_second_order_equal_eager(case):
    q, k, v, variant = case
    tensors = [t.clone().requires_grad_() for t in (q, k, v)]

    def second_order(attend):
        out = attend(*tensors, **variant)
        grads = torch.autograd.grad(out.sin().sum(), tensors, create_graph=True)
        total = sum(g.pow(2).sum() for g in grads)
        return out, torch.autograd.grad(total, tensors)

    out, grads = second_order(_attention.scaled_dot_product_attention)
    expected_out, expected = second_order(eager_attention)
    torch.testing.assert_close(out, expected_out)
    assert_all_close(grads, expected)
