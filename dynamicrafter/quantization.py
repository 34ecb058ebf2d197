"""Float8 weights for the UNet through ``torchao``: the modes, the hardware they need, the layers they touch.

Two modes besides ``"none"``:

- ``"fp8"``: float8 (e4m3) weights *and* activations, quantized on the fly, so the UNet's linear
  layers run as float8 tensor-core matmuls (``torch._scaled_mm``). Scales are per row: one per
  output channel of a weight and one per token of an activation, torchao's more accurate
  choice over a single scale per tensor. It needs a CUDA GPU of compute capability 8.9 or newer
  (Ada, Hopper, Blackwell) and a bfloat16 model: per-row float8 matmuls take and give
  bfloat16. A float32 or float16 model is refused rather than silently cast.
- ``"fp8_weights"``: float8 weights only (one scale per output channel), turned back into the
  model's dtype inside each matmul. It halves the linear layers' weight memory (bf16) on any
  device, the CPU included, and computes exactly as the model's dtype otherwise does; it is not
  faster.

Only the UNet's ``nn.Linear`` layers are quantized (attention projections, feed-forwards, the
time and frame-rate embeddings), and of those only the ones whose input and output features
are both multiples of 16, which torchao's float8 matmul needs. The VAE, the CLIP towers, the
image resampler and LoRA layers (peft's ``lora_A`` / ``lora_B``) stay as they are; the
convolutions too. ``torchao`` is an optional dependency (``pip install torchao``), imported
only when a mode other than ``"none"`` is asked for.

torchao advises ``torch.compile`` for speed with ``fp8``: eagerly, each activation's per-row
scaling and cast to float8 run as separate kernels before every matmul; compiled, Inductor fuses
them (``compile=True``). torchao's own Inductor settings (coordinate-descent tuning and others,
which lengthen compilation further) are not applied: they would change every later compilation in
the process.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .errors import UserError

__all__ = ["QUANTIZE_MODES", "FEATURE_MULTIPLE", "quantize_mode", "quantize_unet", "quantizable", "is_quantized",
           "tensor_bytes", "weight_bytes"]

logger = logging.getLogger(__name__)

#: ``none``: the model's own weights. ``fp8``: float8 weights and activations (CUDA, capability >= 8.9,
#: bfloat16). ``fp8_weights``: float8 weights, computing in the model's dtype (any device).
QUANTIZE_MODES = ("none", "fp8", "fp8_weights")
#: torchao quantizes a linear layer only when both its feature counts are multiples of this.
FEATURE_MULTIPLE = 16
#: Float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.0, 12.0).
FP8_CAPABILITY = (8, 9)
INSTALL = "pip install torchao (or pip install 'dynamicrafter[fp8]')"


def quantize_mode(quantize: str | bool | None, device: torch.device, dtype: torch.dtype) -> str:
    """The user's ``quantize`` as one of :data:`QUANTIZE_MODES`, checked against the device and dtype.

    ``None``, ``False`` and ``"none"`` give ``"none"``. Called before any model work, so a
    machine that cannot run the mode fails at once.

    Raises:
        ValueError: one sentence: an unknown mode, ``fp8`` off a CUDA GPU of capability 8.9+
            or with a dtype other than bfloat16, float8 on Apple's ``mps``, or ``torchao`` missing.
    """
    if quantize is None or quantize is False:
        return "none"
    if not isinstance(quantize, str) or quantize not in QUANTIZE_MODES:
        raise UserError(f"Unknown quantize mode {quantize!r}; choose one of: {', '.join(QUANTIZE_MODES)}.")
    if quantize == "none":
        return quantize
    if quantize == "fp8":
        _check_fp8_device(device)
        if dtype != torch.bfloat16:
            raise UserError(f"quantize='fp8' computes in bfloat16 (per-row float8 matmuls), not "
                             f"{str(dtype).replace('torch.', '')}; use dtype bfloat16, or quantize='fp8_weights'.")
    if device.type == "mps":
        raise UserError("Apple's mps backend has no float8 tensors; use quantize='none' on mps.")
    _torchao()
    return quantize


def _check_fp8_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise UserError(f"quantize='fp8' needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, "
                         f"Blackwell), not {device}; quantize='fp8_weights' works on any device.")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise UserError(f"quantize='fp8' needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                         f"{device} ({torch.cuda.get_device_name(device)}) has {capability[0]}.{capability[1]}; "
                         "use quantize='fp8_weights'.")


def _torchao() -> Any:
    """``torchao.quantization``, or a one-sentence ``ValueError`` saying how to install it."""
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise UserError(f"Float8 quantization needs the torchao package; {INSTALL}.") from None
    return quantization


def quantizable(module: nn.Module, name: str = "") -> bool:
    """Whether ``module`` (named ``name`` in the UNet) gets float8 weights.

    An ``nn.Linear`` whose in and out features are multiples of :data:`FEATURE_MULTIPLE`, that
    is not a LoRA layer (a name part starting ``lora_``) and is not quantized already.
    """
    return (isinstance(module, nn.Linear)
            and not any(part.startswith("lora_") for part in name.split("."))
            and module.in_features % FEATURE_MULTIPLE == 0 and module.out_features % FEATURE_MULTIPLE == 0
            and not _is_torchao_tensor(module.weight))


def _is_torchao_tensor(tensor: torch.Tensor) -> bool:
    """A torchao tensor subclass (without importing torchao when it never was)."""
    return type(tensor).__module__.startswith("torchao.")


def is_quantized(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a torchao (quantized) tensor."""
    return any(_is_torchao_tensor(p) for p in module.parameters())


def _config(mode: str) -> Any:
    """torchao's config for ``mode``: per-row scales; torchao's Inductor settings left alone."""
    ao = _torchao()
    if mode == "fp8":
        return ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow(), set_inductor_config=False)
    return ao.Float8WeightOnlyConfig(set_inductor_config=False)


def quantize_unet(unet: nn.Module, mode: str | bool | None, device: torch.device, dtype: torch.dtype) -> int:
    """Give the :func:`quantizable` linear layers of ``unet`` float8 weights, in place; returns how many.

    ``device`` and ``dtype`` are where and how the UNet will run (it may sit in host memory
    for now: the weights are quantized where they are). Each quantized weight becomes a torchao
    ``Float8Tensor``: float8 data ``[out, in]`` and float32 scales ``[out, 1]``; it reports the
    model's ``dtype`` and shape, and moves with ``.to(device)`` like any parameter (a
    ``.to(dtype)`` leaves it as it is). ``"none"`` changes nothing and returns 0.

    Raises:
        ValueError: as :func:`quantize_mode`.
    """
    mode = quantize_mode(mode, device, dtype)
    if mode == "none":
        return 0
    linears = [name for name, module in unet.named_modules() if isinstance(module, nn.Linear)]
    chosen = {name for name, module in unet.named_modules() if quantizable(module, name)}
    before = weight_bytes(unet)
    _torchao().quantize_(unet, _config(mode), filter_fn=lambda module, name: name in chosen)
    logger.info("Quantized %d of the UNet's %d linear layers to float8 (%s); UNet weights %.1f -> %.1f MB.",
                len(chosen), len(linears), "weights and activations" if mode == "fp8" else "weights only",
                before / 1e6, weight_bytes(unet) / 1e6)
    return len(chosen)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor counts its inner tensors (float8 data and scales)."""
    if _is_torchao_tensor(tensor) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, quantized ones as stored."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))
