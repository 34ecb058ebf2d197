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
- the leakage-free start step within the model's timesteps and not below the step count
  (:func:`check_start_step`);
- the values a call uses for the options left to the model (:func:`model_defaults`);
- what a sequence of pieces (chained segments, keyframe interpolations) may be and how many
  frames it gives once joined (:class:`SequenceRequest`, :func:`check_segments`,
  :func:`check_keyframes`, :func:`joined_frames`).

Importing this module does not import torch: the command line checks a run with these rules
before it loads anything heavy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

from .configs import DUAL_REFERENCE_MIN_FRAMES
from .errors import UserError
from .images import load_image
from .masks import check_mask_size, load_mask
from .options import OPTIONS
from .prompt_schedule import check_schedule

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .configs import ModelConfig

__all__ = ["GenerationRequest", "MODES", "MIN_INTERP_FRAMES", "OUTPUT_TYPES", "CALLBACK_TENSOR_INPUTS",
           "check_mode", "frame_floor", "check_frames", "check_windows", "check_start_step", "close_loop",
           "model_defaults", "SequenceRequest", "check_segments", "check_keyframes", "check_keyframe_sizes",
           "joined_frames", "default_overlap", "per_piece"]

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


def check_start_step(start_step: int | None, steps: int, max_steps: int,
                     names: tuple[str, str] = ("start_step", "num_inference_steps")) -> int:
    """The timestep ``M`` sampling starts from (``None``: ``max_steps``, the usual start), or one sentence naming ``names``.

    The sampler's ``steps`` distinct timesteps lie in ``[0, M)``: at most ``M`` of them.
    """
    if start_step is None:
        return max_steps
    if start_step > max_steps:
        raise UserError(f"{names[0]} can be at most the model's {max_steps} training timesteps, got {start_step}.")
    if steps > start_step:
        raise UserError(f"{names[1]} ({steps}) can be at most {names[0]} ({start_step}): "
                        "the sampler visits that many distinct timesteps below it.")
    return start_step


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
    A prompt is a string or a schedule ``{frame: prompt}`` of two prompts or more, sorted by
    frame (:mod:`~dynamicrafter.prompt_schedule`).

    ``start_step`` is the timestep ``M`` sampling starts from (the model's number of timesteps
    unless the leakage-free start gives a smaller one);
    ``analytic_init`` says whether its noise is Analytic-Init's, with the statistics of
    ``analytic_init_path`` (``None``: the model's published file); the pipeline's
    ``check_inputs`` puts the checked :class:`~dynamicrafter.diffusion.leakage.AnalyticInit` in
    ``analytic_statistics``.
    """

    images: list["Image.Image"]
    end_images: list["Image.Image"] | None
    prompts: list[str | dict[int, str]]
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
    start_step: int = 1000
    analytic_init: bool = False
    analytic_init_path: str | None = None
    analytic_statistics: Any = None
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    output_type: str = "pt"
    callback: Callable[[int, int], None] | None = None
    callback_on_step_end: Callable[..., Any] | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)
    #: Motion masks (greyscale; 0 is still), one per image, or ``None``; see :mod:`dynamicrafter.masks`.
    masks: list["Image.Image"] | None = None
    augmentation_level: float = 0.0
    image_embed_ratio: float = 1.0
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
              callback_on_step_end_tensor_inputs: Any = ("latents",), mask: Any = None,
              control_images: Any = None, controlnets: int = 0, **options: Any) -> "GenerationRequest":
        """Check a call's inputs for the model of ``config``; ``options`` are the option table's names.

        ``max_steps`` is the model's number of training timesteps. Images are read here (see
        :func:`~dynamicrafter.images.load_image`), so an unreadable file fails before the model
        runs. Raises one :class:`UserError` sentence per problem.
        """
        images = _as_list(image, "image")
        if not images:
            raise UserError("No image given; pass an image or a non-empty list of images.")
        count = len(images)
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
        prompts = [check_schedule(p, frames) if isinstance(p, dict) else _text(p, "prompt")
                   for p in _broadcast(prompt, count, "prompt")]
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
        ratio = values.get("image_embed_ratio", OPTIONS["image_embed_ratio"].default)
        if ratio != 1.0 and end_images is None:
            raise UserError("image_embed_ratio mixes the start and end images' embeddings; it needs an end_image "
                            "(an interpolation model), or leave it at 1.")
        if mask is not None and end_images is not None:
            raise UserError("A mask holds parts of the video to the one input image; it cannot be combined with "
                            "end_image (interpolation or a loop).")
        window, stride = check_windows(config, values.get("window_size"),
                                       values.get("window_stride", OPTIONS["window_stride"].default))
        start_step = check_start_step(values.get("start_step"), steps, max_steps)
        per_prompt = values["num_videos_per_prompt"]
        down = config.latent_downscale
        shape = (count * per_prompt, config.vae.embed_dim, frames, size["height"] // down, size["width"] // down)
        controls = _check_controls(control_images, controlnets, control_scale, frames, values)
        loaded = [load_image(i) for i in images]
        masks = None
        if mask is not None:
            masks = [load_mask(m) for m in _broadcast(mask, count, "mask")]
            for index, (m, i) in enumerate(zip(masks, loaded)):
                check_mask_size(m, i, index if count > 1 else None)
        return cls(
            **controls,
            images=loaded,
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
            start_step=start_step,
            analytic_init=bool(values.get("analytic_init")) or values.get("analytic_init_path") is not None,
            analytic_init_path=values.get("analytic_init_path"),
            generator=_check_generator(generator, count * per_prompt), latents=_check_latents(latents, shape),
            output_type=output_type, callback=callback, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tuple(callback_on_step_end_tensor_inputs), masks=masks,
            augmentation_level=values.get("augmentation_level", OPTIONS["augmentation_level"].default),
            image_embed_ratio=ratio)


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


# ------------------------------------------------------------------ sequences (see dynamicrafter.sequences)
def joined_frames(num_frames: int, pieces: int, overlap: int = 0, cut: int = 0, loop: bool = False) -> int:
    """Frames of ``pieces`` videos of ``num_frames`` each once joined.

    Each junction (``pieces - 1`` of them, ``pieces`` with ``loop``, which joins the last piece to
    the first) loses ``cut`` frames and merges ``overlap`` frames: ``pieces * num_frames -
    junctions * (overlap + cut)``.
    """
    junctions = pieces if loop else pieces - 1
    return pieces * num_frames - junctions * (overlap + cut)


def default_overlap(num_frames: int) -> int:
    """The overlap of chained segments left to the default: 1, the frame two segments share (0 for 1-frame segments)."""
    return min(1, num_frames - 1)


def check_segments(num_frames: int, segments: int, overlap: int,
                   names: tuple[str, str, str] = ("segments", "overlap", "num_frames")) -> int:
    """The frames chained ``segments`` give, or one sentence: the overlap must leave each segment a frame of its own."""
    if segments > 1 and overlap >= num_frames:
        raise UserError(f"{names[1]} must be less than {names[2]} ({num_frames}), got {overlap}: "
                        "each segment needs frames of its own.")
    return joined_frames(num_frames, segments, overlap)


def check_keyframes(config: "ModelConfig", count: int, num_frames: int, cut: int, loop: bool = False,
                    names: tuple[str, str, str] = ("keyframes", "cut_near_keyframes", "num_frames")) -> int:
    """The frames ``count`` keyframes give (one interpolation per pair, one more back to the first with ``loop``).

    Raises one sentence for a model that cannot interpolate, fewer than two keyframes, or a cut
    that would leave an interpolation no frame.
    """
    check_mode(config, "interp", names[0])
    if count < 2:
        raise UserError(f"{names[0]} needs at least 2 images (a start and an end keyframe), got {count}.")
    if cut >= num_frames:
        raise UserError(f"{names[1]} must be less than {names[2]} ({num_frames}), got {cut}: "
                        "every interpolation must keep frames of its own.")
    return joined_frames(num_frames, count if loop else count - 1, cut=cut, loop=loop)


def check_keyframe_sizes(images: Sequence["Image.Image"], names: Sequence[str] = ()) -> None:
    """Refuse keyframes of different sizes: one sentence naming the first that differs from keyframe 1.

    ``names`` are the keyframes' file names where they came from files (shown in brackets).
    """
    first = images[0].size
    for index, image in enumerate(images[1:], start=1):
        if image.size != first:
            name = names[index] if index < len(names) else ""
            which = f"Keyframe {index + 1}" + (f" ({name})" if name else "")
            raise UserError(f"{which} is {image.size[0]}x{image.size[1]} but keyframe 1 is {first[0]}x{first[1]}; "
                            "give keyframes of one size.")


def per_piece(value: Any, pieces: int, piece: str, name: str = "prompt") -> list:
    """One value per piece of a sequence: a single value (or a list of one) is repeated."""
    if not isinstance(value, (list, tuple)):
        return [value] * pieces
    if len(value) not in (1, pieces):
        raise UserError(f"Got {pieces} {piece}s but {len(value)} {name}s; give one {name} per {piece} "
                        f"or a single {name}.")
    return list(value) * (pieces if len(value) == 1 else 1)


@dataclass
class SequenceRequest:
    """One long video made of pieces, checked: chained ``segments`` or ``keyframes`` interpolations.

    ``starts[i]``/``ends[i]`` are piece ``i``'s images (for segments only ``starts[0]``; the later
    starts come from the frames made, and ``ends`` is ``None``); ``prompts``/``negative_prompts``
    hold one entry per piece. ``frames`` is the length of the joined video.
    """

    kind: str  # "segments" or "keyframes"
    starts: list["Image.Image"]
    ends: list["Image.Image"] | None
    prompts: list[str]
    negative_prompts: list[str | None]
    overlap: int
    cut: int
    loop: bool
    num_frames: int
    frames: int
    generator: Any = None

    @property
    def pieces(self) -> int:
        return len(self.prompts)

    @classmethod
    def build(cls, config: "ModelConfig", *, image: Any, keyframes: Any, prompt: Any, negative_prompt: Any,
              end_image: Any, segments: Any, overlap: Any, cut_near_keyframes: Any, loop: Any, num_frames: Any,
              num_videos_per_prompt: Any, latents: Any, output_type: Any, generator: Any) -> "SequenceRequest":
        """Check what a sequence call adds to a plain one (each piece's call checks the rest)."""
        segments, overlap, cut = (OPTIONS[n].check(v) for n, v in (
            ("segments", segments), ("overlap", overlap), ("cut_near_keyframes", cut_near_keyframes)))
        frames = OPTIONS["num_frames"].check(num_frames)
        overlap = default_overlap(frames) if overlap is None else overlap
        if not isinstance(loop, bool):
            raise UserError(f"loop must be True or False, got {type(loop).__name__} {loop!r}.")
        if keyframes is not None and segments > 1:
            raise UserError("segments and keyframes cannot be combined; keyframes already make one "
                            "interpolation per pair of keyframes.")
        if OPTIONS["num_videos_per_prompt"].check(num_videos_per_prompt) != 1:
            raise UserError(f"segments and keyframes make one video per call; num_videos_per_prompt must be 1, "
                            f"got {num_videos_per_prompt}.")
        if latents is not None:
            raise UserError("latents cannot be given with segments or keyframes: each piece draws its own noise "
                            "from the generator.")
        if output_type == "latent":
            raise UserError("output_type 'latent' is not available with segments or keyframes: the pieces are "
                            "joined as frames.")
        if isinstance(generator, (list, tuple)):
            if len(generator) != 1:
                raise UserError(f"Got {len(generator)} generators for 1 video; segments and keyframes make one "
                                "video, from a single generator.")
            generator = generator[0]
        if keyframes is None:
            if loop:
                raise UserError("loop closes a keyframe sequence; give keyframes=[...] (for a looping video of "
                                "one image pass end_image=image).")
            if end_image is not None:
                raise UserError("end_image cannot be combined with segments; for several key images give "
                                "keyframes=[...].")
            images = _as_list(image, "image")
            if len(images) != 1:
                raise UserError(f"segments make one video from one image, got {len(images)} images; call once per "
                                "image.")
            total = check_segments(frames, segments, overlap)
            starts, ends, pieces, piece = [load_image(images[0])], None, segments, "segment"
        else:
            if image is not None or end_image is not None:
                raise UserError("Give either keyframes or image (and end_image), not both.")
            keys = list(keyframes) if isinstance(keyframes, (list, tuple)) else [keyframes]
            total = check_keyframes(config, len(keys), frames, cut, loop)
            files = [isinstance(k, (str, os.PathLike)) for k in keys]
            loaded = [load_image(k, None if file else f"Keyframe {i + 1}")
                      for i, (k, file) in enumerate(zip(keys, files))]
            check_keyframe_sizes(loaded, [Path(k).name if file else "" for k, file in zip(keys, files)])
            pieces, piece = (len(keys) if loop else len(keys) - 1), "interpolation"
            starts = loaded[:pieces]
            ends = [loaded[(i + 1) % len(loaded)] for i in range(pieces)]
        if isinstance(prompt, dict) or isinstance(prompt, (list, tuple)) and any(isinstance(p, dict) for p in prompt):
            raise UserError("A prompt schedule ({frame: prompt}) times the frames of one call; with segments or "
                            f"keyframes give one prompt per {piece} instead.")
        prompts = [_text(p, "prompt") for p in per_piece(prompt, pieces, piece)]
        negative = [None if n is None else _text(n, "negative_prompt")
                    for n in per_piece(negative_prompt, pieces, piece, "negative_prompt")]
        return cls(kind="segments" if keyframes is None else "keyframes", starts=starts, ends=ends, prompts=prompts,
                   negative_prompts=negative, overlap=overlap if keyframes is None else 0,
                   cut=cut if keyframes is not None else 0, loop=loop, num_frames=frames, frames=total,
                   generator=_check_generator(generator, 1))
