"""Text scores: perplexity under a reference LM (tiny model for exactness, SmolLM2 on real Wikipedia text)
and prototypes on all-MiniLM-L6-v2 sentence embeddings."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from prunekit.data import score_data
from prunekit.data.scores.perplexity import start_token, text_perplexities
from prunekit.errors import PrunekitError

TEXTS = ["The cat sat on the mat.", "Stocks fell sharply after the announcement of new tariffs on steel imports.",
         "Hello", "A much longer sentence about rivers, mountains and the weather in the northern valleys in May."]


@pytest.fixture()
def tiny_lm(tiny_model_dir):
    from prunekit.models.loading import load_model

    return load_model(tiny_model_dir, kind="causal-lm")


def test_batched_padded_perplexity_equals_one_text_at_a_time(tiny_lm):
    model, tokenizer = tiny_lm.model, tiny_lm.tokenizer
    batched = text_perplexities(model, tokenizer, TEXTS)
    single = np.concatenate([text_perplexities(model, tokenizer, [t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, rtol=1e-5)
    # and equal to the model's own mean next-token loss on the text after the document-start token
    for text, value in zip(TEXTS, single):
        ids = torch.tensor([[start_token(tokenizer)] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        assert value == pytest.approx(float(loss.exp()), rel=1e-5)


def test_length_sorted_batches_project_only_real_positions_and_equal_one_text_at_a_time(tiny_lm):
    model, tokenizer = tiny_lm.model, tiny_lm.tokenizer
    texts = TEXTS * 2 + ["Rain again.", "The committee postponed its decision on the bridge until the spring."]
    single = np.concatenate([text_perplexities(model, tokenizer, [t]) for t in texts])
    rows_projected = []
    handle = model.lm_head.register_forward_hook(lambda _m, args, _out: rows_projected.append(args[0].shape[:-1].numel()))
    try:
        sorted_batches = text_perplexities(model, tokenizer, texts, batch_size=3)
    finally:
        handle.remove()
    np.testing.assert_allclose(sorted_batches, single, rtol=1e-5)
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    assert sum(rows_projected) == sum(n - 1 for n in tokens), "padding or last tokens went through the head"
    assert len(rows_projected) == 4  # ceil(10 / 3) batches
    # A head the forward never calls: every position is projected, then selected; same scores.
    unused = text_perplexities(model, tokenizer, texts, batch_size=3, head=torch.nn.Identity())
    np.testing.assert_allclose(unused, single, rtol=1e-5)


def test_perplexity_score_streams_a_file_and_truncates(tiny_model_dir, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    table = score_data(path, ("perplexity", {"model": str(tiny_model_dir), "batch_size": 3, "max_tokens": 6}))
    assert table.labels is None and len(table) == 4 and np.all(table.scores["perplexity"] > 1)
    full = score_data(path, ("perplexity", {"model": str(tiny_model_dir)}))
    assert not np.allclose(full.scores["perplexity"], table.scores["perplexity"])


def test_perplexity_refuses_images():
    with pytest.raises(PrunekitError, match="perplexity scores text"):
        score_data(np.zeros((4, 3, 8, 8)), "perplexity")


@pytest.mark.slow
def test_smollm2_rates_shuffled_wikipedia_above_the_original(tmp_path):
    from prunekit.core.text import wiki_articles

    paragraphs = [p for article in wiki_articles()[:10] for p in article.split("\n\n") if 300 < len(p) < 900][:6]
    rng = random.Random(0)
    shuffled = []
    for paragraph in paragraphs:
        words = paragraph.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    path = tmp_path / "wiki.txt"
    path.write_text("\n\n".join(paragraphs + shuffled) + "\n")
    table = score_data(path, "perplexity", text_unit="paragraph")
    values = table.scores["perplexity"]
    assert len(values) == 12
    assert np.all(values[6:] > 2 * values[:6])  # word salad is far less likely than the article
    assert np.all((values[:6] > 2) & (values[:6] < 200))


@pytest.mark.slow
def test_minilm_prototypes_put_the_off_topic_text_furthest(tmp_path):
    sport = [f"The {team} won the {game} match after a late goal" for team in ("home team", "visitors", "champions")
             for game in ("cup", "league", "derby")]
    money = [f"The {who} said {what} prices rose this quarter" for who in ("bank", "ministry", "analysts")
             for what in ("housing", "energy", "food")]
    texts = sport + money + ["def f(x): return x ** 2  # python code"]
    table = score_data(texts, ("prototypes", {"clusters": 2}))
    assert table.meta["scores"]["prototypes"]["settings"]["embedding"] == "auto"
    assert int(np.argmax(table.scores["prototypes"])) == len(texts) - 1


@pytest.mark.slow
def test_labelled_text_trains_a_proxy_on_sentence_embeddings(jsonl_file):
    from prunekit.data import ProxyConfig

    table = score_data(jsonl_file, ["el2n", "aum"], proxy=ProxyConfig(epochs=3, seeds=2, batch_size=4, lr=0.1))
    assert table.meta["proxy"]["inputs"].startswith("sentence embeddings")
    assert table.meta["proxy"]["model"] == "auto" and len(table) == 18
    assert np.corrcoef(table.scores["el2n"], -table.scores["aum"])[0, 1] > 0.5
