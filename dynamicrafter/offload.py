"""Keeping model components in host memory and lending them to the GPU while they run.

A lent component is copied to the device (from pinned memory, asynchronously) and, when it is
done, its host tensors are simply put back: nothing is copied back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import UserError

#: ``none``: everything on the device. ``encoders``: the CLIP towers and the resampler (used
#: once per call) stay in host memory. ``model``: every component does.
OFFLOAD_MODES = ("none", "encoders", "model")


def offload_mode(offload: bool | str | None, device: torch.device) -> str:
    """Normalise the user's ``offload`` choice; ``None`` is ``encoders`` on CUDA, ``none`` elsewhere."""
    if device.type != "cuda":
        return "none"
    if offload is None:
        return "encoders"
    if isinstance(offload, bool):
        return "model" if offload else "none"
    if offload not in OFFLOAD_MODES:
        raise UserError(f"Unknown offload mode {offload!r}; choose one of: {', '.join(OFFLOAD_MODES)}.")
    return offload


def _tensors(module: nn.Module) -> Iterator[tuple[dict, str]]:
    """(owner dict, name) of every parameter and buffer, so both can be swapped in place."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    yield store, name


class Offloader:
    """Places components on the device or in host memory and lends host ones to the device."""

    def __init__(self, device: torch.device, resident: Iterable[nn.Module], on_host: Iterable[nn.Module]) -> None:
        self.device = device
        self.on_host = list(on_host)
        for module in resident:
            module.to(device)
        for module in self.on_host:
            module.to("cpu")
            if device.type == "cuda":
                for store, name in _tensors(module):
                    store[name].data = store[name].data.pin_memory()

    @contextmanager
    def on_device(self, *modules: nn.Module) -> Iterator[None]:
        """Run the block with ``modules`` on the device; host-kept ones return to the host after.

        A lent module's parameters and buffers are swapped for device copies and the host
        tensors are put back afterwards: nothing is copied back, and the host copies (pinned on
        CUDA) are reused for the next lend.
        """
        lent = [m for m in modules if any(m is h for h in self.on_host)]
        saved = []
        for module in lent:
            for store, name in list(_tensors(module)):
                host = store[name]
                saved.append((store, name, host))
                moved = host.detach().to(self.device, non_blocking=True)
                store[name] = nn.Parameter(moved, host.requires_grad) if isinstance(host, nn.Parameter) else moved
        try:
            yield
        finally:
            for store, name, host in saved:
                store[name] = host
