"""Every score against an independent hand computation, on tiny models where exactness can be checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_helpers import fast_proxy, tiny_classifier

from prunekit.data import ProxyConfig, score_data
from prunekit.data.proxy import build_model
from prunekit.data.scores.aum import margins
from prunekit.data.scores.prototypes import prototype_distances
from prunekit.data.scores.vog import class_normalise
from prunekit.errors import PrunekitError
from prunekit.training.loop import make_optimizer, train_classifier


@pytest.fixture()
def blobs():
    """Three noisy classes in 6 dimensions."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(90) % 3
    inputs = torch.randn(90, 6, generator=generator) + 1.5 * F.one_hot(labels, 6).float()
    return inputs, labels


def given(model) -> ProxyConfig:
    return ProxyConfig(model=model, train=False)


def test_el2n_equals_hand_computation_on_a_given_model(blobs):
    inputs, labels = blobs
    model = tiny_classifier()
    table = score_data((inputs, labels), "el2n", proxy=given(model))
    expected = []
    with torch.no_grad():
        for x, y in zip(inputs, labels):
            p = torch.softmax(model(x[None]).double(), dim=1)[0]
            onehot = torch.zeros(3, dtype=torch.float64)
            onehot[y] = 1.0
            expected.append(math.sqrt(float(((p - onehot) ** 2).sum())))
    np.testing.assert_allclose(table.scores["el2n"], expected, rtol=1e-6)
    assert table.meta["scores"]["el2n"]["harder"] == "higher"


def test_grand_equals_per_example_autograd(blobs):
    inputs, labels = blobs
    model = tiny_classifier()
    table = score_data((inputs, labels), "grand", proxy=given(model))
    expected = []
    for x, y in zip(inputs, labels):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        expected.append(float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))))
    np.testing.assert_allclose(table.scores["grand"], expected, rtol=1e-5)


def test_loss_confidence_entropy_by_hand(blobs):
    inputs, labels = blobs
    model = tiny_classifier()
    table = score_data((inputs, labels), ["loss", "confidence", "entropy"], proxy=given(model))
    with torch.no_grad():
        logits = model(inputs).double()
    p = torch.softmax(logits, dim=1)
    np.testing.assert_allclose(table.scores["loss"], F.cross_entropy(logits, labels, reduction="none"), rtol=1e-5)
    np.testing.assert_allclose(table.scores["confidence"], p.max(dim=1).values, rtol=1e-6)
    np.testing.assert_allclose(table.scores["entropy"], -(p * p.log()).sum(dim=1), rtol=1e-6)
    assert table.meta["scores"]["confidence"]["harder"] == "lower"


def test_confidence_and_entropy_rank_unlabelled_data_with_a_given_model(blobs):
    inputs, _ = blobs
    table = score_data(inputs, ["confidence", "entropy"], proxy=given(tiny_classifier()))
    assert table.labels is None and len(table) == 90
    with pytest.raises(PrunekitError, match="needs labels"):
        score_data(inputs, "el2n", proxy=given(tiny_classifier()))


def test_margins_by_hand():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0]])
    assert margins(logits, torch.tensor([0, 0])).tolist() == [1.0, -2.5]


def _replay(config: ProxyConfig, inputs, labels, seed):
    """The proxy run re-done by hand: the batches' logits at every step, and input gradients per epoch."""
    model = build_model(config, inputs, 3, seed)
    optimizer = make_optimizer(model, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    steps, gradients = [], []

    def per_epoch(_epoch):
        model.eval()
        rows = []
        for x, y in zip(inputs, labels):
            x = x[None].clone().requires_grad_(True)
            model(x)[0, y].backward()
            rows.append(x.grad[0].clone())
        gradients.append(torch.stack(rows))
        model.train()

    train_classifier(model, inputs, labels, epochs=config.epochs, batch_size=config.batch_size, optimizer=optimizer,
                     seed=seed, on_step=lambda info: steps.append((info.indices.clone(), info.logits.clone())),
                     on_epoch=per_epoch)
    return steps, gradients


def test_training_dynamics_scores_match_a_replayed_run(blobs):
    """Forgetting, AUM and VoG computed independently from a replay of the same seeded run."""
    inputs, labels = blobs
    config = ProxyConfig(model=lambda: tiny_classifier(seed=7), epochs=4, seeds=1, batch_size=16, lr=0.3)
    table = score_data((inputs, labels), ["forgetting", "aum", "vog"], proxy=config)
    torch.manual_seed(0)
    steps, gradients = _replay(config, inputs, labels, seed=0)
    history: list[list[bool]] = [[] for _ in range(90)]
    margin_sum = np.zeros(90)
    for indices, logits in steps:
        for i, row in zip(indices.tolist(), logits):
            history[i].append(int(row.argmax()) == int(labels[i]))
            others = row.clone()
            others[labels[i]] = -math.inf
            margin_sum[i] += float(row[labels[i]] - others.max())
    forgetting = [sum(a and not b for a, b in zip(h, h[1:])) if any(h) else len(h) for h in history]
    np.testing.assert_array_equal(table.scores["forgetting"], forgetting)
    np.testing.assert_allclose(table.scores["aum"], margin_sum / 4, rtol=1e-5, atol=1e-6)
    stacked = torch.stack(gradients).double().numpy()  # (checkpoints, examples, features)
    raw = stacked.std(axis=0).mean(axis=1)
    np.testing.assert_allclose(table.scores["vog"], class_normalise(raw, labels.numpy()), rtol=1e-4, atol=1e-5)
    assert sorted(set(forgetting)) != [0], "the replay must contain forgetting events to test anything"


def test_class_normalise_is_a_z_score_within_classes():
    values = np.array([1.0, 3.0, 10.0, 30.0, 5.0])
    labels = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(class_normalise(values, labels), [-1, 1, -1, 1, 0])


def test_scores_are_averaged_over_seeds(blobs):
    inputs, labels = blobs

    def run(**kwargs):
        config = ProxyConfig(model="mlp", mlp_hidden=(8,), epochs=2, batch_size=16, **kwargs)
        return score_data((inputs, labels), ["el2n", "aum"], proxy=config).scores

    both = run(seeds=2)
    first, second = run(seeds=1, first_seed=0), run(seeds=1, first_seed=1)
    for name in ("el2n", "aum"):
        np.testing.assert_allclose(both[name], (first[name] + second[name]) / 2, rtol=1e-12)
        assert not np.allclose(first[name], second[name])


def test_scoring_is_deterministic_with_a_seed(fmnist_small):
    images, labels = fmnist_small
    data = (images[:200], labels[:200])
    names = ["el2n", "grand", "forgetting", "aum", "prototypes", "random"]
    first = score_data(data, names, proxy=fast_proxy(seeds=1), seed=3)
    second = score_data(data, names, proxy=fast_proxy(seeds=1), seed=3)
    for name in names:
        assert np.array_equal(first.scores[name], second.scores[name]), name
    other = score_data(data, "random", seed=4)
    assert not np.array_equal(other.scores["random"], first.scores["random"])


def test_prototype_distances_put_the_outlier_last():
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    points = np.concatenate([centres[0] + 0.05 * rng.normal(size=(20, 3)), centres[1] + 0.05 * rng.normal(size=(20, 3)),
                             [[0.0, 0.0, 1.0]]])
    distances = prototype_distances(points, clusters=2, seed=0)
    assert distances.argmax() == 40
    assert np.all(distances >= -1e-12) and np.all(distances <= 2)
    assert np.array_equal(distances, prototype_distances(points, clusters=2, seed=0))


def test_label_noise_is_found_by_aum_and_el2n(fmnist_small):
    """On real images, flipped labels get the lowest AUM and the highest EL2N (what the papers use them for)."""
    images, labels = fmnist_small
    noisy = labels.clone()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(labels), size=40, replace=False)
    noisy[flipped] = (noisy[flipped] + 1 + torch.from_numpy(rng.integers(0, 9, size=40))) % 10
    assert bool((noisy[flipped] != labels[flipped]).all())
    table = score_data((images, noisy), ["aum", "el2n"], proxy=fast_proxy(epochs=3, seeds=1))
    is_flipped = np.zeros(len(labels), dtype=bool)
    is_flipped[flipped] = True
    lowest_aum = np.argsort(table.scores["aum"])[:80]
    highest_el2n = np.argsort(-table.scores["el2n"])[:80]
    # 40 flipped among 800 (5 %); a random pick of 80 holds 4 of them on average
    assert is_flipped[lowest_aum].sum() >= 20
    assert is_flipped[highest_el2n].sum() >= 15


def test_score_settings_are_validated_in_one_line_when_built(blobs):
    from prunekit.data import SCORES

    for spec in ({"el2n": {"epochs": 1}}, {"name": "el2n", "epochs": 1}, ("el2n", {"epochs": 1})):
        with pytest.raises(PrunekitError) as caught:
            score_data((blobs[0], blobs[1]), spec)
        assert str(caught.value) == "data score el2n has no setting 'epochs'; its settings are: epoch"
    with pytest.raises(PrunekitError, match="^data score el2n: epoch: Input should be a valid integer"):
        SCORES.build("el2n", epoch="one")
    with pytest.raises(PrunekitError, match="^data score el2n: epoch: Input should be greater than or equal to 0$"):
        SCORES.build({"el2n": {"epoch": -1}})
    with pytest.raises(PrunekitError, match="^data score prototypes: embedding: Input should be 'auto', 'proxy'"):
        SCORES.build({"prototypes": {"embedding": "pixels"}})
    with pytest.raises(PrunekitError, match="unknown data score"):
        SCORES.build("el3n")
    assert SCORES.build({"vog": {"every": 2}}).settings() == {"name": "vog", "every": 2, "class_normalised": True}
    inputs, labels = blobs
    with pytest.raises(PrunekitError, match="raise --epochs"):
        score_data((inputs, labels), ("el2n", {"epoch": 5}), proxy=ProxyConfig(model="mlp", epochs=2, seeds=1))
    with pytest.raises(PrunekitError, match="at least 2 proxy epochs"):
        score_data((inputs, labels), "forgetting", proxy=ProxyConfig(model="mlp", epochs=1, seeds=1))
    with pytest.raises(PrunekitError, match="listed twice"):
        score_data((inputs, labels), ["random", "random"])


def test_the_users_own_model_and_loss(blobs):
    inputs, labels = blobs

    def smoothed(logits, targets):
        return F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.2)

    model = tiny_classifier()
    table = score_data((inputs, labels), ["loss", "grand"], proxy=ProxyConfig(model=model, train=False, loss_fn=smoothed))
    with torch.no_grad():
        expected = smoothed(model(inputs), labels)
    np.testing.assert_allclose(table.scores["loss"], expected, rtol=1e-5)
    model.zero_grad()
    smoothed(model(inputs[:1]), labels[:1]).sum().backward()
    first = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
    assert table.scores["grand"][0] == pytest.approx(first, rel=1e-5)
    # a factory is trained per seed with the same loss; the given module itself is never modified
    before = [p.detach().clone() for p in model.parameters()]
    trained = score_data((inputs, labels), "el2n", proxy=ProxyConfig(model=model, epochs=1, seeds=2, loss_fn=smoothed))
    assert trained.meta["proxy"]["loss"] == "smoothed" and trained.meta["proxy"]["model"] == "Sequential"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_what_a_score_needs_decides_how_it_runs():
    from prunekit.data import SCORES
    from prunekit.data.base import Score

    kinds = {name: SCORES.get(name).needs for name in SCORES.names()}
    assert {name for name, needs in kinds.items() if "labels" in needs} == {"aum", "el2n", "forgetting", "grand",
                                                                            "loss", "vog"}
    assert {name for name, needs in kinds.items() if "proxy_training" in needs} == {"aum", "forgetting", "vog"}
    assert not SCORES.build("random").uses_proxy(None) and not SCORES.build("perplexity").uses_proxy(None)
    assert SCORES.build("el2n").uses_proxy(None)
    with pytest.raises(TypeError, match="needs 'label', which is not one of"):
        class Misspelt(Score):
            needs = frozenset({"label"})
