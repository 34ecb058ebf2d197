"""One generation request: the pipeline's inputs checked, and the rules every front end shares.

:meth:`GenerationRequest.build` checks a call's inputs against the option table
(:mod:`dynamicrafter.options`) and the model's config, reads the images with the one image
loader, and fills in the model's defaults, before any model work: a bad input is one
:class:`~dynamicrafter.errors.UserError` sentence.

The request rules are defined here once and used by the pipeline, the command line and the app:

- which *mode* a video is made in (:data:`MODES`): ``single`` (animate one image), ``interp``
  (from a start to an end image) or ``loop`` (the image is both; the repeated last frame is
  dropped, :func:`close_loop`), and that the last two need an interpolation model
  (:func:`check_mode`);
- the fewest frames a mode and model can make (:func:`frame_floor`, :func:`check_frames`);
- FreeNoise's window stride at most its window size (:func:`check_windows`);
- the values a call uses for the options left to the model (:func:`model_defaults`).

Importing this module does not import torch: the command line checks a run with these rules
before it loads anything heavy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

from .configs import DUAL_REFERENCE_MIN_FRAMES
from .errors import UserError
from .images import load_image
from .options import OPTIONS

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .configs import ModelConfig

__all__ = ["GenerationRequest", "MODES", "MIN_INTERP_FRAMES", "OUTPUT_TYPES", "CALLBACK_TENSOR_INPUTS",
           "check_mode", "frame_floor", "check_frames", "check_windows", "close_loop", "model_defaults"]

#: How a video is made: from one image, between two images, or a seamless loop of one image.
MODES = ("single", "interp", "loop")
#: Fewest frames of an interpolation: its start and its end frame.
MIN_INTERP_FRAMES = 2
OUTPUT_TYPES = ("pt", "np", "latent")
#: What ``callback_on_step_end`` can be given: the latent after the step and the predicted clean latent.
CALLBACK_TENSOR_INPUTS = ("latents", "denoised")
logger = logging.getLogger(__name__)

GeneratorInput = Union["torch.Generator", Sequence["torch.Generator"], None]


def check_mode(config: "ModelConfig", mode: str, what: str | None = None) -> None:
    """Refuse an ``interp`` or ``loop`` video on a model that cannot interpolate (``what`` names the input)."""
    if mode not in MODES:
        raise UserError(f"Unknown mode {mode!r}; choose one of: {', '.join(MODES)}.")
    if mode != "single" and not config.interp:
        raise UserError(f"{what or mode} needs an interpolation model (512_interp or tooncrafter), "
                        f"not {config.name}.")


def frame_floor(config: "ModelConfig", mode: str = "single", decoded: bool = True) -> tuple[int, str]:
    """The fewest frames a video of ``mode`` can have on this model, and why (for the message).

    An interpolation needs its start and end frame; a loop one more, since its repeated last frame
    is dropped; ToonCrafter's decoder needs :data:`DUAL_REFERENCE_MIN_FRAMES` whenever frames are
    ``decoded``.
    """
    least, reason = {"interp": (MIN_INTERP_FRAMES, "interpolation (a start and an end frame)"),
                     "loop": (MIN_INTERP_FRAMES + 1,
                              "a loop (two frames remain once the repeated last one is dropped)")}.get(mode, (1, ""))
    if decoded and config.vae.dual_reference and least < DUAL_REFERENCE_MIN_FRAMES:
        least, reason = DUAL_REFERENCE_MIN_FRAMES, "ToonCrafter's decoder"
    return least, reason


def check_frames(config: "ModelConfig", frames: int, mode: str = "single", what: str = "num_frames",
                 decoded: bool = True) -> int:
    """``frames`` if the mode and model can make that many, else one sentence naming ``what``."""
    least, reason = frame_floor(config, mode, decoded)
    if frames < least:
        raise UserError(f"{what} must be at least {least} for {reason}, got {frames}.")
    return frames


def check_windows(config: "ModelConfig", size: int | None, stride: int,
                  names: tuple[str, str] = ("window_size", "window_stride")) -> tuple[int, int]:
    """FreeNoise's window size (``None``: the model's trained length) and stride, or one sentence naming ``names``.

    A stride above the size is refused: the windows would leave frames without temporal attention.
    """
    size = config.unet.temporal_length if size is None else size
    if stride > size:
        raise UserError(f"{names[1]} must be at most {names[0]} ({size}), got {stride}: "
                        "windows further apart would leave frames without temporal attention.")
    return size, stride


def model_defaults(config: "ModelConfig") -> dict[str, Any]:
    """The value a call uses for each option left at ``None`` ("the model's"), by option name."""
    return {"guidance_rescale": config.diffusion.guidance_rescale, "timestep_spacing": config.diffusion.timestep_spacing,
            "frame_stride": config.default_fs, "height": config.height, "width": config.width}


def close_loop(videos: Any) -> Any:
    """A loop's videos ``[B, T, ...]`` without their last frame, which repeats the first."""
    return videos[:, :-1]


@dataclass
class GenerationRequest:
    """One pipeline call's inputs, checked, with the model's defaults filled in.

    ``batch`` videos are made: ``len(images) * num_videos_per_prompt``, video ``i * k + j`` being
    sample ``j`` of image ``i``. ``frame_stride``, ``guidance_rescale`` and ``timestep_spacing``
    hold the values used (the model's when not given); ``image_guidance_scale`` is ``None`` for
    one-scale guidance. ``latent_shape`` is ``[batch, 4, num_frames, height / 8, width / 8]``.
    """

    images: list["Image.Image"]
    end_images: list["Image.Image"] | None
    prompts: list[str]
    negative_prompts: list[str] | None
    num_inference_steps: int
    guidance_scale: float
    image_guidance_scale: float | None
    guidance_rescale: float
    eta: float
    sampler: str
    timestep_spacing: str
    frame_stride: int
    num_frames: int
    height: int
    width: int
    num_videos_per_prompt: int
    latent_shape: tuple[int, ...]
    window_size: int = 16
    window_stride: int = 4
    noise_rescheduling: bool = True
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    output_type: str = "pt"
    callback: Callable[[int, int], None] | None = None
    callback_on_step_end: Callable[..., Any] | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)
    #: Per loaded ControlNet, its control images by frame (``None``: no control); see :mod:`dynamicrafter.control`.
    control_images: list[dict[int, "Image.Image"]] | None = None
    control_scale: tuple[float, ...] = (0.6,)
    control_start: float = 0.0
    control_end: float = 1.0

    @property
    def batch(self) -> int:
        return len(self.images) * self.num_videos_per_prompt

    @property
    def mode(self) -> str:
        return "single" if self.end_images is None else "interp"

    @property
    def windowed(self) -> bool:
        """Whether temporal attention runs in FreeNoise's windows: more frames than ``window_size``."""
        return self.num_frames > self.window_size

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0

    @classmethod
    def build(cls, config: "ModelConfig", *, max_steps: int, image: Any, prompt: Any = "",
              negative_prompt: Any = None, end_image: Any = None, generator: Any = None, latents: Any = None,
              output_type: Any = "pt", callback: Any = None, callback_on_step_end: Any = None,
              callback_on_step_end_tensor_inputs: Any = ("latents",), control_images: Any = None,
              controlnets: int = 0, **options: Any) -> "GenerationRequest":
        """Check a call's inputs for the model of ``config``; ``options`` are the option table's names.

        ``max_steps`` is the model's number of training timesteps. Images are read here (see
        :func:`~dynamicrafter.images.load_image`), so an unreadable file fails before the model
        runs. Raises one :class:`UserError` sentence per problem.
        """
        images = _as_list(image, "image")
        if not images:
            raise UserError("No image given; pass an image or a non-empty list of images.")
        count = len(images)
        prompts = [_text(p, "prompt") for p in _broadcast(prompt, count, "prompt")]
        negative = None if negative_prompt is None else [
            _text(n, "negative_prompt") for n in _broadcast(negative_prompt, count, "negative_prompt")]
        if end_image is not None:
            check_mode(config, "interp", "end_image")
        end_images = None if end_image is None else _broadcast(end_image, count, "end_image")
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"Unknown output_type {output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}.")
        _check_callbacks(callback, callback_on_step_end, callback_on_step_end_tensor_inputs)

        control_scale = options.pop("control_scale", OPTIONS["control_scale"].default)
        values = {name: OPTIONS[name].check(value) for name, value in options.items()}
        steps = values["num_inference_steps"]
        if steps > max_steps:
            raise UserError(f"num_inference_steps can be at most {max_steps}, got {steps}.")
        frames = check_frames(config, values["num_frames"], "single" if end_images is None else "interp",
                              decoded=output_type != "latent")
        defaults = model_defaults(config)
        size = {}
        for side in ("height", "width"):
            size[side] = _default(values[side], defaults[side])
            if size[side] % config.size_multiple:
                raise UserError(f"{side} must be a multiple of {config.size_multiple} pixels, got {size[side]}.")
        image_scale = values["image_guidance_scale"]
        if image_scale is not None and values["guidance_scale"] == 1.0:
            logger.warning("image_guidance_scale has no effect with guidance_scale 1 (no guidance), "
                           "as in the original.")
            image_scale = None
        window, stride = check_windows(config, values.get("window_size"),
                                       values.get("window_stride", OPTIONS["window_stride"].default))
        per_prompt = values["num_videos_per_prompt"]
        down = config.latent_downscale
        shape = (count * per_prompt, config.vae.embed_dim, frames, size["height"] // down, size["width"] // down)
        controls = _check_controls(control_images, controlnets, control_scale, frames, values)
        return cls(
            **controls,
            images=[load_image(i) for i in images],
            end_images=None if end_images is None else [load_image(i) for i in end_images],
            prompts=prompts, negative_prompts=negative, num_inference_steps=steps,
            guidance_scale=values["guidance_scale"], image_guidance_scale=image_scale,
            guidance_rescale=_default(values["guidance_rescale"], defaults["guidance_rescale"]),
            eta=values["eta"], sampler=values["sampler"],
            timestep_spacing=values["timestep_spacing"] or defaults["timestep_spacing"],
            frame_stride=_default(values["frame_stride"], defaults["frame_stride"]), num_frames=frames,
            height=size["height"], width=size["width"], num_videos_per_prompt=per_prompt, latent_shape=shape,
            window_size=window, window_stride=stride,
            noise_rescheduling=values.get("noise_rescheduling", OPTIONS["noise_rescheduling"].default),
            generator=_check_generator(generator, count * per_prompt), latents=_check_latents(latents, shape),
            output_type=output_type, callback=callback, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tuple(callback_on_step_end_tensor_inputs))


def _check_controls(images: Any, controlnets: int, scale: Any, frames: int, values: dict) -> dict[str, Any]:
    """The control fields of a request: images per ControlNet and frame, scales, the steps' span."""
    option = OPTIONS["control_scale"]
    scales = [option.check(s) for s in scale] if isinstance(scale, (list, tuple)) else [option.check(scale)]
    start, end = values.pop("control_start", 0.0), values.pop("control_end", 1.0)
    if start >= end:
        raise UserError(f"control_start must be below control_end, got {start:g} and {end:g}.")
    if images is None:
        return {"control_scale": tuple(scales), "control_start": start, "control_end": end}
    if controlnets == 0:
        raise UserError("control_images needs a ControlNet or sketch encoder: load one first "
                        "(pipe.load_controlnet(path), --control).")
    per_net = [images] if controlnets == 1 else images
    if controlnets > 1 and (not isinstance(images, (list, tuple)) or len(images) != controlnets):
        raise UserError(f"{controlnets} ControlNets are loaded: give control_images as a list of {controlnets} "
                        "entries, one per ControlNet in the order loaded.")
    if len(scales) == 1:
        scales *= controlnets
    if len(scales) != controlnets:
        raise UserError(f"control_scale has {len(scales)} values for {controlnets} ControlNets; give one for all "
                        "or one per ControlNet.")
    loaded = []
    for entry in per_net:
        by_frame = frame_images(entry, frames)
        read: dict[int, Any] = {}  # one image given for many frames is read once
        for frame, image in by_frame.items():
            if id(image) not in read:
                read[id(image)] = load_image(image, f"The control image for frame {frame}")
        loaded.append({frame: read[id(image)] for frame, image in by_frame.items()})
    return {"control_images": loaded, "control_scale": tuple(scales), "control_start": start, "control_end": end}


def frame_images(images: Any, num_frames: int) -> dict[int, Any]:
    """``{frame: image}`` from one image, a list of one per frame, or a dict (negative frames count from the end).

    Raises :class:`UserError` for a count or a frame that does not fit ``num_frames``.
    """
    if isinstance(images, Mapping):
        frames = {}
        for frame, image in images.items():
            if isinstance(frame, bool) or not isinstance(frame, int) or not -num_frames <= frame < num_frames:
                raise UserError(f"control_images has an image for frame {frame!r}; the video's frames are 0 to "
                                f"{num_frames - 1}.")
            frames[frame % num_frames] = image
        if not frames:
            raise UserError("control_images is an empty dict; give at least one {frame: image}.")
        return frames
    if isinstance(images, (list, tuple)):
        if len(images) == 1:
            return dict.fromkeys(range(num_frames), images[0])
        if len(images) != num_frames:
            raise UserError(f"control_images has {len(images)} images, but the video has {num_frames} frames: give "
                            "one image per frame, one for all frames, or a dict {frame: image}.")
        return dict(enumerate(images))
    return dict.fromkeys(range(num_frames), images)


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if value is None:
        raise UserError(f"{name} is required.")
    return [value]


def _broadcast(value: Any, count: int, name: str) -> list:
    """One value per image: a single value is repeated; a list must have one per image."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise UserError(f"Got {count} image(s) but {len(value)} {name}(s); give one {name} per image.")
    return list(value)


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{name} must be a string (or a list of strings), got {type(value).__name__}.")
    return value


def _check_callbacks(callback: Any, on_step_end: Any, tensor_inputs: Any) -> None:
    if callback is not None and not callable(callback):
        raise UserError(f"callback must be callable, got {type(callback).__name__}.")
    if on_step_end is not None and not callable(on_step_end):
        raise UserError("callback_on_step_end must be a function (pipe, step, t, tensors) -> dict or None.")
    if isinstance(tensor_inputs, str) or any(name not in CALLBACK_TENSOR_INPUTS for name in tensor_inputs):
        raise UserError(f"callback_on_step_end_tensor_inputs must be a list drawn from "
                        f"{', '.join(CALLBACK_TENSOR_INPUTS)}; got {tensor_inputs!r}.")


def _check_generator(generator: Any, batch: int) -> torch.Generator | list[torch.Generator] | None:
    import torch

    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise UserError(f"Got {len(generator)} generators for {batch} video(s); give one per video "
                            "(images x num_videos_per_prompt) or a single generator.")
        return list(generator)
    raise UserError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}; "
                    "for a seed use torch.Generator().manual_seed(seed).")


def _check_latents(latents: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
    import torch

    if latents is None:
        return None
    if not isinstance(latents, torch.Tensor):
        raise UserError(f"latents must be a torch.Tensor, got {type(latents).__name__}.")
    if not latents.is_floating_point():
        raise UserError(f"latents must be a floating-point tensor, got {latents.dtype}.")
    if tuple(latents.shape) != shape:
        raise UserError(f"latents must have shape {list(shape)}, got {list(latents.shape)}.")
    if not torch.isfinite(latents).all():
        raise UserError("latents hold NaN or infinite values.")
    return latents
