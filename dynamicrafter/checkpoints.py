"""Reading the released checkpoints and loading them into a :class:`DynamiCrafter`.

Accepted files: the released ``model.ckpt`` (``{"state_dict": ...}``), a bare state dict
(``.ckpt``/``.pt``/``.pth``/``.bin``), or ``.safetensors`` with the same keys in float32,
float16 or bfloat16. Pickled files are read with ``weights_only=True`` (a checkpoint can never
run code) and memory-mapped where the format allows. The model is built on the meta device
and the file's tensors are assigned to it, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from .configs import ModelConfig
from .diffusion.schedule import checkpoint_buffers
from .models.dynamicrafter import DynamiCrafter

logger = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4

#: Key renames applied on load: the released 256 checkpoint's name for the frame-stride embedding.
RENAMES = {"model.diffusion_model.framestride_embed.": "model.diffusion_model.fps_embedding."}


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model built from the config."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, keys renamed to this package's names."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The renamed state dict, and whether its tensors are memory-mapped from the file."""
    mapped = False
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                mapped = True
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many types; to the user they all mean "unreadable"
        raise CheckpointMismatchError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}).") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} holds no state dict of tensors.")
    renamed = {}
    for key, value in state.items():
        for old, new in RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
    return renamed, mapped


def _release_mapped_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the file pages behind a memory-mapped tensor that is no longer needed.

    Converting a memory-mapped float32 checkpoint to bfloat16 would otherwise keep every page
    of the file resident until the last tensor is done (3x the weights at peak, not ~1x).
    Only whole pages inside the tensor are released; they would be read again from the file
    if touched. Linux only; elsewhere a no-op.
    """
    if _LIBC is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def _check_schedule(state: dict[str, torch.Tensor], model: DynamiCrafter, path: Path) -> None:
    """Pop the stored schedule buffers and check them against the ones the config gives."""
    expected = checkpoint_buffers(model.config.diffusion)
    for key, value in expected.items():
        stored = state.pop(key, None)
        if stored is None:
            continue
        rtol = max(1e-4, 2 * torch.finfo(stored.dtype).eps)  # files converted to half precision keep rounding
        if stored.shape != value.shape or not torch.allclose(stored.float(), value, rtol=rtol, atol=1e-6):
            raise CheckpointMismatchError(
                f"The noise schedule in {path} ({key}) differs from the config's "
                f"({model.config.name}): is this the right config for this checkpoint?")


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_model(config: ModelConfig, checkpoint: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", vae_dtype: torch.dtype | None = None) -> DynamiCrafter:
    """Build the model for ``config`` and fill it from ``checkpoint``; strict about keys and shapes.

    Every tensor is converted to ``dtype`` (the VAE to ``vae_dtype`` if given) and moved to
    ``device`` one at a time while being assigned, so the host never holds a second full copy.
    """
    path = Path(checkpoint)
    state, mapped = _read(path)
    with torch.device("meta"):
        model = DynamiCrafter(config)
    _check_schedule(state, model, path)

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {_describe(unexpected)}")
        raise CheckpointMismatchError(f"{path} does not match the {config.name} model: {'; '.join(parts)}.")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointMismatchError(f"{path} does not match the {config.name} model: shapes differ for {_describe(wrong)}.")

    converted = {}
    for key in list(state):
        target = vae_dtype if vae_dtype is not None and key.startswith("first_stage_model.") else dtype
        tensor = state.pop(key)
        converted[key] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
        if mapped and converted[key].data_ptr() != tensor.data_ptr():
            _release_mapped_pages(tensor)
    model.load_state_dict(converted, assign=True)
    logger.info("Loaded %s (%d tensors) as %s on %s.", path, len(converted), dtype, device)
    return model.eval().requires_grad_(False)
