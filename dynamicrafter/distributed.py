"""Several processes, one run: the rank layout ``torchrun`` gives and the few collectives a run needs.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set) each process takes every
``world_size``-th job, runs on ``cuda:LOCAL_RANK`` (or the CPU), and joins a process group
(NCCL for CUDA tensors, gloo for CPU ones) only for the start and the final tally. Without
``torchrun`` everything here is a no-op for a single process. torch is imported only where a
collective or a device needs it, so reading the rank layout costs nothing.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, TypeVar

from .errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["Ranks", "init", "barrier", "sum_counts", "shutdown"]

T = TypeVar("T")

#: Ranks may finish their shares hours apart: the final tally waits that long for the slowest.
TALLY_TIMEOUT = datetime.timedelta(days=7)


def _env_int(name: str, default: int, world: int | None = None) -> int:
    """The whole number in the environment variable ``name`` (``default`` when unset).

    ``WORLD_SIZE`` (no ``world`` given) must be at least 1, a rank from 0 to ``world - 1``.
    """
    text = os.environ.get(name)
    if text is None:
        return default
    advice = "torchrun sets these, so unset them when not running under torchrun"
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not a whole number; {advice}.") from None
    if world is None and value < 1:
        raise UserError(f"{name}={text!r} must be at least 1; {advice}.")
    if world is not None and not 0 <= value < world:
        allowed = "0" if world == 1 else f"from 0 to {world - 1}"
        unset = " (unset)" if "WORLD_SIZE" not in os.environ else ""
        raise UserError(f"{name}={text!r} must be {allowed} when WORLD_SIZE is {world}{unset}; {advice}.")
    return value


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """The layout torchrun exports (one process when it is absent).

        Raises :class:`UserError` naming the variable and its value when one is not a whole number
        or does not fit the others (``0 <= RANK, LOCAL_RANK < WORLD_SIZE``).
        """
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0, world)
        return cls(rank, world, _env_int("LOCAL_RANK", rank, world))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world_size``-th, starting at ``rank`` (a fixed, order-preserving split)."""
        return list(items[self.rank :: self.world_size])

    def default_device(self) -> torch.device | None:
        """``cuda:LOCAL_RANK`` when CUDA is here and the run is distributed; else ``None`` (the usual choice)."""
        import torch

        if self.distributed and torch.cuda.is_available():
            return torch.device(f"cuda:{self.local_rank % torch.cuda.device_count()}")
        return None

    def device_for(self, name: str | torch.device | None) -> torch.device:
        """This process's device for the user's choice (checked by :func:`~dynamicrafter.runtime.resolve_device`).

        Under torchrun, no choice, ``auto`` or ``cuda`` means ``cuda:LOCAL_RANK``: one GPU per process.
        """
        from .runtime import resolve_device

        if self.distributed and (name is None or str(name) in ("cuda", "auto")):
            name = self.default_device() or name
        return resolve_device(name)


def init(ranks: Ranks) -> None:
    """Join the process group of a distributed run (no-op for one process)."""
    if not ranks.distributed:
        return
    import torch

    if torch.distributed.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world_size,
                                         timeout=TALLY_TIMEOUT)


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (no-op for one process); a CPU all-reduce, so it works on every backend."""
    sum_counts([0], ranks)


def sum_counts(counts: Sequence[int], ranks: Ranks) -> list[int]:
    """Element-wise sums of ``counts`` over every rank (the counts themselves for one process)."""
    if not ranks.distributed:
        return list(counts)
    import torch

    tensor = torch.tensor(list(counts), dtype=torch.long)
    torch.distributed.all_reduce(tensor)  # a CPU tensor: gloo carries it
    return tensor.tolist()


def shutdown(ranks: Ranks) -> None:
    if not ranks.distributed:
        return
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

