"""Perplexity of each text under a reference causal language model (SmolLM2-135M by default).

The filter of CCNet (Wenzek et al. 2020) and "When Less is More" (Marion et al. 2023): a small
reference LM rates every document; very high perplexity marks noise or unusual text, very low
perplexity marks boilerplate and repetition. Each text is scored on its own (the document-start
token prepended, so the first word is predicted too, truncated to ``max_tokens``). Texts are streamed
(the data is never held whole) in groups of ``batch_size × sorted_batches``; inside a group they are
sorted by length, so a right-padded batch pads little, and the vocabulary projection sees only the
positions that predict a real token.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from pydantic import Field

from prunekit.data.base import HIGHER, SCORES, Score
from prunekit.data.sources import TEXT
from prunekit.errors import PrunekitError


@functools.lru_cache(maxsize=1)
def _reference_model(spec: str):
    from prunekit.models.loading import CAUSAL_LM, load_model

    loaded = load_model(spec or None, kind=CAUSAL_LM)
    loaded.require_tokenizer()
    return loaded


DOCUMENT_SEPARATOR = "<|endoftext|>"


def start_token(tokenizer) -> int | None:
    """The token a document starts after in pretraining.

    GPT-2 style vocabularies (SmolLM2, Pythia, GPT-2) separate documents with ``<|endoftext|>``;
    an instruct model's ``bos`` may instead open a chat turn (SmolLM2-Instruct: ``<|im_start|>``),
    which would make plain text look unlikely. Otherwise the tokenizer's bos, then its eos.
    """
    separator = tokenizer.convert_tokens_to_ids(DOCUMENT_SEPARATOR) if DOCUMENT_SEPARATOR in tokenizer.get_vocab() else None
    for candidate in (separator, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return None


@torch.no_grad()
def text_perplexities(model, tokenizer, texts: list[str], max_tokens: int = 512, batch_size: int | None = None,
                      head: nn.Module | None = None) -> np.ndarray:
    """exp(mean next-token loss) of every text on its own.

    The texts are sorted by length and run ``batch_size`` at a time (all at once when None), so a batch
    pads little; ``head`` (the model's output projection, found by the adapter when not given) sees
    only the positions that predict a real token, never padding or a text's last token.
    """
    start = start_token(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens - (start is not None))
    sequences = [([start] if start is not None else []) + ids for ids in encoded["input_ids"]]
    for text, ids in zip(texts, sequences):
        if len(ids) < 2:
            raise PrunekitError(f"text {text[:40]!r} has too few tokens to score")
    if head is None:
        head = _output_head(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda row: len(sequences[row]))  # stable: ties keep file order
    size = batch_size or len(order)
    means = np.empty(len(sequences), dtype=np.float64)
    for begin in range(0, len(order), size):
        rows = order[begin:begin + size]
        means[rows] = _mean_losses(model, head, [sequences[row] for row in rows], pad).double().numpy()
    return np.exp(means)


def _output_head(model) -> nn.Module | None:
    from prunekit.models.base import adapter_for

    try:
        return adapter_for(model).head()
    except PrunekitError:
        return None  # a model the adapter cannot read: its full logits are computed, then selected


def _mean_losses(model, head: nn.Module | None, sequences: list[list[int]], pad: int) -> torch.Tensor:
    """Mean next-token loss of each sequence of one right-padded batch (float32)."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    predicting = mask[:, 1:].bool()  # position p predicts token p + 1, which must be real
    targets = input_ids[:, 1:][predicting]
    device = next(model.parameters()).device
    selected = predicting.to(device)

    def only_predicting_positions(_module, args):
        hidden = args[0]
        if hidden.dim() == 3 and hidden.shape[:2] == mask.shape:
            return (hidden[:, :-1][selected].unsqueeze(0), *args[1:])
        return None

    handle = head.register_forward_pre_hook(only_predicting_positions) if head is not None else None
    try:
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    # The model's own code after the head (logit scaling, soft-capping) is elementwise and keeps the
    # selection; a head the hook did not reach gives every position's logits, selected here.
    logits = logits[0] if logits.shape[:2] == (1, targets.shape[0]) else logits[:, :-1][selected]
    losses = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none").cpu()
    rows = torch.arange(len(sequences)).unsqueeze(1).expand_as(predicting)[predicting]
    totals = torch.zeros(len(sequences)).index_add_(0, rows, losses)
    return totals / predicting.sum(dim=1)


@SCORES.register("perplexity")
class Perplexity(Score):
    summary = ("perplexity of the text under a reference causal LM, SmolLM2-135M by default "
               "(Wenzek et al. 2020; Marion et al. 2023)")
    harder = HIGHER
    needs = frozenset({"reference_model"})

    model: str = Field("smollm2", description="a local causal-LM directory, or smollm2")
    max_tokens: int = Field(512, ge=2)
    batch_size: int = Field(8, ge=1)
    sorted_batches: int = Field(16, ge=1, description="texts are sorted by length in groups of this many "
                                                      "batches, so a batch pads little")

    def compute(self, context) -> np.ndarray:
        if context.modality != TEXT:
            raise PrunekitError(f"perplexity scores text; {context.source.description} holds {context.modality} data")
        loaded = _reference_model(self.model)
        head = _output_head(loaded.model)
        # A group of texts is fixed by the file order, whatever the number of processes; sorting happens
        # inside it, so several processes give the same batches, and the same scores, as one.
        return context.map_texts(lambda texts: text_perplexities(loaded.model, loaded.tokenizer, texts, self.max_tokens,
                                                                 self.batch_size, head),
                                 "Perplexity", batch_size=self.batch_size * self.sorted_batches)
