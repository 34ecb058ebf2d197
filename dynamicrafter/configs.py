"""Typed configuration of the released DynamiCrafter models.

Five presets mirror the released checkpoints (``256``, ``512``, ``1024``, the ``512_interp``
interpolation/looping model and ``tooncrafter``, ToonCrafter's cartoon interpolation model).
Every config checks itself when it is made (``__post_init__``) and raises one ``ValueError``.

:func:`load_config` reads a model config in the original YAML layout
(``model.params.unet_config.params`` and so on). It is strict: every key must be one this
package implements, with a value it implements (``use_causal_attention: true`` is refused, not
ignored), so a file can never silently describe a different model than the one computed. Keys
that only matter for training or memory (``dropout``, ``use_checkpoint``, ``monitor``, ...) are
accepted whatever their value. Class paths (``target``) are never imported; they are only
checked to name the classes this package implements.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from .errors import UserError

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


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _positive_ints(obj: Any, name: str, values: Any, allow_empty: bool = False) -> tuple[int, ...]:
    """Store ``values`` on the frozen ``obj`` as a tuple of positive ints, or raise."""
    try:
        values = tuple(values)
    except TypeError:
        raise UserError(f"{type(obj).__name__}.{name} must be a list of positive integers, got {values!r}.") from None
    _require(all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
             and (allow_empty or values),
             f"{type(obj).__name__}.{name} must be a {'' if allow_empty else 'non-empty '}list of positive "
             f"integers, got {list(values)!r}.")
    object.__setattr__(obj, name, values)
    return values


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}.")


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

    def __post_init__(self) -> None:
        _check_positive(self, "in_channels", "out_channels", "model_channels", "num_res_blocks",
                        "num_head_channels", "transformer_depth", "context_dim", "temporal_length", "default_fs",
                        "text_context_len", "image_tokens_per_frame")
        _positive_ints(self, "channel_mult", self.channel_mult)
        _positive_ints(self, "attention_resolutions", self.attention_resolutions, allow_empty=True)
        for mult in self.channel_mult:
            width = mult * self.model_channels
            _require(width % self.num_head_channels == 0 and width % 32 == 0,
                     f"UNetConfig: every level's width (model_channels x channel_mult = {width}) must be a "
                     f"multiple of num_head_channels ({self.num_head_channels}) and of 32.")


#: Fewest frames ToonCrafter's two-pass decoding (``dual_reference``) can make: it leaves out the second and
#: second-to-last frame.
DUAL_REFERENCE_MIN_FRAMES = 4


@dataclass(frozen=True)
class VAEConfig:
    """The Stable-Diffusion ``AutoencoderKL`` (``first_stage_model``).

    ``dual_reference`` selects ToonCrafter's decoder (``AutoencoderKL_Dualref``: temporal layers
    and attention to the encoder features of the first and last key frames on the levels in
    ``reference_attention_levels``; see :mod:`dynamicrafter.models.vae_dualref`).
    """

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
    dual_reference: bool = False
    reference_attention_levels: tuple[int, ...] = (2, 3)

    def __post_init__(self) -> None:
        _check_positive(self, "embed_dim", "z_channels", "ch", "num_res_blocks", "in_channels", "out_ch", "resolution")
        _positive_ints(self, "ch_mult", self.ch_mult)
        _positive_ints(self, "attn_resolutions", self.attn_resolutions, allow_empty=True)
        levels = tuple(self.reference_attention_levels)
        _require(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in levels),
                 f"VAEConfig.reference_attention_levels must be level indices, got {list(levels)!r}.")
        object.__setattr__(self, "reference_attention_levels", levels)
        _require(self.double_z, "VAEConfig.double_z must be true: the encoder outputs a mean and a log-variance.")
        _require(all(self.ch * m % 32 == 0 for m in self.ch_mult),
                 f"VAEConfig: every level's width (ch x ch_mult) must be a multiple of 32 (its group norms), "
                 f"got ch={self.ch}, ch_mult={list(self.ch_mult)}.")
        if self.dual_reference:
            _require(self.ch_mult[0] == 1,
                     "VAEConfig: the dual-reference decoder needs ch_mult[0] == 1 (its last refinement adds "
                     "conv_in's features, ch wide, to the first level's).")


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

    def __post_init__(self) -> None:
        _require(isinstance(self.arch, str) and bool(self.arch), f"CLIPConfig.arch must be a name, got {self.arch!r}.")
        _require(self.model_cfg is None or isinstance(self.model_cfg, dict),
                 f"CLIPConfig.model_cfg must be an open_clip model config (a mapping), got {type(self.model_cfg).__name__}.")
        _require(self.text_layer in ("last", "penultimate"),
                 f"CLIPConfig.text_layer must be 'last' or 'penultimate', got {self.text_layer!r}.")
        _check_positive(self, "image_size")


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

    def __post_init__(self) -> None:
        _check_positive(self, "dim", "depth", "dim_head", "heads", "num_queries", "embedding_dim", "output_dim",
                        "ff_mult")
        if self.video_length is not None:
            _check_positive(self, "video_length")


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

    def __post_init__(self) -> None:
        _check_positive(self, "timesteps", "turning_step")
        _require(self.parameterization in ("eps", "v"),
                 f"DiffusionConfig.parameterization must be 'eps' or 'v', got {self.parameterization!r}.")
        _require(self.timestep_spacing in ("uniform", "uniform_trailing"),
                 f"DiffusionConfig.timestep_spacing must be 'uniform' or 'uniform_trailing', got {self.timestep_spacing!r}.")
        for name in ("linear_start", "linear_end", "base_scale", "scale_factor", "guidance_rescale"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool),
                     f"DiffusionConfig.{name} must be a number, got {value!r}.")
        _require(0 < self.linear_start < self.linear_end < 1,
                 f"DiffusionConfig needs 0 < linear_start < linear_end < 1, got {self.linear_start} and {self.linear_end}.")
        _require(self.turning_step <= self.timesteps,
                 f"DiffusionConfig.turning_step ({self.turning_step}) must not exceed timesteps ({self.timesteps}).")
        _require(self.base_scale > 0 and self.scale_factor > 0,
                 "DiffusionConfig.base_scale and scale_factor must be positive.")
        _require(0 <= self.guidance_rescale <= 1,
                 f"DiffusionConfig.guidance_rescale must be in [0, 1], got {self.guidance_rescale}.")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one DynamiCrafter model and run it with its defaults.

    ``checkpoint_dir`` is the folder under ``checkpoints/`` the original code keeps the model in
    (default ``dynamicrafter_{name}_v1``).
    """

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
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        for name, kind in (("unet", UNetConfig), ("vae", VAEConfig), ("clip", CLIPConfig),
                           ("resampler", ResamplerConfig), ("diffusion", DiffusionConfig)):
            _require(isinstance(getattr(self, name), kind),
                     f"ModelConfig.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}.")
        _require(self.fs_kind in ("frame_stride", "fps"),
                 f"ModelConfig.fs_kind must be 'frame_stride' or 'fps', got {self.fs_kind!r}.")
        _check_positive(self, "height", "width")
        multiple = self.size_multiple
        _require(self.height % multiple == 0 and self.width % multiple == 0,
                 f"ModelConfig {self.name}: height and width must be multiples of {multiple}, "
                 f"got {self.height}x{self.width}.")
        _require(self.unet.out_channels == self.vae.embed_dim,
                 f"ModelConfig {self.name}: the UNet predicts {self.unet.out_channels} channels but the VAE's "
                 f"latents have {self.vae.embed_dim}.")
        _require(self.unet.in_channels == 2 * self.vae.embed_dim,
                 f"ModelConfig {self.name}: the UNet takes {self.unet.in_channels} channels; the noisy latent and the "
                 f"image latent give {2 * self.vae.embed_dim}.")
        _require(self.resampler.output_dim == self.unet.context_dim,
                 f"ModelConfig {self.name}: the resampler's output_dim ({self.resampler.output_dim}) must equal the "
                 f"UNet's context_dim ({self.unet.context_dim}).")
        _require(self.resampler.num_queries == self.unet.image_tokens_per_frame,
                 f"ModelConfig {self.name}: the resampler's num_queries ({self.resampler.num_queries}) must equal "
                 f"the UNet's image_tokens_per_frame ({self.unet.image_tokens_per_frame}).")
        if self.vae.dual_reference:
            _require(max(self.vae.reference_attention_levels, default=0) < len(self.vae.ch_mult),
                     f"ModelConfig {self.name}: reference_attention_levels must be levels of the VAE (0 to "
                     f"{len(self.vae.ch_mult) - 1}).")

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
    # The 512-interp UNet with ToonCrafter's decoder; frame rate 10 as its run script and demo use.
    "tooncrafter": ModelConfig(
        name="tooncrafter", height=320, width=512,
        unet=UNetConfig(default_fs=10),
        vae=VAEConfig(dual_reference=True),
        diffusion=DiffusionConfig(base_scale=0.7, **_V_PRED),
        fs_kind="fps", interp=True, repo_id="Doubiiu/ToonCrafter", checkpoint_dir="tooncrafter_512_interp_v1",
    ),
}

RESOLUTION_ALIASES: dict[str, str] = {
    "256": "256", "256_256": "256", "256x256": "256",
    "512": "512", "512_512": "512", "320_512": "512", "320x512": "512",
    "1024": "1024", "1024_1024": "1024", "576_1024": "1024", "576x1024": "1024",
    "512_interp": "512_interp", "interp": "512_interp", "320_512_interp": "512_interp",
    "tooncrafter": "tooncrafter", "toon": "tooncrafter", "tooncrafter_512": "tooncrafter",
    "tooncrafter_512_interp": "tooncrafter",
}


def resolve_resolution(resolution: str | int) -> str:
    """Map any accepted spelling of a model (``'256_256'``, ``'320_512'``, ``'toon'``, ...) to a preset name."""
    key = str(resolution).strip().lower()
    if key not in RESOLUTION_ALIASES:
        choices = ", ".join(sorted(set(RESOLUTION_ALIASES)))
        raise UserError(f"Unknown resolution {resolution!r}; choose one of: {choices}.")
    return RESOLUTION_ALIASES[key]


def get_config(resolution: str | int) -> ModelConfig:
    """The preset config for a released model, by any accepted resolution name."""
    return PRESETS[resolve_resolution(resolution)]


def model_config(resolution: str | int, config: str | Path | None = None) -> ModelConfig:
    """The config of a run: the preset of ``resolution``, or the YAML file ``config`` read strictly.

    A YAML file read for an interpolation preset (``512_interp``, ``tooncrafter``) describes an
    interpolation model even without ``interp_mode: true``: the original runs its interpolation
    checkpoint with the plain ``inference_512_v1.0.yaml``.
    """
    preset = get_config(resolution)
    if config is None:
        return preset
    loaded = load_config(config)
    return dataclasses.replace(loaded, interp=True) if preset.interp and not loaded.interp else loaded


# --------------------------------------------------------------------------------------------
# The original YAML format, read strictly
# --------------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(i) for i in v)


@dataclass(frozen=True)
class _Key:
    """How the reader treats one YAML key.

    ``into``: ``"section.field"`` of the config it sets, or None for a key that does not change
    what is computed (training or memory settings). ``accept`` tells the values this package
    implements, ``wanted`` says them in words for the refusal.
    """

    accept: Callable[[Any], bool]
    wanted: str
    into: str | None = None


def _equals(value: Any) -> _Key:
    shown = {True: "true", False: "false"}.get(value, repr(value)) if isinstance(value, bool) else repr(value)
    return _Key(lambda v, value=value: v == value and type(v) is type(value), f"only {shown} is implemented")


def _field(into: str, accept: Callable[[Any], bool] = _is_int, wanted: str = "an integer") -> _Key:
    return _Key(accept, wanted, into)


_ANY = _Key(lambda v: True, "anything")
_BOOL = _Key(lambda v: isinstance(v, bool), "true or false")
_NUMBER = _Key(_is_number, "a number")
_STR = _Key(lambda v: isinstance(v, str), "a string")
_INT_LIST = dict(accept=_is_int_list, wanted="a list of integers")


def _classes(*names: str) -> _Key:
    """A ``target`` naming one of these classes (any module path: only the class name is checked)."""
    return _Key(lambda v: isinstance(v, str) and v.rsplit(".", 1)[-1] in names,
                "a class path ending in " + " or ".join(names))


_MODEL_PARAMS: dict[str, _Key] = {
    "timesteps": _field("diffusion.timesteps"),
    "linear_start": _field("diffusion.linear_start", _is_number, "a number"),
    "linear_end": _field("diffusion.linear_end", _is_number, "a number"),
    "parameterization": _field("diffusion.parameterization", lambda v: v in ("eps", "v"), "'eps' or 'v'"),
    "rescale_betas_zero_snr": _field("diffusion.rescale_betas_zero_snr", lambda v: isinstance(v, bool), "true or false"),
    "use_dynamic_rescale": _field("diffusion.use_dynamic_rescale", lambda v: isinstance(v, bool), "true or false"),
    "base_scale": _field("diffusion.base_scale", _is_number, "a number"),
    "turning_step": _field("diffusion.turning_step"),
    "scale_factor": _field("diffusion.scale_factor", _is_number, "a number"),
    "image_size": _field("image_size", lambda v: _is_int(v) or (_is_int_list(v) and len(v) == 2),
                         "a latent size or [height, width]"),
    "fps_condition_type": _field("fs_kind", lambda v: v in ("fs", "fps"), "'fs' or 'fps'"),
    "interp_mode": _field("interp", lambda v: isinstance(v, bool), "true or false"),
    "channels": _field("channels"),
    "conditioning_key": _equals("hybrid"),
    "uncond_type": _equals("empty_seq"),
    "scale_by_std": _equals(False),
    "use_ema": _equals(False),
    "num_timesteps_cond": _equals(1),
    # no effect on what is computed
    "first_stage_key": _STR, "cond_stage_key": _STR, "cond_stage_trainable": _BOOL,
    "perframe_ae": _BOOL,  # decoding frame by frame or not gives the same frames (checked below for ToonCrafter)
    "loop_video": _BOOL,  # stored, never read, by ToonCrafter's code
}

_UNET_PARAMS: dict[str, _Key] = {
    **{name: _field(f"unet.{name}") for name in (
        "in_channels", "out_channels", "model_channels", "num_res_blocks", "num_head_channels",
        "transformer_depth", "context_dim", "temporal_length", "default_fs")},
    "attention_resolutions": _field("unet.attention_resolutions", **_INT_LIST),
    "channel_mult": _field("unet.channel_mult", **_INT_LIST),
    **{name: _field(f"unet.{name}", lambda v: isinstance(v, bool), "true or false") for name in (
        "temporal_conv", "temporal_attention", "addition_attention", "image_cross_attention",
        "image_cross_attention_scale_learnable", "fs_condition")},
    "use_linear": _equals(True),
    "temporal_selfatt_only": _equals(True),
    "use_relative_position": _equals(False),
    "use_causal_attention": _equals(False),
    "dropout": _NUMBER, "use_checkpoint": _BOOL,
}

_DDCONFIG: dict[str, _Key] = {
    **{name: _field(f"vae.{name}") for name in (
        "z_channels", "resolution", "in_channels", "out_ch", "ch", "num_res_blocks")},
    "ch_mult": _field("vae.ch_mult", **_INT_LIST),
    "attn_resolutions": _field("vae.attn_resolutions", **_INT_LIST),
    "double_z": _equals(True),
    "dropout": _NUMBER,
    # ToonCrafter's decoder (AutoencoderKL_Dualref) reads these; the 2-D decoder ignores them
    "attn_level": _field("vae.reference_attention_levels", **_INT_LIST),
    "time_mode": _equals("conv-only"),
    "merge_strategy": _equals("learned"),
    "video_kernel_size": _Key(lambda v: v == [3, 1, 1], "only [3, 1, 1] is implemented"),
    "alpha": _NUMBER,  # the initial value of the learned mix_factor: the checkpoint holds its value
}

_FIRST_STAGE_PARAMS: dict[str, _Key] = {
    "embed_dim": _field("vae.embed_dim"),
    "ddconfig": _Key(lambda v: isinstance(v, dict), "a mapping"),
    "lossconfig": _ANY, "monitor": _ANY,
}

_TEXT_PARAMS: dict[str, _Key] = {
    "arch": _field("clip.arch", lambda v: isinstance(v, str), "an OpenCLIP architecture name"),
    "layer": _field("clip.text_layer", lambda v: v in ("last", "penultimate"), "'last' or 'penultimate'"),
    "max_length": _equals(77),
    "version": _ANY,  # pretrained weights tag: the checkpoint holds the weights
    "freeze": _BOOL, "device": _ANY,
}

_IMAGE_PARAMS: dict[str, _Key] = {
    "arch": _field("image_arch", lambda v: isinstance(v, str), "an OpenCLIP architecture name"),
    "layer": _equals("pooled"),
    "antialias": _equals(True),
    "version": _ANY, "freeze": _BOOL, "device": _ANY,
}

_RESAMPLER_PARAMS: dict[str, _Key] = {
    name: _field(f"resampler.{name}") for name in (
        "dim", "depth", "dim_head", "heads", "num_queries", "embedding_dim", "output_dim", "ff_mult", "video_length")
}

# sub-section of model.params -> (accepted targets, parameter table, required)
_SECTIONS: dict[str, tuple[_Key, dict[str, _Key], bool]] = {
    "unet_config": (_classes("UNetModel"), _UNET_PARAMS, True),
    "first_stage_config": (_classes("AutoencoderKL", "AutoencoderKL_Dualref"), _FIRST_STAGE_PARAMS, True),
    "cond_stage_config": (_classes("FrozenOpenCLIPEmbedder"), _TEXT_PARAMS, False),
    "img_cond_stage_config": (_classes("FrozenOpenCLIPImageEmbedderV2"), _IMAGE_PARAMS, False),
    "image_proj_stage_config": (_classes("Resampler"), _RESAMPLER_PARAMS, True),
}


class _Reader:
    """Walks one YAML document, collecting implemented values and refusing everything else."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, Any] = {}

    def fail(self, message: str) -> None:
        raise UserError(f"{self.path}: {message}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{where} must be a mapping, got {type(value).__name__}.")
        return value

    def read(self, params: Any, table: dict[str, _Key], where: str) -> dict[str, Any]:
        params = self.mapping(params if params is not None else {}, where)
        for key, value in params.items():
            rule = table.get(key)
            if rule is None:
                self.fail(f"{where}.{key} is not a setting this package implements; remove it or use a released config.")
            if not rule.accept(value):
                self.fail(f"{where}.{key} is {_show(value)}, which this package does not implement ({rule.wanted}).")
            if rule.into is not None:
                self.values[rule.into] = tuple(value) if isinstance(value, list) else value
        return params

    def section(self, params: dict[str, Any], name: str, target_rule: _Key, table: dict[str, _Key],
                required: bool) -> str | None:
        where = f"model.params.{name}"
        if name not in params:
            if required:
                self.fail(f"{where} is missing.")
            return None
        section = self.mapping(params[name], where)
        for key in section:
            if key not in ("target", "params"):
                self.fail(f"{where}.{key} is not a setting this package implements; remove it or use a released config.")
        target = section.get("target")
        if not target_rule.accept(target):
            self.fail(f"{where}.target is {_show(target)}, which this package does not implement ({target_rule.wanted}).")
        self.read(section.get("params"), table, f"{where}.params")
        return target


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _build(cls: type, values: dict[str, Any], prefix: str, **extra: Any) -> Any:
    kwargs = {k[len(prefix) + 1:]: v for k, v in values.items() if k.startswith(prefix + ".")}
    kwargs.update(extra)
    return cls(**kwargs)


def load_config(path: str | Path, name: str | None = None) -> ModelConfig:
    """Read a model config in the original DynamiCrafter / ToonCrafter YAML layout, strictly.

    A key this package does not implement, or a value of it that it does not implement, is one
    ``ValueError`` naming the file and the key. ``first_stage_config.target`` ending in
    ``AutoencoderKL_Dualref`` selects ToonCrafter's decoder (and makes the model an
    interpolation model). A top-level ``open_clip_configs: {arch: {...}}`` entry supplies the
    OpenCLIP architecture when it is not one open_clip ships. ``target`` class paths are never
    imported.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"Config file {path} does not exist.") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable YAML file ({type(exc).__name__}: {str(exc).splitlines()[0]}).") from None
    reader = _Reader(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        reader.fail("this is not a DynamiCrafter model config (no 'model' mapping at the top).")
    for key in doc:
        if key not in ("model", "open_clip_configs"):
            reader.fail(f"top-level key {key!r} is not a setting this package implements; only 'model' "
                        "(and 'open_clip_configs') are read.")
    model = doc["model"]
    for key in model:
        if key not in ("target", "params"):
            reader.fail(f"model.{key} is not a setting this package implements; remove it or use a released config.")
    model_target = _classes("LatentVisualDiffusion")
    if not model_target.accept(model.get("target")):
        reader.fail(f"model.target is {_show(model.get('target'))}, which this package does not implement "
                    f"({model_target.wanted}).")
    params = reader.mapping(model.get("params"), "model.params")
    table = {**_MODEL_PARAMS, **{section: _ANY for section in _SECTIONS}}
    reader.read(params, table, "model.params")
    targets = {name: reader.section(params, name, *spec) for name, spec in _SECTIONS.items()}
    ddconfig = params["first_stage_config"].get("params", {}) or {}
    reader.read(ddconfig.get("ddconfig"), _DDCONFIG, "model.params.first_stage_config.params.ddconfig")

    values = reader.values
    dual = str(targets["first_stage_config"]).rsplit(".", 1)[-1] == "AutoencoderKL_Dualref"
    if dual and params.get("perframe_ae") is False:
        reader.fail("model.params.perframe_ae is false, which ToonCrafter's decoder does not implement "
                    "(it decodes windows of frames; only true is implemented).")
    arch = values.get("clip.arch", "ViT-H-14")
    if values.get("image_arch", arch) != arch:
        reader.fail(f"model.params.img_cond_stage_config.params.arch is {values['image_arch']!r} but the text "
                    f"encoder's is {arch!r}; only one OpenCLIP architecture for both is implemented.")
    clip_configs = doc.get("open_clip_configs") or {}
    if not isinstance(clip_configs, dict):
        reader.fail("open_clip_configs must be a mapping of architecture names to open_clip model configs.")
    try:
        clip = CLIPConfig(arch=arch, model_cfg=clip_configs.get(arch),
                          text_layer=values.get("clip.text_layer", "last"))
        diffusion = _build(DiffusionConfig, values, "diffusion")
        v_pred = diffusion.parameterization == "v"
        diffusion = dataclasses.replace(diffusion, timestep_spacing="uniform_trailing" if v_pred else "uniform",
                                        guidance_rescale=0.7 if v_pred else 0.0)
        vae = _build(VAEConfig, values, "vae", dual_reference=dual)
        unet = _build(UNetConfig, values, "unet")
        resampler = _build(ResamplerConfig, values, "resampler")
        if values.get("channels", vae.embed_dim) != vae.embed_dim:
            reader.fail(f"model.params.channels is {values['channels']} but the VAE's latents have "
                        f"{vae.embed_dim} channels.")
        size = values.get("image_size", 32)
        latent_h, latent_w = (size, size) if isinstance(size, int) else size
        down = 2 ** (len(vae.ch_mult) - 1)
        return ModelConfig(
            name=name or path.stem,
            height=latent_h * down,
            width=latent_w * down,
            unet=unet,
            vae=vae,
            clip=clip,
            resampler=resampler,
            diffusion=diffusion,
            fs_kind="fps" if values.get("fs_kind", "fs") == "fps" else "frame_stride",
            interp=bool(values.get("interp", False)) or dual,
        )
    except ValueError as exc:
        if str(exc).startswith(f"{path}:"):
            raise
        raise UserError(f"{path}: {exc}") from None
