"""Token reduction on the real offline models: all-MiniLM-L6-v2 and SmolLM2-135M."""

import pytest
import torch

from prunekit.tokens import apply
from prunekit.tokens.evaluation import PassageProtocol, Prefill, PrefillProtocol, TextEmbedding, wiki_passages


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    from prunekit.models.assets import minilm_path

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def passages(minilm):
    return wiki_passages(minilm[1], PassageProtocol(count=12))


def test_minilm_padded_batches_reduce_each_paragraph_as_it_would_alone(minilm, passages):
    model, tokenizer = minilm
    texts = [passages[0], passages[1][:200], passages[2][:90]]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert len(set(encoded["attention_mask"].sum(dim=1).tolist())) == 3
    with torch.no_grad():
        for method in ("tome", "evit", "zero-tprune"):
            with apply(model, method, ratio=0.3) as patch:
                pooled = patch.pool(model(**encoded).last_hidden_state)
                kept = patch.kept_positions().clone()
                for row, text in enumerate(texts):
                    alone = patch.pool(model(**tokenizer([text], return_tensors="pt")).last_hidden_state)
                    assert torch.allclose(alone[0], pooled[row], atol=1e-4), (method, row)
                    assert kept[row][kept[row] >= 0].tolist()[:5] == patch.kept_positions()[0].tolist()[:5]


def test_minilm_fidelity_falls_with_the_ratio_and_attention_beats_random(minilm, passages):
    model, tokenizer = minilm
    task = TextEmbedding(tokenizer, passages, PassageProtocol(count=12), batch_size=12)
    assert task.quality(model, None)["cosine"] == pytest.approx(1.0, abs=1e-6)
    cosine = {}
    with torch.no_grad():
        for method, ratio in [("evit", 0.0), ("evit", 0.1), ("evit", 0.3), ("zero-tprune", 0.3), ("random", 0.1),
                             ("random", 0.3)]:
            with apply(model, method, ratio=ratio) as patch:
                cosine[method, ratio] = task.quality(model, patch)["cosine"]
    assert cosine["evit", 0.0] == pytest.approx(1.0, abs=1e-6)
    for method in ("evit", "random"):
        assert 1.0 > cosine[method, 0.1] > cosine[method, 0.3] > 0.5
    assert cosine["evit", 0.3] > cosine["random", 0.3] + 0.02
    assert cosine["zero-tprune", 0.3] > cosine["random", 0.3] + 0.02


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_dir):
    from prunekit.models.loading import load_model

    return load_model(smollm2_dir, kind="causal-lm")


def test_smollm2_prefill_pruning_keeps_the_continuation_predictable(smollm2_loaded):
    from prunekit.core.text import wiki_articles

    lm = smollm2_loaded
    text = "\n\n".join(wiki_articles()[90:92])
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][:, :2 * 120].reshape(2, 120)
    task = Prefill(ids, PrefillProtocol(prompt_tokens=96, continuation_tokens=24, windows=2), batch_size=2)
    baseline = task.quality(lm.model, None)["perplexity"]
    with apply(lm.model, "fastv", ratio=0.0) as patch:
        assert task.quality(lm.model, patch)["perplexity"] == baseline
    with apply(lm.model, "fastv", ratio=0.5) as patch:
        pruned = task.quality(lm.model, patch)
        assert pruned["prompt_tokens_kept"] == 96 - 47
        assert baseline < pruned["perplexity"] < 2 * baseline
        prompt = ids[:1, :96]
        with torch.no_grad():
            next_token = lm.model(input_ids=prompt).logits[0, -1].argmax()
            generated = lm.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                                          do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
        assert generated[0, 96] == next_token and generated.shape == (1, 99)


def test_minilm_sentence_pairs_keep_every_special_token_given_the_tokenizer(minilm, passages):
    model, tokenizer = minilm
    encoded = tokenizer(passages[3][:300], passages[4][:300], return_tensors="pt")
    specials = [i for i, t in enumerate(encoded["input_ids"][0].tolist()) if t in tokenizer.all_special_ids]
    assert len(specials) == 3  # [CLS], the middle [SEP], the final [SEP]
    with torch.no_grad(), apply(model, "random", ratio=0.9, tokenizer=tokenizer) as patch:
        model(**encoded)
        assert set(specials) <= set(patch.kept_positions()[0].tolist())
        assert patch.describe()["protected"].startswith("the first real token ([CLS]), the last real token, token ids")
