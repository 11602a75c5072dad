"""Zero-shot tasks from the wiki test articles: built deterministically from a seed, well formed, scored by
lm-eval exactly as a direct log-likelihood computation scores them."""

import pytest
import torch

from prunekit.core.text import wiki_articles_of
from prunekit.evaluate.tasks import (CONTINUATION, LASTWORD, TaskProtocol, continuation_examples, evaluate_tasks,
                                     lastword_examples)
from tests.conftest import tiny_llama

pytest.importorskip("lm_eval")

EXAMPLES = 12


@pytest.fixture(scope="module")
def articles():
    return list(wiki_articles_of("test"))


def test_examples_are_fixed_by_the_seed(articles):
    for build in (lastword_examples, continuation_examples):
        assert build(articles, 30, 0) == build(articles, 30, 0)
        assert build(articles, 30, 0) != build(articles, 30, 1)


def test_lastword_asks_a_word_seen_earlier(articles):
    for example in lastword_examples(articles, 50, 0):
        word = example["target"]
        assert word.startswith(" ") and word[1:].isalpha() and len(word) > 4
        assert word[1:] in example["context"] and not example["context"].endswith(" ")


def test_continuation_true_choice_continues_the_passage(articles):
    texts = [" ".join(article.split()) for article in articles]
    for example in continuation_examples(articles, 50, 0):
        assert len(example["choices"]) == 4 and len(set(example["choices"])) == 4
        true = example["choices"][example["label"]]
        assert any(example["context"] + true in text for text in texts)
        for other in example["choices"]:
            if other != true:  # a distractor comes from another article than the passage
                assert not any(example["context"] in text and other.strip() in text for text in texts)
    labels = [example["label"] for example in continuation_examples(articles, 200, 0)]
    assert all(labels.count(position) > 30 for position in range(4))  # the true answer moves around


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's causal scoring: encode context and context+continuation, score the continuation's tokens."""
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    target = whole[len(context_ids):]
    ids = torch.tensor([context_ids + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0]
    positions = range(len(context_ids) - 1, len(context_ids) - 1 + len(target))
    return float(sum(logprobs[p, t] for p, t in zip(positions, target)))


def test_lm_eval_scores_as_direct_loglikelihood(articles, tokenizer):
    model = tiny_llama(seed=3)
    scored = evaluate_tasks(model, tokenizer, TaskProtocol(tasks=(CONTINUATION, LASTWORD), examples=EXAMPLES))
    examples = continuation_examples(articles, EXAMPLES, 0)
    correct = [max(range(4), key=lambda i: _continuation_logprob(model, tokenizer, e["context"], e["choices"][i]))
               == e["label"] for e in examples]
    accuracy = sum(correct) / len(correct)
    assert scored[CONTINUATION]["accuracy"] == pytest.approx(accuracy)
    assert scored[CONTINUATION]["stderr"] == pytest.approx((accuracy * (1 - accuracy) / (EXAMPLES - 1)) ** 0.5)
    assert scored[LASTWORD]["examples"] == EXAMPLES and 0 <= scored[LASTWORD]["accuracy"] <= 1


@pytest.mark.slow
def test_dense_smollm2_well_above_chance_and_pruning_lowers_it(smollm2):
    """The tasks measure something: dense SmolLM2 far above chance, 70 % magnitude pruning much lower."""
    from prunekit.weights.pipeline import prune_weights
    from prunekit.weights.recipe import PruneSettings

    protocol = TaskProtocol(examples=100)
    dense = evaluate_tasks(smollm2.model, smollm2.tokenizer, protocol)
    assert dense[LASTWORD]["accuracy"] > 0.2 and dense[CONTINUATION]["accuracy"] > 0.5
    prune_weights(smollm2.model, PruneSettings.model_validate({"method": "magnitude", "ratio": 0.7}))
    pruned = evaluate_tasks(smollm2.model, smollm2.tokenizer, protocol)
    for name in (LASTWORD, CONTINUATION):
        assert pruned[name]["accuracy"] < dense[name]["accuracy"] - 2 * dense[name]["stderr"]
