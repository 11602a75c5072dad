"""Knorm (Devoto et al., 2024): keys with a small L2 norm draw the most attention, so the largest-norm keys go."""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.kv.base import METHODS, KVMethod, PrefillView


@METHODS.register("knorm")
class Knorm(KVMethod):
    summary: ClassVar[str] = "drop the keys of largest L2 norm"

    def score(self, view: PrefillView) -> torch.Tensor:
        return -torch.linalg.vector_norm(view.keys.float(), dim=-1)
