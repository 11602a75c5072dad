"""A Hugging Face ``Trainer`` callback that steps a sparsifier.

>>> sparsifier = prunekit.training.GMP(model, sparsity=0.5, end_step=1000, frequency=50)
>>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SparsityCallback(sparsifier)])

The sparsifier steps right after each optimizer step (``on_optimizer_step``: once per optimizer
step, whatever the gradient accumulation). Trainer checkpoints save the model with its masks (the
masks are persistent buffers of the parametrizations) and the sparsifier's own state beside them
(``prunekit_sparsifier.pt``); ``trainer.train(resume_from_checkpoint=...)`` restores both, so a
resumed run continues the same schedule. At the end of training the masks are squashed into the
weights (unless ``squash_at_end=False``), so ``trainer.save_model()`` writes a plain model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from prunekit.training.base import Sparsifier

SPARSIFIER_FILE = "prunekit_sparsifier.pt"


class SparsityCallback(TrainerCallback):
    def __init__(self, sparsifier: Sparsifier, squash_at_end: bool = True):
        self.sparsifier = sparsifier
        self.squash_at_end = squash_at_end

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.sparsifier.attach_optimizer(optimizer)
        if state.global_step and state.global_step != self.sparsifier.steps:
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / SPARSIFIER_FILE
            if saved.exists():
                self.sparsifier.load_state_dict(torch.load(saved, weights_only=True, map_location="cpu"))
            else:
                self.sparsifier.steps = state.global_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.step()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(self.sparsifier.state_dict(), folder / SPARSIFIER_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        self.sparsifier.attach_optimizer(None)
        if self.squash_at_end:
            self.sparsifier.squash()
