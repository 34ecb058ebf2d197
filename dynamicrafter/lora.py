"""LoRA adapters on the UNet through ``peft``: adding them, saving them, loading them for inference.

A LoRA is saved the way ``peft`` saves an adapter: a folder with ``adapter_model.safetensors``
(keys ``base_model.model.<UNet module>.lora_A.weight`` / ``lora_B.weight``) and
``adapter_config.json``. The safetensors header also records the model the LoRA was trained
on and its LoRA settings, so the file alone can be loaded too. ``peft`` is imported only when
a LoRA is used.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .configs import ModelConfig
from .errors import UserError
from .files import write_atomically

__all__ = [
    "DEFAULT_TARGETS",
    "WEIGHTS_NAME",
    "add_lora",
    "load_lora",
    "lora_state_dict",
    "read_lora",
    "save_lora",
    "set_lora_scale",
    "unload_lora",
]

#: The UNet's attention and feed-forward projections (spatial and temporal transformers).
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "to_k_ip", "to_v_ip", "ff.net.0.proj", "ff.net.2")
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
ADAPTER = "default"
_PREFIX = "base_model.model."


def model_signature(config: ModelConfig) -> dict[str, str]:
    """What a LoRA must match: the model it was trained on, by name, frame size and prediction type."""
    return {
        "dynamicrafter_model": config.name,
        "dynamicrafter_size": f"{config.height}x{config.width}",
        "dynamicrafter_parameterization": config.diffusion.parameterization,
        "dynamicrafter_interp": str(bool(config.interp)),
    }


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _lora_config(unet: nn.Module, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0) -> Any:
    """peft's config for LoRA on the linear layers named by ``targets`` (module-name suffixes).

    Layers that match but are not ``nn.Linear`` (the first temporal block's 1x1 convolutions)
    are excluded: the UNet runs those as linear maps on their weights.
    """
    from peft import LoraConfig

    matched = [(n, m) for n, m in unet.named_modules() if _matches(n, targets)]
    if not any(isinstance(m, nn.Linear) for _, m in matched):
        raise UserError(f"No linear layer of the UNet matches the LoRA targets {', '.join(targets)}.")
    exclude = sorted(n for n, m in matched if not isinstance(m, nn.Linear))
    return LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                      bias="none", init_lora_weights=True, exclude_modules=exclude or None)


def add_lora(unet: nn.Module, rank: int = 64, alpha: float | None = None, targets: Sequence[str] = DEFAULT_TARGETS,
             dropout: float = 0.0) -> Any:
    """Wrap the ``targets`` projections of ``unet`` with LoRA layers (in place); returns the ``LoraConfig``.

    ``alpha`` defaults to ``rank`` (a scale of 1). Only the new LoRA weights require gradients.
    """
    from peft import inject_adapter_in_model

    if rank < 1:
        raise UserError(f"The LoRA rank must be at least 1, got {rank}.")
    config = _lora_config(unet, rank, float(rank if alpha is None else alpha), targets, dropout)
    unet.requires_grad_(False)
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name)
    return config


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``unet`` under peft's saved names (``base_model.model.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {_PREFIX + k: v.detach() for k, v in state.items()}


def save_lora(folder: str | Path, state: dict[str, torch.Tensor], lora_config: Any, model_config: ModelConfig,
              extra: dict[str, str] | None = None) -> Path:
    """Write a LoRA folder (``adapter_model.safetensors`` + ``adapter_config.json``), each file atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**model_signature(model_config), "lora_rank": str(lora_config.r), "lora_alpha": str(lora_config.lora_alpha),
            "lora_targets": json.dumps(sorted(lora_config.target_modules)), "format": "pt", **(extra or {})}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    doc = lora_config.to_dict()
    doc["target_modules"] = sorted(doc["target_modules"])
    doc.update({"peft_type": "LORA", "task_type": None, "base_model_name_or_path": f"dynamicrafter-{model_config.name}"})
    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    write_atomically(folder / CONFIG_NAME, lambda tmp: tmp.write_text(text))
    return folder


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a LoRA folder or ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"LoRA {path} does not exist" + (f" (no {WEIGHTS_NAME} in it)." if path.is_dir() else "."))
    try:
        with safe_open(str(file), "pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file} is not a readable LoRA file ({exc}).") from None
    if not state or not all(".lora_A." in k or ".lora_B." in k for k in state):
        raise UserError(f"{file} holds no LoRA weights (expected peft's lora_A / lora_B keys).")
    if "lora_rank" not in meta:  # a plain peft adapter: settings from its adapter_config.json
        cfg_file = file.parent / CONFIG_NAME
        if cfg_file.is_file():
            doc = json.loads(cfg_file.read_text())
            meta.setdefault("lora_rank", str(doc.get("r")))
            meta.setdefault("lora_alpha", str(doc.get("lora_alpha")))
    return state, meta


def _describe_model(meta: dict[str, str]) -> str:
    return f"the {meta['dynamicrafter_model']} model ({meta['dynamicrafter_size']}, {meta['dynamicrafter_parameterization']})"


def _check_fits(path: Path, meta: dict[str, str], state: dict[str, torch.Tensor], unet: nn.Module,
                config: ModelConfig) -> list[str]:
    """Refuse a LoRA of another model; return the UNet module names it adapts."""
    ours = model_signature(config)
    if "dynamicrafter_size" in meta and any(meta.get(k) != v for k, v in ours.items() if k != "dynamicrafter_model"):
        raise UserError(f"LoRA {path} was trained on {_describe_model(meta)}, "
                         f"but this pipeline runs {_describe_model(ours)}.")
    modules = dict(unet.named_modules())
    targets = set()
    for key, tensor in state.items():
        name, kind = key.removeprefix(_PREFIX).rsplit(".lora_", 1)
        module = modules.get(name)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, nn.Linear):
            raise UserError(f"LoRA {path} does not fit the {config.name} model: it adapts {name}, "
                             "which is not a linear layer of this UNet.")
        expected = base.in_features if kind.startswith("A") else base.out_features
        got = tensor.shape[1] if kind.startswith("A") else tensor.shape[0]
        if got != expected:
            raise UserError(f"LoRA {path} does not fit the {config.name} model: {name} has {expected} "
                             f"features, the LoRA {got}.")
        targets.add(name)
    return sorted(targets)


def load_lora(unet: nn.Module, path: str | Path, config: ModelConfig, scale: float = 1.0) -> int:
    """Add the LoRA at ``path`` to ``unet`` (in place) at strength ``scale``; returns the layers adapted.

    The LoRA layers take the device and dtype of the layers they wrap (the model's dtype over
    float8 weights, which stay quantized). Raises ``ValueError`` for a missing or unreadable file
    or a LoRA of another model.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    path = Path(path)
    state, meta = read_lora(path)
    names = _check_fits(path, meta, state, unet, config)
    ranks = {t.shape[0] for k, t in state.items() if ".lora_A." in k}
    rank = int(meta.get("lora_rank") or max(ranks))
    alpha = float(meta.get("lora_alpha") or rank)
    # Exact module names as targets (anchored regex): only the layers the file has weights for.
    pattern = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
    lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, bias="none")
    with warnings.catch_warnings():
        # Over float8 weights (dynamicrafter.quantization) peft warns, once per layer, that it could not
        # merge the LoRA into them; the LoRA is never merged here, it runs beside the base layer.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        inject_adapter_in_model(lora_config, unet, adapter_name=ADAPTER)
    dtype = next(p for n, p in unet.named_parameters() if ".lora_" not in n).dtype
    result = set_peft_model_state_dict(unet, {k.removeprefix(_PREFIX): v for k, v in state.items()}, adapter_name=ADAPTER)
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if missing:
        unload_lora(unet)
        raise UserError(f"LoRA {path} lacks weights for {len(missing)} adapted layer(s), e.g. {missing[0]}.")
    for name, param in unet.named_parameters():
        if ".lora_" in name:
            param.data = param.data.to(dtype)
            param.requires_grad_(False)
    set_lora_scale(unet, scale)
    return len(names)


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """Set the strength of the loaded LoRA (0 gives the base model's output exactly)."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER, float(scale))


def unload_lora(unet: nn.Module) -> int:
    """Remove every LoRA layer, putting the original layers back untouched; returns how many were removed."""
    if "peft" not in sys.modules:  # never imported: no LoRA can have been added
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    removed = 0
    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
            removed += 1
    if "peft_config" in unet.__dict__:  # peft's record of the adapters it injected
        del unet.peft_config
    return removed
