"""Calibration across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Every rank runs the same block-by-block pipeline on its share of the calibration windows; the
statistics of each layer are summed across ranks before the layer is pruned, so every rank
prunes with the statistics of the whole calibration set and ends with the same weights.
Only rank 0 writes outputs.

Summing across ranks reorders float additions, so N ranks match one within a tolerance, not
bit for bit: identical masks, weights within rtol 1e-4 / atol 1e-6, perplexity within a
relative 1e-4 (docs/streaming.md; asserted by tests/core/test_distributed.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from prunekit.core.statistics import LayerStatistics
from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def share(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the calibration windows."""
        if windows.shape[0] < self.world_size:
            raise PrunekitError(f"{windows.shape[0]} calibration windows cannot be split across {self.world_size} "
                                "processes; use more windows or fewer processes")
        return torch.tensor_split(windows, self.world_size)[self.rank]

    def reduce_statistics(self, stats: LayerStatistics) -> None:
        for tensor in stats.accumulators():
            dist.all_reduce(tensor)
        rows = torch.tensor([stats.rows], dtype=torch.int64, device=stats.accumulators()[0].device)
        dist.all_reduce(rows)
        stats.rows = int(rows)

    def sum_floats(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_lists(self, values: list) -> list:
        """Every rank's list, concatenated in rank order (the order of ``share``)."""
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, values)
        return [item for part in gathered for item in part]

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, value):
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def from_environment(device: str = "cpu") -> ProcessGroup | None:
    """The process group set up by ``torchrun`` (WORLD_SIZE > 1), or None in a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())
