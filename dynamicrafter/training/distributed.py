"""The collectives a training run needs, on top of :mod:`dynamicrafter.distributed`'s rank layout.

The process group, ranks and device choice are the package's (:class:`~dynamicrafter.distributed.Ranks`);
training adds small all-reduces on the step's device and an all-gather of Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .. import distributed
from ..errors import UserError


@dataclass(frozen=True)
class Dist(distributed.Ranks):
    """This process's place in the run (:class:`~dynamicrafter.distributed.Ranks`) and the collectives training uses."""

    def barrier(self) -> None:
        distributed.barrier(self)

    def reduce(self, values: Sequence[float], device: torch.device, op: str = "sum") -> list[float]:
        """Element-wise ``"sum"`` or ``"max"`` of ``values`` over all ranks, in one collective on ``device``."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def check_all(self, error: str | None) -> None:
        """Raise the first rank's ``error`` (one sentence) as a :class:`UserError` on every rank, so none
        waits for a rank that stopped; nothing when no rank has one."""
        errors = [e for e in self.gather_objects(error) if e]
        if errors:
            raise UserError(errors[0])

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init(device: str | None) -> tuple[Dist, torch.device]:
    """Join the process group when started by ``torchrun`` and pick this process's device.

    Under torchrun each process takes ``cuda:<LOCAL_RANK>`` when CUDA is there and no device was
    asked for, else the CPU; one process takes the package's default device.
    """
    ranks = Dist.from_env()
    dev = ranks.device_for(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    distributed.init(ranks)
    return ranks, dev


def shutdown(d: Dist) -> None:
    distributed.shutdown(d)
