"""Random scores: the baseline every criterion must beat. Seeded per family, so runs repeat."""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch

from prunekit.structure.importance.base import IMPORTANCE, Importance


@IMPORTANCE.register("random")
class RandomImportance(Importance):
    name: ClassVar[str] = "random"

    def score(self, family, context):
        generator = torch.Generator().manual_seed(context.seed * 1_000_003 + zlib.crc32(family.name.encode()))
        return torch.rand(family.size, generator=generator, dtype=torch.float64)
