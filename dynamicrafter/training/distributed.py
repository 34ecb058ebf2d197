"""The collectives a training run needs, on top of :mod:`dynamicrafter.distributed`'s rank layout.

The process group, ranks and device choice are the package's (:class:`~dynamicrafter.distributed.Ranks`);
training adds small all-reduces on the step's device and an all-gather of Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import distributed


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (one process and rank 0 without torchrun)."""

    ranks: distributed.Ranks = distributed.Ranks()

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world(self) -> int:
        return self.ranks.world_size

    @property
    def enabled(self) -> bool:
        return self.ranks.distributed

    @property
    def main(self) -> bool:
        return self.ranks.is_main

    def barrier(self) -> None:
        distributed.barrier(self.ranks)

    def all_max(self, value: float, device: torch.device) -> float:
        """The largest ``value`` over all ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def all_min_max(self, value: float, device: torch.device) -> tuple[float, float]:
        """The smallest and the largest ``value`` over all ranks (one collective)."""
        if not self.enabled:
            return value, value
        t = torch.tensor([-float(value), float(value)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return -t[0].item(), t[1].item()

    def all_sum(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], device=device)
        dist.all_reduce(t)
        return t.item()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init(device: str | None) -> tuple[Dist, torch.device]:
    """Join the process group when started by ``torchrun`` and pick this process's device.

    Under torchrun each process takes ``cuda:<LOCAL_RANK>`` when CUDA is there and no device was
    asked for, else the CPU; one process takes the package's default device.
    """
    ranks = distributed.Ranks.from_env()
    dev = ranks.device_for(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    distributed.init(ranks)
    return Dist(ranks), dev


def shutdown(d: Dist) -> None:
    distributed.shutdown(d.ranks)
