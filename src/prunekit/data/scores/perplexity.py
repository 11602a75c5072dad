"""Perplexity of each text under a reference causal language model (SmolLM2-135M by default).

The filter of CCNet (Wenzek et al. 2020) and "When Less is More" (Marion et al. 2023): a small
reference LM rates every document; very high perplexity marks noise or unusual text, very low
perplexity marks boilerplate and repetition. Each text is scored on its own (the document-start
token prepended, so the first word is predicted too, truncated to ``max_tokens``); batches are
right-padded and padding never enters a loss. Texts are streamed: the data is never held whole.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
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
def text_perplexities(model, tokenizer, texts: list[str], max_tokens: int = 512) -> np.ndarray:
    """exp(mean next-token loss) of every text on its own, in one padded batch."""
    start = start_token(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens - (start is not None))
    sequences = [([start] if start is not None else []) + ids for ids in encoded["input_ids"]]
    for text, ids in zip(texts, sequences):
        if len(ids) < 2:
            raise PrunekitError(f"text {text[:40]!r} has too few tokens to score")
    longest = max(len(ids) for ids in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float().cpu()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    scored = mask[:, 1:].to(losses.dtype)
    mean = (losses * scored).sum(dim=1) / scored.sum(dim=1)
    return mean.double().exp().numpy()


@SCORES.register("perplexity")
class Perplexity(Score):
    summary = ("perplexity of the text under a reference causal LM, SmolLM2-135M by default "
               "(Wenzek et al. 2020; Marion et al. 2023)")
    harder = HIGHER
    needs = frozenset({"reference_model"})

    model: str = Field("smollm2", description="a local causal-LM directory, or smollm2")
    max_tokens: int = Field(512, ge=2)
    batch_size: int = Field(8, ge=1)

    def compute(self, context) -> np.ndarray:
        if context.modality != TEXT:
            raise PrunekitError(f"perplexity scores text; {context.source.description} holds {context.modality} data")
        loaded = _reference_model(self.model)
        return context.map_texts(lambda texts: text_perplexities(loaded.model, loaded.tokenizer, texts, self.max_tokens),
                                 "Perplexity", batch_size=self.batch_size)
