"""Running under ``torchrun``: process group, ranks, and the few collectives the trainer needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (one process and rank 0 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

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
        t = torch.tensor([float(value)], device=device, dtype=torch.float64 if device.type != "mps" else torch.float32)
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

    Under torchrun each process takes ``cuda:<LOCAL_RANK>`` (NCCL) when CUDA is there and no
    other device was asked for, else the CPU (gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        from ..runtime import resolve_device

        dev = resolve_device(device)
        if dev.type == "cuda" and world > 1 and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local), dev


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
