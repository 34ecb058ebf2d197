"""The tiny ControlNets' random weights, drawn from a seed (the recording in tests/data/controlnet.safetensors used these).

Drawn in sorted key order from ``torch.Generator().manual_seed(seed)``: every weight of two or
more dimensions ``randn / sqrt(fan_in)``, 1-D ``*.weight`` (norms) ``1 + 0.1 randn``, other
1-D tensors (biases) ``0.1 randn``. The zero-initialised layers of a fresh ControlNet get random
values too, so that every residual matters.
"""

from __future__ import annotations

import math

import torch


def seeded_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        value = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            value = value / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):
            value = 1.0 + 0.1 * value
        else:
            value = 0.1 * value
        state[key] = value
    return state
