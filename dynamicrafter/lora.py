"""LoRA adapters on the UNet through ``peft``: adding them, saving them, loading them for inference.

A LoRA is saved the way ``peft`` saves an adapter: a folder with ``adapter_model.safetensors``
(keys ``base_model.model.<UNet module>.lora_A.weight`` / ``lora_B.weight``) and
``adapter_config.json``. The safetensors header also records the model the LoRA was trained
on and its LoRA settings, so the file alone can be loaded too. ``peft`` is imported only when
a LoRA is used.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .configs import ModelConfig
from .errors import UserError
from .files import write_atomically
from .options import OPTIONS, check_number

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
_KEY = re.compile(re.escape(_PREFIX) + r"(.+)\.lora_(A|B)\.weight")


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


def _redo(file: Path) -> str:
    return f"train it again with `dynamicrafter train` or use an intact copy of {file.name}"


def _damaged(file: Path, what: str) -> UserError:
    return UserError(f"LoRA {file} is damaged: {what}; {_redo(file)}.")


def _layers(file: Path, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The UNet module each LoRA layer adapts, with its ``A`` (rank x in) and ``B`` (out x rank) matrices.

    Refuses keys that are not peft's ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``,
    tensors that are not finite floating-point matrices, and layers that lack a matrix or whose
    two matrices disagree on the rank.
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.fullmatch(key)
        if match is None or ".lora_" in match[1]:
            raise _damaged(file, f"its key {key} is not peft's {_PREFIX}<module>.lora_A.weight or .lora_B.weight")
        if tensor.dim() != 2:
            raise _damaged(file, f"{key} has shape {tuple(tensor.shape)}, where a matrix is expected")
        if not tensor.is_floating_point():
            raise _damaged(file, f"{key} holds {str(tensor.dtype).removeprefix('torch.')} values, "
                                 "where floating-point weights are expected")
        if not torch.isfinite(tensor.float()).all():
            raise _damaged(file, f"{key} holds NaN or infinite values")
        layers.setdefault(match[1], {})[match[2]] = tensor
    for name, pair in layers.items():
        if len(pair) == 1:
            have, lack = ("A", "B") if "A" in pair else ("B", "A")
            raise _damaged(file, f"{name} has a lora_{have} but no lora_{lack}")
        if pair["A"].shape[0] != pair["B"].shape[1]:
            raise _damaged(file, f"{name}'s lora_A has rank {pair['A'].shape[0]} but its lora_B rank "
                                 f"{pair['B'].shape[1]}")
    return layers


def _json_kind(doc: Any) -> str:
    if doc is None or isinstance(doc, bool):
        return json.dumps(doc)
    return {str: "a string", list: "a list"}.get(type(doc), "a number")


def _read_config(file: Path) -> dict[str, Any]:
    """The settings in a peft ``adapter_config.json``: a JSON object in UTF-8 of plain LoRA settings."""
    try:
        doc = json.loads(file.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        raise UserError(f"LoRA config {file} cannot be read ({exc.strerror or exc}).") from None
    except UnicodeDecodeError:
        raise UserError(f"LoRA config {file} is not UTF-8 text; {_redo(file)}.") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"LoRA config {file} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno}); {_redo(file)}.") from None
    if not isinstance(doc, dict):
        raise UserError(f"LoRA config {file} holds {_json_kind(doc)}, not a JSON object of LoRA settings; "
                         f"{_redo(file)}.")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if doc.get(k)]
    if unsupported:
        raise UserError(f"LoRA config {file} uses peft's {', '.join(unsupported)}, which dynamicrafter does not "
                         "load; train a plain LoRA with `dynamicrafter train`.")
    return doc


def _read(path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The weights file, its tensors, its settings (header, else ``adapter_config.json``) and its checked layers."""
    from safetensors import SafetensorError, safe_open

    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"LoRA {path} does not exist" + (f" (no {WEIGHTS_NAME} in it)." if path.is_dir() else "."))
    try:
        with safe_open(str(file), "pt") as f:
            meta: dict[str, Any] = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file} is not a readable LoRA file ({exc}).") from None
    if not state or not any(".lora_A." in k or ".lora_B." in k for k in state):
        raise UserError(f"{file} holds no LoRA weights (expected peft's lora_A / lora_B keys).")
    layers = _layers(file, state)
    if "lora_rank" not in meta:  # a plain peft adapter: settings from its adapter_config.json
        cfg_file = file.parent / CONFIG_NAME
        if cfg_file.exists():
            doc = _read_config(cfg_file)
            meta.update({k: doc[c] for k, c in (("lora_rank", "r"), ("lora_alpha", "lora_alpha")) if c in doc})
            meta["settings_from"] = cfg_file
    return file, state, meta, layers


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and settings (header metadata, else ``adapter_config.json``'s) of a LoRA folder or file.

    Raises :class:`UserError` for a missing, unreadable or malformed LoRA (see :func:`load_lora`).
    """
    _, state, meta, _ = _read(Path(path))
    return state, meta


def _setting(file: Path, meta: dict[str, Any], key: str, integer: bool) -> int | float:
    """``meta[key]`` (text in the header, a JSON value in ``adapter_config.json``) as a checked number."""
    value = meta[key]
    if isinstance(value, str):
        try:
            value = float(value)
            value = int(value) if value.is_integer() else value
        except ValueError:
            pass
    source = meta.get("settings_from")
    name = ("r" if key == "lora_rank" else key) if source else f"the header's {key}"
    try:
        return check_number(value, name, integer=integer, minimum=1 if integer else None)
    except UserError as exc:
        where = f"LoRA config {source}" if source else f"LoRA {file}"
        raise UserError(f"{where} is damaged: {str(exc).rstrip('.')}; {_redo(source or file)}.") from None


def _settings(file: Path, meta: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]]) -> tuple[int, float]:
    """The LoRA's rank (one for every layer: the recorded one, else the matrices') and alpha (default: the rank)."""
    ranks = {name: pair["A"].shape[0] for name, pair in layers.items()}
    if "lora_rank" in meta:
        rank = int(_setting(file, meta, "lora_rank", integer=True))
        source = meta.get("settings_from")
        said = f"{source.name} gives r={rank}" if source else f"its header gives lora_rank={rank}"
    else:
        rank = min(ranks.values())
        said = f"{min(ranks, key=ranks.__getitem__)} has rank {rank}"
    for name, got in ranks.items():
        if got != rank:
            raise UserError(f"LoRA {file} is inconsistent: {name} has rank {got} but {said}, and this loader takes "
                             f"one rank for every layer; {_redo(file)}.")
    alpha = float(_setting(file, meta, "lora_alpha", integer=False)) if "lora_alpha" in meta else float(rank)
    return rank, alpha


def _describe_model(meta: dict[str, str]) -> str:
    return (f"the {meta.get('dynamicrafter_model', 'unnamed')} model ({meta.get('dynamicrafter_size', 'size unknown')}, "
            f"{meta.get('dynamicrafter_parameterization', 'prediction type unknown')})")


def _check_fits(path: Path, meta: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]], unet: nn.Module,
                config: ModelConfig) -> None:
    """Refuse a LoRA of another model (as its header says, or as its shapes show)."""
    ours = model_signature(config)
    if any(k in meta and meta[k] != v for k, v in ours.items() if k != "dynamicrafter_model"):
        raise UserError(f"LoRA {path} was trained on {_describe_model(meta)}, "
                         f"but this pipeline runs {_describe_model(ours)}.")
    modules = dict(unet.named_modules())
    for name, pair in layers.items():
        module = modules.get(name)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, nn.Linear):
            which = "this UNet does not have" if module is None else "is not a linear layer of this UNet"
            raise UserError(f"LoRA {path} does not fit the {config.name} model: it adapts {name}, which {which}.")
        for side, expected, got in (("in", base.in_features, pair["A"].shape[1]),
                                    ("out", base.out_features, pair["B"].shape[0])):
            if got != expected:
                raise UserError(f"LoRA {path} does not fit the {config.name} model: {name} has {expected} "
                                 f"{side}put features, the LoRA {got}.")


def _check_scale(scale: Any) -> float:
    """The LoRA strength, by the rule of ``--lora_scale`` (a finite number from 0 to 10)."""
    return float(OPTIONS["lora_scale"].check(scale, "scale"))


def load_lora(unet: nn.Module, path: str | Path, config: ModelConfig, scale: float = 1.0) -> int:
    """Add the LoRA at ``path`` to ``unet`` (in place) at strength ``scale``; returns the layers adapted.

    A LoRA already on ``unet`` is replaced. The LoRA layers take the device and dtype of the
    layers they wrap (the model's dtype over float8 weights, which stay quantized). Raises
    :class:`UserError` (one sentence) for a ``scale`` outside 0 to 10, a missing, unreadable or
    malformed file (its settings, keys, shapes, ranks, dtypes and values are checked) or a LoRA
    of another model; everything is checked before ``unet`` is changed, so then it is untouched.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    scale = _check_scale(scale)
    path = Path(path)
    file, state, meta, layers = _read(path)
    rank, alpha = _settings(file, meta, layers)
    _check_fits(path, meta, layers, unet, config)
    names = sorted(layers)
    unload_lora(unet)  # the new LoRA is known to fit: replace any LoRA already there
    # Exact module names as targets (anchored regex): only the layers the file has weights for.
    pattern = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
    lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, bias="none")
    try:
        with warnings.catch_warnings():
            # Over float8 weights (dynamicrafter.quantization) peft warns, once per layer, that it could not
            # merge the LoRA into them; the LoRA is never merged here, it runs beside the base layer.
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
            inject_adapter_in_model(lora_config, unet, adapter_name=ADAPTER)
        dtype = next(p for n, p in unet.named_parameters() if ".lora_" not in n).dtype
        result = set_peft_model_state_dict(unet, {k.removeprefix(_PREFIX): v for k, v in state.items()},
                                           adapter_name=ADAPTER)
        missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
        if missing:  # the checks above make this a bug, not a bad file
            raise RuntimeError(f"peft did not load {len(missing)} LoRA weight(s) of {file}, e.g. {missing[0]}.")
        for name, param in unet.named_parameters():
            if ".lora_" in name:
                param.data = param.data.to(dtype)
                param.requires_grad_(False)
        set_lora_scale(unet, scale)
    except BaseException:  # Ctrl-C included: never leave a half-applied LoRA
        unload_lora(unet)
        raise
    return len(names)


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """Set the strength of the loaded LoRA (0 gives the base model's output exactly; at most 10)."""
    from peft.tuners.lora import LoraLayer

    scale = _check_scale(scale)
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER, scale)


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
