"""Real model code: tiny Hugging Face models built from their configs (nothing downloaded).

With their default attention (``F.scaled_dot_product_attention``), second-order MAML through
BERT, GPT-2, ViT and T5 gives higher 0.2.1's meta-gradients on the same models with eager
attention (higher cannot differentiate torch's fused kernel twice); ``num_tasks`` gives a loop
over tasks' results, vmapped for BERT with padding tokens; a compiled meta-step gives the
eager one's. Needs the ``hf`` extra (``pip install -e ".[hf]"``); skipped without it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import higher
import pytest
import torch
import torch.nn.functional as F

import higher_func

transformers = pytest.importorskip("transformers")

LABELS, VOCAB, LENGTH, BATCH = 3, 40, 8, 4
PAD = 0


@dataclass
class Case:
    make: Callable[[str], torch.nn.Module]  # attn_implementation -> model
    inputs: Callable[[torch.Generator], dict]  # one task's inputs
    loss: Callable[[Any, dict], torch.Tensor]


def _quiet(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own notices at construction
        return make()


def _tokens(gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=gen)
    ids[:, -2:] = PAD
    return ids


def _labels(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, LABELS, (BATCH,), generator=gen)


def _classify(out: Any, inputs: dict) -> torch.Tensor:
    return F.cross_entropy(out.logits, inputs["labels"])


def _own_loss(out: Any, inputs: dict) -> torch.Tensor:
    return out.loss


def _bert(impl: str) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD,
        attn_implementation=impl,
    )  # fmt: skip
    return _quiet(lambda: transformers.BertForSequenceClassification(config))


def _gpt2(impl: str) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=LENGTH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=impl,
    )  # fmt: skip
    return _quiet(lambda: transformers.GPT2LMHeadModel(config))


def _vit(impl: str) -> torch.nn.Module:
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=impl,
    )  # fmt: skip
    return _quiet(lambda: transformers.ViTForImageClassification(config))


def _t5(impl: str) -> torch.nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=PAD, decoder_start_token_id=PAD,
        attn_implementation=impl,
    )  # fmt: skip
    return _quiet(lambda: transformers.T5ForConditionalGeneration(config))


CASES = {
    "bert": Case(
        _bert, lambda g: {"input_ids": _tokens(g), "labels": _labels(g)}, _classify
    ),
    "gpt2": Case(
        _gpt2, lambda g: {"input_ids": (ids := _tokens(g)[:, :-2]), "labels": ids}, _own_loss
    ),
    "vit": Case(
        _vit,
        lambda g: {"pixel_values": torch.randn(BATCH, 1, 8, 8, generator=g), "labels": _labels(g)},
        _classify,
    ),
    "t5": Case(
        _t5,
        lambda g: {"input_ids": _tokens(g), "labels": _tokens(g)[:, :3] + 1},
        _own_loss,
    ),
}  # fmt: skip


def _call(fmodel: Any, case: Case, inputs: dict) -> torch.Tensor:
    model_inputs = {k: v for k, v in inputs.items() if k != "labels" or case.loss is _own_loss}
    return case.loss(fmodel(**model_inputs), inputs)


def maml(ctx: Any, model: torch.nn.Module, case: Case, inputs: dict, steps: int = 2):
    """Query loss and meta-gradients of second-order MAML with inner SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(_call(fmodel, case, inputs))
        loss = _call(fmodel, case, inputs)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def assert_grads_close(actual, expected, rtol=1e-4, atol=1e-6) -> None:
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(CASES))
def test_default_attention_second_order_equals_higher(name):
    case = CASES[name]
    inputs = case.inputs(torch.Generator().manual_seed(1))
    loss, grads = maml(higher_func.innerloop_ctx, case.make("sdpa"), case, inputs)
    expected_loss, expected = maml(higher.innerloop_ctx, case.make("eager"), case, inputs)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, expected)


def test_bert_batches_with_vmap_and_equals_the_loop():
    case = CASES["bert"]
    tasks = [case.inputs(torch.Generator().manual_seed(t)) for t in range(3)]
    stacked = {k: torch.stack([task[k] for task in tasks]) for k in tasks[0]}
    model = case.make("sdpa")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=3) as (
        fmodel,
        diffopt,
    ):

        def losses():
            logits = fmodel(stacked["input_ids"]).logits
            return torch.vmap(F.cross_entropy)(logits, stacked["labels"])

        for _ in range(2):
            diffopt.step(losses())
        query = losses()
    assert higher_func.patch.batching(fmodel).mode == "vmap"
    grads = torch.autograd.grad(query.sum(), list(model.parameters()), allow_unused=True)
    looped = [maml(higher_func.innerloop_ctx, case.make("sdpa"), case, task) for task in tasks]
    torch.testing.assert_close(query.detach(), torch.stack([lo for lo, _ in looped]))
    summed = [sum(g[i] for _, g in looped) for i in range(len(grads))]
    assert_grads_close(grads, summed, rtol=1e-4, atol=1e-6)
    padding_row = grads[0][PAD]  # bert.embeddings.word_embeddings.weight
    assert torch.count_nonzero(padding_row) == 0


# Not BERT: its feed-forward calls inspect.signature on a bound method of the patch's module
# copy, which Dynamo cannot trace on an object built inside the graph. Not GPT-2: its forward
# calls a logging.Logger method, which Dynamo refuses with fullgraph=True even unpatched.
# T5 keeps mutable objects (its config, generation config, sets and dicts of loading plans) on
# its modules: every patch owns copies of them (issue 19). Whether Dynamo can trace those copies
# depends on what the model has cached so far; where it cannot, the patch refuses, naming them.
# So T5 gives the eager answer or that clear error; ViT always the eager answer.
REFUSALS = {"t5": r"could not trace the patch .* model\.config \(T5Config\)"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "t5"])
def test_compiled_equals_eager(name):
    case = CASES[name]
    inputs = case.inputs(torch.Generator().manual_seed(1))
    model = case.make("sdpa")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    @higher_func.compile(backend="aot_eager")
    def query_loss(inputs):
        with higher_func.innerloop_ctx(model, opt, copy_initial_weights=False) as (fm, diffopt):
            for _ in range(2):
                diffopt.step(_call(fm, case, inputs))
            return _call(fm, case, inputs)

    try:
        loss = query_loss(inputs)
    except TypeError as refused:
        if name not in REFUSALS:
            raise
        assert re.search(REFUSALS[name], str(refused))
        return
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected_loss, expected = maml(higher_func.innerloop_ctx, case.make("sdpa"), case, inputs)
    torch.testing.assert_close(loss.detach(), expected_loss)
    assert_grads_close(grads, expected)
