"""Typed configuration of the released DynamiCrafter models.

Four presets mirror the released checkpoints (``256``, ``512``, ``1024`` and the
``512_interp`` interpolation/looping model). :func:`load_config` also reads a model
config in the original YAML layout (``model.params.unet_config.params`` and so on):
only parameters are taken from such a file, the class paths it names are ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "UNetConfig",
    "VAEConfig",
    "CLIPConfig",
    "ResamplerConfig",
    "DiffusionConfig",
    "ModelConfig",
    "PRESETS",
    "RESOLUTION_ALIASES",
    "get_config",
    "load_config",
    "resolve_resolution",
]

Parameterization = Literal["eps", "v"]
Spacing = Literal["uniform", "uniform_trailing"]


@dataclass(frozen=True)
class UNetConfig:
    """The 3-D denoising UNet (``model.diffusion_model``)."""

    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    temporal_conv: bool = True
    temporal_attention: bool = True
    temporal_length: int = 16
    addition_attention: bool = True
    image_cross_attention: bool = True
    image_cross_attention_scale_learnable: bool = False
    fs_condition: bool = True
    default_fs: int = 3
    text_context_len: int = 77
    image_tokens_per_frame: int = 16


@dataclass(frozen=True)
class VAEConfig:
    """The Stable-Diffusion ``AutoencoderKL`` (``first_stage_model``)."""

    embed_dim: int = 4
    z_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    attn_resolutions: tuple[int, ...] = ()
    double_z: bool = True


@dataclass(frozen=True)
class CLIPConfig:
    """The OpenCLIP towers used for text (``cond_stage_model``) and image (``embedder``) tokens.

    ``model_cfg`` is an open_clip model config dict for architectures open_clip does not
    ship (the tiny test models); ``None`` means ``arch`` is one of open_clip's own.
    """

    arch: str = "ViT-H-14"
    model_cfg: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    text_layer: Literal["last", "penultimate"] = "penultimate"
    image_size: int = 224


@dataclass(frozen=True)
class ResamplerConfig:
    """The Perceiver resampler that turns CLIP image tokens into per-frame queries."""

    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 1024
    ff_mult: int = 4
    video_length: int | None = 16


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and the sampling conventions of a model."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    parameterization: Parameterization = "eps"
    rescale_betas_zero_snr: bool = False
    use_dynamic_rescale: bool = False
    base_scale: float = 0.7
    turning_step: int = 400
    scale_factor: float = 0.18215
    timestep_spacing: Spacing = "uniform"
    guidance_rescale: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one DynamiCrafter model and run it with its defaults."""

    name: str
    height: int
    width: int
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    clip: CLIPConfig = CLIPConfig()
    resampler: ResamplerConfig = ResamplerConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    fs_kind: Literal["frame_stride", "fps"] = "frame_stride"
    interp: bool = False
    repo_id: str | None = None

    @property
    def default_fs(self) -> int:
        """Default frame stride (256 model) or frame rate (the others) given to the UNet."""
        return self.unet.default_fs

    @property
    def latent_downscale(self) -> int:
        """Pixels per latent cell along each side (8 for the released VAE)."""
        return 2 ** (len(self.vae.ch_mult) - 1)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels for the UNet."""
        return self.latent_downscale * 2 ** (len(self.unet.channel_mult) - 1)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


_V_PRED = dict(parameterization="v", rescale_betas_zero_snr=True, use_dynamic_rescale=True,
               timestep_spacing="uniform_trailing", guidance_rescale=0.7)

PRESETS: dict[str, ModelConfig] = {
    "256": ModelConfig(
        name="256", height=256, width=256,
        unet=UNetConfig(image_cross_attention_scale_learnable=True, default_fs=3),
        repo_id="Doubiiu/DynamiCrafter",
    ),
    "512": ModelConfig(
        name="512", height=320, width=512,
        unet=UNetConfig(default_fs=24),
        diffusion=DiffusionConfig(base_scale=0.7, **_V_PRED),
        fs_kind="fps", repo_id="Doubiiu/DynamiCrafter_512",
    ),
    "1024": ModelConfig(
        name="1024", height=576, width=1024,
        unet=UNetConfig(default_fs=10),
        diffusion=DiffusionConfig(base_scale=0.3, **_V_PRED),
        fs_kind="fps", repo_id="Doubiiu/DynamiCrafter_1024",
    ),
    "512_interp": ModelConfig(
        name="512_interp", height=320, width=512,
        unet=UNetConfig(default_fs=5),
        diffusion=DiffusionConfig(base_scale=0.7, **_V_PRED),
        fs_kind="fps", interp=True, repo_id="Doubiiu/DynamiCrafter_512_Interp",
    ),
}

RESOLUTION_ALIASES: dict[str, str] = {
    "256": "256", "256_256": "256", "256x256": "256",
    "512": "512", "512_512": "512", "320_512": "512", "320x512": "512",
    "1024": "1024", "1024_1024": "1024", "576_1024": "1024", "576x1024": "1024",
    "512_interp": "512_interp", "interp": "512_interp", "320_512_interp": "512_interp",
}


def resolve_resolution(resolution: str | int) -> str:
    """Map any accepted spelling of a resolution (``'256_256'``, ``'320_512'``, ...) to a preset name."""
    key = str(resolution).strip().lower()
    if key not in RESOLUTION_ALIASES:
        choices = ", ".join(sorted(set(RESOLUTION_ALIASES)))
        raise ValueError(f"Unknown resolution {resolution!r}; choose one of: {choices}.")
    return RESOLUTION_ALIASES[key]


def get_config(resolution: str | int) -> ModelConfig:
    """The preset config for a released model, by any accepted resolution name."""
    return PRESETS[resolve_resolution(resolution)]


def _pick(cls: type, params: dict[str, Any], **extra: Any) -> Any:
    """Build a config dataclass from the keys of ``params`` it knows (lists become tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names}
    kwargs.update(extra)
    return cls(**kwargs)


def load_config(path: str | Path, name: str | None = None) -> ModelConfig:
    """Read a model config in the original DynamiCrafter YAML layout.

    Only parameter values are read; ``target`` class paths are never imported. A top-level
    ``open_clip_configs: {arch: {...}}`` entry supplies the OpenCLIP architecture when it is
    not one open_clip ships.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        params = doc["model"]["params"]
        unet_p = params["unet_config"]["params"]
        vae_p = params["first_stage_config"]["params"]
        proj_p = params["image_proj_stage_config"]["params"]
    except FileNotFoundError:
        raise ValueError(f"Config file {path} does not exist.") from None
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a DynamiCrafter model config ({type(exc).__name__}: {exc}).") from None

    text_p = (params.get("cond_stage_config") or {}).get("params") or {}
    arch = text_p.get("arch", "ViT-H-14")
    model_cfg = (doc.get("open_clip_configs") or {}).get(arch)
    clip = CLIPConfig(arch=arch, model_cfg=model_cfg, text_layer=text_p.get("layer", "last"))

    diffusion = _pick(DiffusionConfig, params)
    size = params.get("image_size", 32)
    latent_h, latent_w = (size, size) if isinstance(size, int) else size[:2]
    vae = _pick(VAEConfig, vae_p.get("ddconfig", {}), embed_dim=vae_p.get("embed_dim", 4))
    down = 2 ** (len(vae.ch_mult) - 1)
    unet = _pick(UNetConfig, unet_p)
    fs_kind = "fps" if params.get("fps_condition_type", "fs") == "fps" else "frame_stride"
    spacing = "uniform_trailing" if diffusion.parameterization == "v" else "uniform"
    guidance_rescale = 0.7 if diffusion.parameterization == "v" else 0.0
    diffusion = dataclasses.replace(diffusion, timestep_spacing=spacing, guidance_rescale=guidance_rescale)
    return ModelConfig(
        name=name or path.stem,
        height=latent_h * down,
        width=latent_w * down,
        unet=unet,
        vae=vae,
        clip=clip,
        resampler=_pick(ResamplerConfig, proj_p),
        diffusion=diffusion,
        fs_kind=fs_kind,
        interp=bool(params.get("interp_mode", False)),
    )
