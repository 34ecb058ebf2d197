"""Reading DynamiCrafter-family checkpoints and loading them into a :class:`DynamiCrafter`.

Accepted files: the released ``model.ckpt`` (``{"state_dict": ...}``), a bare state dict
(``.ckpt``/``.pt``/``.pth``/``.bin``), the original trainer's DeepSpeed layout
(``{"module": {"_forward_module.<key>": ...}}``), or ``.safetensors`` with the same keys in float32,
float16 or bfloat16 (the community's "pruned" files among them). Pickled files are read with
``weights_only=True`` (a checkpoint can never run code) and memory-mapped where the format
allows. The model is built on the meta device and the file's tensors are assigned to it, so
loading never holds two copies of the weights.

A checkpoint may leave out the OpenCLIP towers (``cond_stage_model.*``, ``embedder.*``); they are
then taken from an OpenCLIP state dict (``clip_checkpoint``, or the released models' own
ViT-H-14 weights from the Hugging Face cache). It may also leave out the noise-schedule buffers,
which are always computed from the config. Every other difference between the file and the
model is an error of one sentence naming the file, what it seems to be and what to do.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import pickle
import re
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file

from .configs import ModelConfig
from .diffusion.schedule import checkpoint_buffers
from .errors import UserError

if TYPE_CHECKING:  # the model stack (open_clip, kornia) is imported only to build a model
    from .models.dynamicrafter import DynamiCrafter

logger = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4

#: Key renames applied on load: the released 256 checkpoint's name for the frame-stride embedding.
RENAMES = {"model.diffusion_model.framestride_embed.": "model.diffusion_model.fps_embedding."}
#: The checkpoint prefixes of the two OpenCLIP towers: text (CLIPTextEncoder), image (CLIPImageEncoder).
CLIP_TOWERS = ("cond_stage_model.", "embedder.")
UNET_PREFIX = "model.diffusion_model."
#: Only ToonCrafter's VAE decoder (``AutoencoderKL_Dualref``) has these: its reference-frame attention.
TOONCRAFTER_DECODER = "first_stage_model.decoder.attn_refinement."
#: In every temporal convolution's name (the original's spelling): only video UNets have them.
TEMPORAL_MARK = ".temopral_conv."
_DEEPSPEED_PREFIX = "_forward_module."
_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


class CheckpointMismatchError(UserError):
    """A checkpoint cannot be read, or does not fit the model built from the config."""


class CheckpointNotFoundError(CheckpointMismatchError, FileNotFoundError):
    """The checkpoint file does not exist."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, keys renamed to this package's names."""
    return _rename(_read(Path(path))[0])


def read_release_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a checkpoint file under the names stored in it (the release names).

    Returns the state dict and whether its tensors are memory-mapped from the file.
    """
    return _read(Path(path))


def _rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        for old, new in RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
    return renamed


def _first_line(exc: BaseException) -> str:
    """The informative line of an error message: PyTorch's weights-only advice around it is left out."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _check_path(path: Path) -> None:
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        except OSError:
            inside = []
        hint = f"give the file inside it ({', '.join(inside[:3])})" if inside else "it holds no checkpoint file"
        raise CheckpointMismatchError(f"Checkpoint {path} is a folder, not a file; {hint}.")
    if not path.is_file():
        raise CheckpointNotFoundError(f"Checkpoint {path} does not exist.")


def _unpickle(path: Path) -> tuple[object, bool]:
    """``torch.load`` without running code; memory-mapped unless the file is in the legacy format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # the legacy (non-zip) format cannot be memory-mapped
            raise
    return torch.load(path, map_location="cpu", weights_only=True), False


def _read(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict under the stored key names, and whether its tensors are memory-mapped from the file."""
    _check_path(path)
    try:
        if path.suffix == ".safetensors":
            content, mapped = load_file(str(path)), True
        else:
            content, mapped = _unpickle(path)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise CheckpointMismatchError(
                f"{path} is not a readable checkpoint (UnpicklingError: {_first_line(exc)}).") from None
        raise CheckpointMismatchError(
            f"{path} was refused: loading it would call {found[1]}, and checkpoints are only read without running "
            "code; use a .safetensors copy, or re-save its state dict from a copy you trust.") from None
    except Exception as exc:  # unpickling raises many types; to the user they all mean "unreadable"
        raise CheckpointMismatchError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {_first_line(exc)}).") from None
    return _state_dict_of(content, path), mapped


def _is_tensor_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _state_dict_of(content: object, path: Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded file, or an error saying what the file holds instead."""
    if isinstance(content, Mapping) and _is_tensor_dict(content.get("state_dict")):
        return dict(content["state_dict"])  # the release layout (a Lightning checkpoint)
    if isinstance(content, Mapping) and _is_tensor_dict(content.get("module")):
        # The original trainer's DeepSpeed layout: every key behind "_forward_module.".
        module = content["module"]
        return {k[len(_DEEPSPEED_PREFIX):] if k.startswith(_DEEPSPEED_PREFIX) else k: v for k, v in module.items()}
    if _is_tensor_dict(content):
        return dict(content)
    if isinstance(content, Mapping) and "state" in content and "param_groups" in content:
        raise CheckpointMismatchError(
            f"{path} is an optimizer state (state, param_groups) saved during training, not model weights; "
            "give the model's checkpoint instead.")
    if isinstance(content, Mapping) and ({"optimizer", "optimizer_states", "optimizer_state_dict"} & set(content)):
        keys = ", ".join(sorted(str(k) for k in content)[:6])
        raise CheckpointMismatchError(
            f"{path} is a training state ({keys}) without a model state dict under 'state_dict'; "
            "give the model's checkpoint instead.")
    raise CheckpointMismatchError(f"{path} holds no state dict of tensors.")


def wrong_file_message(state: Mapping[str, torch.Tensor], path: Path) -> str | None:
    """A sentence saying what the file is when it is recognisably not a DynamiCrafter checkpoint."""
    lora = sorted(k for k in state if "lora" in k.lower())
    if lora:
        if any(".base_layer." in k for k in state):
            return (f"{path} holds a model with unmerged LoRA layers (peft keys such as {lora[0]}); merge them "
                    "(peft's merge_and_unload) and save the merged model's state dict.")
        return (f"{path} is a LoRA adapter ({len(state)} tensors such as {lora[0]}), not a model checkpoint; "
                "give the full model's checkpoint instead.")
    if any(k.startswith(UNET_PREFIX) for k in state):
        return None
    if any(k.endswith("input_hint_block.0.weight") or k == "controlnet_cond_embedding.conv_in.weight" for k in state):
        return (f"{path} is a ControlNet or sketch encoder, not a model checkpoint; give it as the control "
                "(load_controlnet, --control) and the model's checkpoint as the model.")
    if any(k.startswith(("visual.", "transformer.resblocks.")) for k in state):
        return (f"{path} is an OpenCLIP model (the CLIP towers only), not a DynamiCrafter checkpoint; "
                "pass it as clip_checkpoint (--clip_checkpoint) and give the model's checkpoint.")
    return (f"{path} is not a DynamiCrafter checkpoint: it has no UNet weights ({UNET_PREFIX}*) "
            f"among its {len(state)} tensors, such as {next(iter(state), 'none')}.")


def _check_family(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: Path,
                  config: ModelConfig) -> None:
    """Say which kind of model the file is when it is of a neighbouring family.

    An image model (Stable Diffusion) shares the UNet's key names but has no temporal layers;
    ToonCrafter and DynamiCrafter checkpoints differ in their VAE decoder.
    """
    if any(TEMPORAL_MARK in k for k in own) and not any(TEMPORAL_MARK in k for k in state):
        raise CheckpointMismatchError(
            f"{path} is an image diffusion (Stable Diffusion) checkpoint: its UNet has no temporal layers; "
            "give a DynamiCrafter checkpoint.")
    file_toon = any(k.startswith(TOONCRAFTER_DECODER) for k in state)
    model_toon = any(k.startswith(TOONCRAFTER_DECODER) for k in own)
    if file_toon and not model_toon:
        raise CheckpointMismatchError(
            f"{path} is a ToonCrafter checkpoint (its VAE decoder is ToonCrafter's), not one for the "
            f"{config.name} model; load it with the tooncrafter model.")
    if model_toon and not file_toon and any(k.startswith("first_stage_model.decoder.") for k in state):
        raise CheckpointMismatchError(
            f"{path} is a DynamiCrafter checkpoint without ToonCrafter's VAE decoder; load it with the "
            "256, 512, 1024 or 512_interp model, not the ToonCrafter one.")


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the file pages behind a memory-mapped tensor that is no longer needed.

    Converting a memory-mapped float32 checkpoint to bfloat16 would otherwise keep every page
    of the file resident until the last tensor is done (3x the weights at peak, not ~1x).
    Only whole pages inside the tensor are released; they would be read again from the file
    if touched. Linux only; elsewhere a no-op. Never call it on memory that is not a file mapping.
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
    """Pop the stored schedule buffers and check them against the ones the config gives (absent ones are fine)."""
    expected = checkpoint_buffers(model.config.diffusion)
    for key, value in expected.items():
        stored = state.pop(key, None)
        if stored is None:
            continue
        if not stored.is_floating_point():
            raise CheckpointMismatchError(f"{path} stores the schedule buffer {key} as {stored.dtype}; the file is damaged.")
        rtol = max(1e-4, 2 * torch.finfo(stored.dtype).eps)  # files converted to half precision keep rounding
        if stored.shape != value.shape or not torch.allclose(stored.float(), value, rtol=rtol, atol=1e-6):
            raise CheckpointMismatchError(
                f"The noise schedule in {path} ({key}) differs from the config's "
                f"({model.config.name}): is this the right config for this checkpoint?")


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_clip_towers(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The two CLIP towers under this package's checkpoint names, from an OpenCLIP state dict.

    ``path`` holds an ``open_clip.CLIP`` state dict (open_clip's own layout: ``visual.*``,
    ``transformer.*``, ``token_embedding.weight``, ...; a ``module.`` prefix and a ``state_dict``
    wrapper are accepted), or a DynamiCrafter checkpoint whose towers are taken as they are.
    Returns ``{"cond_stage_model.model.*": ..., "embedder.model.*": ...}`` and whether the
    tensors are memory-mapped from the file.
    """
    path = Path(path)
    try:
        state, mapped = _read(path)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"CLIP checkpoint {path} does not exist.") from None
    if any(k.startswith(CLIP_TOWERS) for k in state):
        return {k: v for k, v in state.items() if k.startswith(CLIP_TOWERS)}, mapped
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not any(k.startswith("visual.") for k in state) or not any(k.startswith("transformer.") for k in state):
        raise CheckpointMismatchError(
            f"{path} is not an OpenCLIP model: it lacks the text (transformer.*) or vision (visual.*) tower; "
            "give the OpenCLIP ViT-H-14 laion2b_s32b_b79k weights (open_clip_model.safetensors).")
    return open_clip_to_towers(state), mapped


def open_clip_to_towers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``open_clip.CLIP`` state dict as the checkpoint's two towers, cut as the released files cut them."""
    from .models.encoders import CLIPImageEncoder, CLIPTextEncoder

    towers = {}
    for prefix, encoder in zip(CLIP_TOWERS, (CLIPTextEncoder, CLIPImageEncoder)):
        towers.update({prefix + k: v for k, v in encoder.state_from_open_clip(state).items()})
    return towers


def _complete_towers(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: Path,
                     config: ModelConfig, clip_checkpoint: str | Path | None
                     ) -> tuple[Path | None, tuple[str, ...], set[str], bool]:
    """Add the CLIP towers the checkpoint leaves out, from ``clip_checkpoint`` or the Hub cache.

    Returns the file they came from (``None`` when the checkpoint has both), the prefixes of the
    towers taken from it, the keys added and whether their tensors are memory-mapped.
    """
    absent = [p for p in CLIP_TOWERS if any(k.startswith(p) for k in own) and not any(k.startswith(p) for k in state)]
    if not absent:
        if clip_checkpoint is not None:
            logger.warning("%s has its own CLIP towers; clip_checkpoint %s is not used.", path, clip_checkpoint)
        return None, (), set(), False
    names = ", ".join(p + "*" for p in absent)
    if clip_checkpoint is None:
        from .hub import CLIP_WEIGHTS, ensure_clip_weights  # the download stack is only needed here

        if config.clip.arch in CLIP_WEIGHTS:  # else ensure_clip_weights says that none are known
            logger.info("%s has no CLIP towers (%s); taking them from the OpenCLIP %s %s weights.",
                        path, names, config.clip.arch, CLIP_WEIGHTS[config.clip.arch][0])
        clip_path = ensure_clip_weights(config.clip.arch)
    else:
        clip_path = Path(clip_checkpoint)
        logger.info("%s has no CLIP towers (%s); taking them from %s.", path, names, clip_path)
    towers, mapped = read_clip_towers(clip_path)
    added = {k for k in towers if k.startswith(tuple(absent)) and k in own}  # an OpenCLIP file may hold more
    state.update({k: towers[k] for k in added})
    return clip_path, tuple(absent), added, mapped


def _check_keys(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: Path,
                config: ModelConfig, clip_path: Path | None, clip_towers: tuple[str, ...], from_clip: set[str]) -> None:
    """Keys, shapes and dtypes of the file against the model; one sentence naming what differs."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if clip_path is not None and missing and all(k.startswith(clip_towers) for k in missing):
        raise CheckpointMismatchError(
            f"{clip_path} lacks {len(missing)} of the CLIP towers' tensors ({_describe(missing)}); give the OpenCLIP "
            f"{config.clip.arch} weights the model was trained with.")
    if missing and not unexpected:
        raise CheckpointMismatchError(
            f"{path} is missing {len(missing)} of the {config.name} model's tensors ({_describe(missing)}); "
            "the file is incomplete or for another model: download or convert it again, or check the config.")
    if missing or unexpected:
        parts = [f"missing {_describe(missing)}"] if missing else []
        parts += [f"unexpected {_describe(unexpected)}"] if unexpected else []
        raise CheckpointMismatchError(f"{path} does not match the {config.name} model: {'; '.join(parts)}.")
    wrong = [k for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        culprit = clip_path if all(k in from_clip for k in wrong) else path
        what = _describe([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong])
        raise CheckpointMismatchError(f"{culprit} does not match the {config.name} model: shapes differ for {what}.")
    not_float = [k for k, v in own.items() if v.is_floating_point() and not state[k].is_floating_point()]
    if not_float:
        key = not_float[0]
        culprit = clip_path if key in from_clip else path
        raise CheckpointMismatchError(
            f"{culprit} stores {key} as {state[key].dtype} where the {config.name} model needs floating-point "
            "weights; the file is damaged or not a model checkpoint.")


def load_model(config: ModelConfig, checkpoint: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", vae_dtype: torch.dtype | None = None,
               clip_checkpoint: str | Path | None = None) -> DynamiCrafter:
    """Build the model for ``config`` and fill it from ``checkpoint``; strict about keys, shapes and dtypes.

    Every tensor is converted to ``dtype`` (the VAE to ``vae_dtype`` if given) and moved to
    ``device`` one at a time while being assigned, so the host never holds a second full copy.

    Args:
        clip_checkpoint: where to take the CLIP towers from when ``checkpoint`` leaves them out
            (an OpenCLIP state dict file, see :func:`read_clip_towers`); default the OpenCLIP
            weights the released models were trained with (ViT-H-14 ``laion2b_s32b_b79k``),
            downloaded once into the Hugging Face cache.
    Raises:
        CheckpointMismatchError: a file is missing, unreadable or does not fit the model
            (a ``ValueError`` of one sentence).
        dynamicrafter.hub.CheckpointError: the CLIP weights were needed and could not be downloaded.
    """
    from .models.dynamicrafter import DynamiCrafter

    path = Path(checkpoint)
    state, mapped = _read(path)
    state = _rename(state)
    problem = wrong_file_message(state, path)
    if problem:
        raise CheckpointMismatchError(problem)
    with torch.device("meta"):
        model = DynamiCrafter(config)
    own = model.state_dict()
    _check_family(state, own, path, config)
    _check_schedule(state, model, path)
    file_mapped = set(state) if mapped else set()  # keys whose tensors are pages of a file mapping
    clip_path, clip_towers, from_clip, clip_mapped = _complete_towers(state, own, path, config, clip_checkpoint)
    _check_keys(state, own, path, config, clip_path, clip_towers, from_clip)
    if clip_mapped:
        file_mapped |= from_clip

    converted = {}
    for key in list(state):
        target = vae_dtype if vae_dtype is not None and key.startswith("first_stage_model.") else dtype
        tensor = state.pop(key)
        converted[key] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
        if key in file_mapped and converted[key].data_ptr() != tensor.data_ptr():
            release_mapped_pages(tensor)
    model.load_state_dict(converted, assign=True)
    logger.info("Loaded %s (%d tensors) as %s on %s.", path, len(converted), dtype, device)
    return model.eval().requires_grad_(False)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensor: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                      written: Callable[[str, torch.Tensor], None] | None = None) -> int:
    """Write a ``.safetensors`` file one tensor at a time; returns its size in bytes.

    ``layout`` lists ``(name, dtype, shape)`` in file order; ``tensor(name)`` is called once per
    name, in that order, and must return a CPU tensor of that dtype and shape; ``written(name,
    tensor)`` is called once its bytes are in the file. The header (a
    little-endian u64 length, then JSON with each tensor's dtype, shape and byte range, padded
    to 8 bytes) is written first, then the tensors' bytes back to back, as the format specifies.
    Writes to ``path`` directly: callers wanting atomicity pass a temporary name.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in layout:
        if dtype not in _SAFETENSORS_DTYPES:
            raise UserError(f"{name}: safetensors cannot store {dtype}.")
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, dtype, shape in layout:
            value = tensor(name)
            if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                raise RuntimeError(f"{name}: expected {dtype} {tuple(shape)}, got {value.dtype} {tuple(value.shape)}")
            if value.numel():
                out.write(memoryview(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            if written is not None:
                written(name, value)
            del value  # before the next tensor is made
        out.flush()
        os.fsync(out.fileno())
    return 8 + len(encoded) + offset
