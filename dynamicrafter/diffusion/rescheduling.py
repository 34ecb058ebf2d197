"""FreeNoise's noise rescheduling: long-range correlated starting noise for windowed videos.

The first ``size`` frames keep their own noise; every later block of ``stride`` frames is a
shuffled copy of the block ``size`` frames earlier (already rescheduled itself when it lies past
the first window), so that every window of the video starts from a permutation of the same
noise frames. The shuffles are drawn from the call's generator: one seed, one video.
"""

from __future__ import annotations

import torch

__all__ = ["block_permutations", "reschedule_noise"]


def block_permutations(frames: int, size: int, stride: int,
                       generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One shuffle of ``range(stride)`` per block of ``stride`` frames after the first window, in order.

    Drawn with :func:`torch.randperm` on the generator's device (the CPU without one).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return [torch.randperm(stride, generator=generator, device=device).cpu() for _ in range(size, frames, stride)]


def reschedule_noise(noise: torch.Tensor, size: int, stride: int, permutations: list[torch.Tensor]) -> torch.Tensor:
    """``noise`` ``[B, C, T, h, w]`` with each block after the first window replaced (see the module).

    ``permutations`` come from :func:`block_permutations`. A last block shorter than ``stride``
    (when ``(T - size) % stride`` is not 0; FreeNoise leaves that case undefined) takes the first
    entries of its shuffle.
    """
    out = noise.clone()
    frames = noise.shape[2]
    starts = range(size, frames, stride)
    if len(permutations) != len(starts):
        raise ValueError(f"expected {len(starts)} permutations, got {len(permutations)}")
    for start, permutation in zip(starts, permutations):
        count = min(stride, frames - start)
        sources = (start - size + permutation[:count]).to(noise.device)
        out[:, :, start:start + count] = out[:, :, sources]
    return out
