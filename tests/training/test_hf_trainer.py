"""The Hugging Face Trainer callback: masks exact at every step, squashed at the end, kept through a resume."""

import pytest
import torch

from prunekit.core.masks import pruned_count
from prunekit.training import GMP, SparsityCallback
from tests.conftest import tiny_llama


class Windows(torch.utils.data.Dataset):
    def __init__(self, count=16, length=24, vocab=512):
        self.ids = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _trainer(model, sparsifier, out, max_steps, probe=None):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    callbacks = [SparsityCallback(sparsifier)]
    if probe is not None:
        class Probe(TrainerCallback):
            def on_optimizer_step(self, args, state, control, **kwargs):
                probe()
        callbacks.append(Probe())
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, save_steps=3, save_strategy="steps", logging_strategy="no",
                             report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                             dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=Windows(), callbacks=callbacks)


def test_trainer_run_keeps_exact_masks_squashes_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(vocab=512)
    sparsifier = GMP(model, 0.5, "uniform", start_step=0, end_step=4, frequency=2)
    seen = []

    def probe():
        # the probe runs after SparsityCallback: the sparsifier has stepped for this optimizer step
        step = sparsifier.steps
        target = sparsifier.schedule.sparsity_at(step - step % 2 if step < 4 else 4)
        for layer in sparsifier.layers:
            assert layer.numel - layer.active == pruned_count(layer.numel, target)
            assert torch.all(layer.weight[~layer.mask] == 0)
        seen.append(step)

    trainer = _trainer(model, sparsifier, tmp_path / "run", 6, probe)
    trainer.train()
    assert seen == [1, 2, 3, 4, 5, 6]
    assert not any("parametrizations" in k for k in model.state_dict())  # squashed at the end
    final = {name: module.weight.detach().clone() for name, module in model.named_modules()
             if name in {l.name for l in sparsifier.layers}}
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, weight in final.items():
        assert torch.equal(reloaded.get_submodule(name).weight, weight)
        assert (weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)

    # resume from the mid-training checkpoint (masks attached when it was written)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "prunekit_sparsifier.pt").exists()
    fresh = tiny_llama(vocab=512, seed=1)  # different weights: everything must come from the checkpoint
    resumed = GMP(fresh, 0.5, "uniform", start_step=0, end_step=4, frequency=2)
    _trainer(fresh, resumed, tmp_path / "run", 6).train(resume_from_checkpoint=str(checkpoint))
    assert resumed.steps == 6
    for name, weight in final.items():
        again = fresh.get_submodule(name).weight
        assert torch.equal(again == 0, weight == 0), name
        assert torch.allclose(again, weight, atol=1e-6), name
