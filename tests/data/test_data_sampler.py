"""The dynamic re-scoring sampler, with the shared training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import tiny_classifier

from prunekit.data.sampler import DynamicPruningSampler, model_scores
from prunekit.errors import PrunekitError
from prunekit.training.loop import train_classifier


@pytest.fixture()
def blobs():
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(60) % 3
    return torch.randn(60, 6, generator=generator) + labels[:, None].float(), labels


def test_observed_losses_cover_every_example_then_keep_the_hardest(blobs):
    inputs, labels = blobs
    sampler = DynamicPruningSampler(60, ratio=0.5, every=1, seed=0)
    seen_by_epoch, values_after = [], []
    model = tiny_classifier()

    def on_epoch(epoch):
        seen_by_epoch.append(sampler.seen.sum())
        values_after.append(sampler.values.copy())

    history = train_classifier(model, inputs, labels, epochs=4, batch_size=10, seed=0, sampler=sampler,
                               on_step=sampler.on_step, on_epoch=on_epoch)
    assert history.steps == 4 * 3  # 30 examples per epoch, batches of 10
    assert seen_by_epoch[0] == 30 and seen_by_epoch[1] == 60  # the unseen half comes first in epoch 1
    assert set(sampler.history[0]).isdisjoint(sampler.history[1])
    # from epoch 2 on, the kept half is the half with the highest last-seen loss (as it stood after epoch 1)
    losses = values_after[1]
    assert sorted(sampler.history[2].tolist()) == sorted(np.argsort(-losses)[:30].tolist())
    assert all(len(v) == 30 for v in sampler.history.values())


def test_rescore_every_k_epochs_with_the_current_model(blobs):
    inputs, labels = blobs
    model = tiny_classifier()
    calls = []

    def rescore(epoch):
        calls.append(epoch)
        return model_scores(model, inputs, labels, "el2n")

    sampler = DynamicPruningSampler(60, ratio=0.75, every=2, rescore=rescore, labels=labels.numpy(),
                                    balance="proportional", seed=3)
    train_classifier(model, inputs, labels, epochs=5, batch_size=8, seed=0, sampler=sampler)
    assert calls == [0, 2, 4]
    assert sorted(sampler.history) == [0, 2, 4]
    for subset in sampler.history.values():
        assert np.bincount(labels.numpy()[subset], minlength=3).tolist() == [5, 5, 5]
    last = model_scores(model, inputs, labels, "el2n")
    assert last.shape == (60,) and np.isfinite(last).all()


def test_the_sampler_is_reproducible_and_a_dataloader_sampler(blobs):
    from torch.utils.data import DataLoader, TensorDataset

    def orders(seed):
        sampler = DynamicPruningSampler(60, count=20, rescore=lambda epoch: np.arange(60.0), seed=seed)
        loader = DataLoader(TensorDataset(torch.arange(60)), batch_size=7, sampler=sampler)
        result = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            result.append([int(i) for (batch,) in loader for i in batch])
        return result

    first, again, other = orders(0), orders(0), orders(1)
    assert first == again and first != other
    assert sorted(first[0]) == list(range(40, 60))  # the 20 highest scores


def test_bad_sampler_settings():
    with pytest.raises(PrunekitError, match=r"\[0, 1\)"):
        DynamicPruningSampler(10, ratio=1.5)
    with pytest.raises(PrunekitError, match="at least 1 epoch"):
        DynamicPruningSampler(10, ratio=0.5, every=0)
    sampler = DynamicPruningSampler(10, ratio=0.5, rescore=lambda epoch: np.zeros(3))
    with pytest.raises(PrunekitError, match="shape"):
        sampler.set_epoch(0)


def test_model_scores_reads_what_a_model_alone_gives(blobs):
    inputs, labels = blobs
    model = tiny_classifier()
    with torch.no_grad():
        logits = model(inputs).double()
    expected = torch.softmax(logits, dim=1).max(dim=1).values.numpy()  # the confidence of the model as it is
    np.testing.assert_allclose(model_scores(model, inputs, labels, "confidence"), expected, rtol=1e-6)
    # forgetting reads the proxy's training, which a model as it is has not got; random reads no model
    for score in ("forgetting", "random"):
        with pytest.raises(PrunekitError, match=f"model_scores reads a score of the model as it is "
                                                f"\\(confidence, el2n, entropy, grand, loss, prototypes\\), not '{score}'"):
            model_scores(model, inputs, labels, score)
