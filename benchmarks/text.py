"""W4: MAML on a tiny BERT sentence classifier, the text workload.

Each task is a ``ways``-way classification of token sequences (padded with token 0, which
the embedding's ``padding_idx`` keeps out of the gradient); the model is Hugging Face's
``BertForSequenceClassification`` built from a ``BertConfig`` (nothing downloaded). Its
default attention is ``F.scaled_dot_product_attention``, whose fused CPU kernel higher cannot
differentiate twice: higher runs the same model with ``attn_implementation="eager"``.
higher_func runs the default model, computing attention with torch's math kernel in tracked
steps; the "eager attn" paths run higher_func on the eager model too, so that the two rows
side by side show what the attention kernel costs.

No attention mask is passed: transformers' mask helpers branch on the mask's values
(``padding_mask.all()``), which ``num_tasks`` can only run in a loop over tasks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import maml
from .maml import Maml
from .paths import BATCHED, BATCHED_EAGER, HIGHER, LEGACY, LEGACY_EAGER, Path


@dataclass(frozen=True)
class Sizes:
    tasks: int = 8
    ways: int = 3
    shots: int = 4  # sentences per class in the support set, and in the query set
    length: int = 16
    vocab: int = 100
    hidden: int = 32
    layers: int = 2
    steps: int = 2
    inner_lr: float = 0.1


FULL = Sizes()
QUICK = Sizes(tasks=2, shots=2, length=8, hidden=16, layers=1, steps=1)


def available() -> str:
    """Why W4 cannot run here, or ``""`` when it can."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install -e '.[hf]')"
    return ""


class Classifier(nn.Module):
    """The BERT classifier as a function of token ids to logits (what ``Maml`` expects)."""

    def __init__(self, sizes: Sizes, attention: str) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            vocab_size=sizes.vocab,
            hidden_size=sizes.hidden,
            num_hidden_layers=sizes.layers,
            num_attention_heads=2,
            intermediate_size=2 * sizes.hidden,
            max_position_embeddings=sizes.length,
            num_labels=sizes.ways,
            hidden_dropout_prob=0.0,  # the paths must compute one meta-gradient
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            attn_implementation=attention,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notices at construction
            self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).logits


def sample(sizes: Sizes, seed: int = 1):
    """``(xs, ys, xq, yq)``: each class of each task draws its tokens from its own slice of
    the vocabulary, then the sequences are padded to random lengths."""
    generator = torch.Generator().manual_seed(seed)
    t, n, length = sizes.tasks, sizes.ways * sizes.shots, sizes.length

    def points():
        labels = torch.arange(sizes.ways).repeat_interleave(sizes.shots).expand(t, n)
        offset = torch.randint(1, sizes.vocab - 10, (t, sizes.ways), generator=generator)
        start = offset.gather(1, labels)
        ids = start.unsqueeze(-1) + torch.randint(0, 10, (t, n, length), generator=generator)
        kept = torch.randint(length // 2, length + 1, (t, n, 1), generator=generator)
        ids = ids.masked_fill(torch.arange(length) >= kept, 0)
        return ids, labels.clone()

    return (*points(), *points())


def problem(sizes: Sizes, attention: str) -> Maml:
    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return Classifier(sizes, attention)

    return Maml(make_model, F.cross_entropy, sample(sizes), sizes.steps, sizes.inner_lr)


def build(sizes: Sizes) -> Dict[str, Path]:
    """higher on the eager model; higher_func legacy and batched on the default (SDPA) model
    and on the eager one."""
    default, eager = problem(sizes, "sdpa"), problem(sizes, "eager")
    paths = maml.build(eager, (HIGHER,))
    paths.update(maml.build(default, (LEGACY, BATCHED)))
    for name, path in maml.build(eager, (LEGACY, BATCHED)).items():
        renamed = LEGACY_EAGER if name == LEGACY else BATCHED_EAGER
        paths[renamed] = Path(renamed, path.step, path.learned)
    return paths
