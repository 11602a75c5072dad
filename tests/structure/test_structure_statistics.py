"""Gradient accumulation for Taylor scores: language-model batches are split into single samples
(to bound the memory of the vocabulary-wide logits) without changing the gradient."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit.structure.pipeline import classifier_calibration, lm_calibration
from prunekit.structure.statistics import accumulate_gradients


def test_one_sample_parts_give_the_whole_batch_gradient():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).double()
    windows = torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(1))
    calibration = lm_calibration(windows, batch_size=4)  # batches of 4 and 2: unequal shares
    names = [name for name, _ in model.named_parameters() if ".mlp." in name]
    sizes = []

    def loss_fn(model, batch, target):
        sizes.append(batch["input_ids"].shape[0])
        return calibration.loss_fn(model, batch, target)

    assert calibration.one_sample_gradients  # declared by the language-model calibration, not guessed
    split = accumulate_gradients(model, calibration.batches, loss_fn, names, one_sample_at_a_time=True)
    assert sizes == [1] * 6  # one window per backward pass
    for batch in calibration.batches:
        model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss.backward()
    whole = {name: parameter.grad for name, parameter in model.named_parameters() if name in names}
    assert set(split) == set(names)
    for name in names:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-10, atol=1e-14)


def test_classifier_batches_split_into_examples_with_their_labels():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    images, labels = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    calibration = classifier_calibration(images, labels, batch_size=4)
    seen = []
    split = accumulate_gradients(model, calibration.batches, calibration.loss_fn, ["0.weight"], calibration.targets,
                                 one_sample_at_a_time=True, each_sample=lambda g: seen.append(g["0.weight"].clone()))
    assert split == {} and len(seen) == 10
    for index, gradient in enumerate(seen):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images[index:index + 1]), labels[index:index + 1]).backward()
        torch.testing.assert_close(gradient, model[0].weight.grad, rtol=1e-12, atol=1e-15)


def test_batches_stay_whole_unless_the_calibration_says_otherwise():
    model = torch.nn.Linear(3, 2)
    sizes = []

    def loss_fn(model, batch, target):
        sizes.append(batch[0].shape[0])
        return model(batch[0]).square().mean()

    accumulate_gradients(model, [(torch.randn(5, 3),), (torch.randn(2, 3),)], loss_fn, ["weight"])
    assert sizes == [5, 2]
