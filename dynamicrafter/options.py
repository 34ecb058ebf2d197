"""The generation options, defined once.

Every option a user can set for one generation (steps, guidance, motion, frames, seed, ...) is
an :class:`Option` row of :data:`SAMPLING_OPTIONS`: its pipeline keyword, type, default,
bounds, help text, command-line flag (the usage guide's name, with older spellings as
aliases), the models it applies to, and how the web app shows it. The pipeline's input checks
(:meth:`Option.check`), the command line's flags (:func:`add_arguments`), the app's controls
and the benchmark's flags are all built from these rows, so a default or a bound is changed
in one place.

The options that choose *how* a model runs rather than what it generates (device, precision,
offload, compilation, checkpoint files) are rows of :data:`RUNTIME_OPTIONS`, shared the same
way by the command line, the app and the benchmark.
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import UserError

if TYPE_CHECKING:
    from .configs import ModelConfig

__all__ = [
    "Option", "SAMPLING_OPTIONS", "RUNTIME_OPTIONS", "OPTIONS", "CALL_OPTIONS", "DEFAULTS", "MAX_SEED", "MAX_FRAMES",
    "MAX_SIDE", "MAX_STEPS", "MAX_SEGMENTS", "MAX_CUT",
    "MODEL_ARGUMENTS", "SAMPLERS", "SPACINGS", "OFFLOAD_MODES", "QUANTIZE_MODES", "COMPILE_MODES",
    "add_arguments", "add_model_arguments", "check_number", "check_device_name", "motion_control", "number_arg",
]

#: Seeds are 0 .. 2**32 - 1 everywhere (command line, app, pipeline helpers).
MAX_SEED = 2**32 - 1
#: Most frames one video may have: the models are trained on 16 (longer videos attend in windows of
#: frames, ``window_size``); memory grows linearly.
MAX_FRAMES = 128
#: Most chained segments of one video (``segments``).
MAX_SEGMENTS = 64
#: Most frames cut where two keyframe interpolations meet (``cut_near_keyframes``; kijai's node allows 5).
MAX_CUT = 5
#: Largest output height or width in pixels (the largest released model makes 576x1024).
MAX_SIDE = 2048
#: Most sampling steps (the models have 1000 training timesteps).
MAX_STEPS = 1000

# The names the table offers, spelled here so that a command checks its arguments without importing torch;
# tests/test_options.py holds each to the module that implements it.
#: Sampler names, the keys of ``dynamicrafter.diffusion.sampling.SAMPLERS``; the first is the default.
SAMPLERS = ("ddim", "dpmpp_2m", "unipc")
#: ``dynamicrafter.diffusion.schedule.SPACINGS``: which training timesteps a sampler visits.
SPACINGS = ("uniform", "uniform_trailing")
#: ``dynamicrafter.offload.OFFLOAD_MODES``.
OFFLOAD_MODES = ("none", "encoders", "model")
#: ``dynamicrafter.quantization.QUANTIZE_MODES``.
QUANTIZE_MODES = ("none", "fp8", "fp8_weights")
#: ``dynamicrafter.runtime.COMPILE_MODES``: the ``torch.compile`` modes.
COMPILE_MODES = ("regional", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _all_models(_: "ModelConfig") -> bool:
    return True


@dataclass(frozen=True)
class Option:
    """One generation option.

    Attributes:
        name: the pipeline's keyword argument.
        type: ``int``, ``float`` or ``str``.
        default: the value used when the option is not given; ``None`` means "the model's own"
            (see :meth:`model_default`) or "off".
        help: one line for ``--help`` and the app.
        minimum, maximum: inclusive bounds of a number.
        choices: allowed values of a string option.
        flag: the command-line flag (default ``--<name>``); ``aliases`` are other spellings.
        applies: which models the option makes sense for.
        ui: ``(low, high, step)`` of the app's slider, or ``None`` when the app shows no slider.
        label: the app's label.
        none_means: what a ``None`` default means, for the help text.
        text_check: for a string option, raises a one-sentence ``UserError`` for a malformed value.
    """

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    applies: Callable[["ModelConfig"], bool] = field(default=_all_models, compare=False, repr=False)
    ui: tuple[float, float, float] | None = None
    label: str = ""
    none_means: str = "the model's"
    text_check: Callable[[str], None] | None = field(default=None, compare=False, repr=False)

    @property
    def flags(self) -> tuple[str, ...]:
        """Every command-line spelling, the guide's first."""
        return (self.flag or f"--{self.name}", *self.aliases)

    def check(self, value: Any, what: str | None = None) -> Any:
        """``value`` checked against type and bounds; ``None`` passes when the default is ``None``.

        Raises:
            ValueError: one sentence naming the option (or ``what``) and what it accepts.
        """
        what = self.name if what is None else what
        if value is None and self.default is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise UserError(f"{what} must be True or False, got {type(value).__name__} {value!r}.")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise UserError(f"{what} must be a string, got {type(value).__name__}.")
            if self.choices is not None and value not in self.choices:
                raise UserError(f"Unknown {what} {value!r}; choose one of: {', '.join(self.choices)}.")
            if self.text_check is not None:
                self.text_check(value)
            return value
        return check_number(value, what, integer=self.type is int, minimum=self.minimum, maximum=self.maximum)

    def parse(self, text: str) -> Any:
        """An argparse ``type``: the text as this option's value, or an ``ArgumentTypeError``."""
        if self.type is str:
            value: Any = text
            if self.text_check is not None:
                try:
                    self.text_check(text)
                except UserError as exc:
                    raise argparse.ArgumentTypeError(str(exc).rstrip(".")) from None
                return text
        else:
            try:
                value = self.type(text)
            except ValueError:
                expected = "an integer" if self.type is int else "a number"
                raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return self.check(value, "")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).strip().rstrip(".")) from None


def number_arg(integer: bool = False, minimum: float | None = None,
               maximum: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type`` for a bounded number that is not a sampling or model option (a server's port)."""
    return Option("value", int if integer else float, None, "", minimum=minimum, maximum=maximum).parse


def check_number(value: Any, what: str, *, integer: bool = False, minimum: float | None = None,
                 maximum: float | None = None) -> Any:
    """A real, finite number (a whole one if ``integer``) within the bounds, as a Python number.

    Booleans, strings, arrays and non-finite values are refused with one sentence.
    """
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{what} must be {kind}, got {type(value).__name__} {value!r}.")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise UserError(f"{what} must be {kind}, got {value!r}.")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{what} must be a finite number, got {value}.")
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise UserError(f"{what} must be between {_show(minimum)} and {_show(maximum)}, got {_show(value)}.")
    if minimum is not None and value < minimum:
        raise UserError(f"{what} must be at least {_show(minimum)}, got {_show(value)}.")
    if maximum is not None and value > maximum:
        raise UserError(f"{what} must be at most {_show(maximum)}, got {_show(value)}.")
    return value


def _show(number: float) -> str:
    """A bound or value as a user typed it: whole numbers in full, others shortest."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"



#: Device types torch knows besides those a command runs on (cpu, mps, cuda).
OTHER_TORCH_DEVICES = ("xpu", "hip", "hpu", "xla", "lazy", "meta", "mtia", "maia", "ipu", "ve", "fpga", "vulkan",
                       "mkldnn", "ideep", "opengl", "opencl", "privateuseone")


def check_device_name(text: str) -> None:
    """Refuse a device name that no command accepts, without importing torch (whether it is there is checked later)."""
    if re.fullmatch(r"auto|(cpu|mps|cuda)(:\d+)?", text):
        return
    kind = re.fullmatch(r"([a-z]+)(:\d+)?", text)
    if kind and kind[1] in OTHER_TORCH_DEVICES:
        raise UserError(f"Device type {kind[1]!r} is not supported; use cuda, mps or cpu.")
    raise UserError(f"{text!r} is not a torch device; use for example cuda:0, mps or cpu.")


def _check_statistics_path(text: str) -> None:
    """Refuse an ``analytic_init_path`` that is not an existing file (read later, with torch)."""
    from pathlib import Path

    if not Path(text).is_file():
        raise UserError(f"analytic_init_path {text} does not exist.")


def motion_control(config: "ModelConfig") -> tuple[str, str, tuple[float, float, float]]:
    """Label, hint and ``(low, high, step)`` of the motion control: frame stride (256) or frame rate (others)."""
    if config.fs_kind == "frame_stride":
        return "Frame stride", "larger = more motion", (1, 10, 1)
    return "FPS", "smaller = more motion", (5, 30, 1)


SAMPLING_OPTIONS: tuple[Option, ...] = (
    Option("num_inference_steps", int, 50, "sampling steps (exactly this many); fewer is faster and rougher",
           minimum=1, maximum=MAX_STEPS, aliases=("--steps",), ui=(1, 100, 1), label="Sampling steps"),
    Option("guidance_scale", float, 7.5, "text guidance strength (classifier-free guidance; 1 turns it off)",
           minimum=0, maximum=100, ui=(1.0, 15.0, 0.5), label="Guidance scale"),
    Option("image_guidance_scale", float, None,
           "image guidance strength for two-scale guidance, as the original's --multiple_cond_cfg --cfg_img: "
           "uncond + cfg_img * (image - uncond) + guidance_scale * (cond - image); a third UNet branch per step",
           minimum=0, maximum=100, flag="--cfg_img", aliases=("--image_guidance_scale",),
           ui=(0.0, 15.0, 0.5), label="Image guidance scale (0 = off)", none_means="off"),
    Option("sampler", str, SAMPLERS[0],
           "sampler: ddim (the original's), dpmpp_2m (DPM-Solver++(2M), 10-25 steps) or unipc (UniPC, 5-15 steps); "
           "the last two are deterministic", choices=SAMPLERS, label="Sampler"),
    Option("eta", float, 1.0, "DDIM eta (the ddim sampler only): 0 is deterministic, 1 the most random",
           minimum=0, maximum=1, ui=(0.0, 1.0, 0.1), label="ETA (0 = deterministic sampling)"),
    Option("frame_stride", int, None,
           "motion: frame stride for the 256 model (larger = more motion), frames per second for the others "
           "(smaller = more motion)", minimum=1, maximum=100),
    Option("num_frames", int, 16, f"frames per video, 1 to {MAX_FRAMES} (the models are trained on 16; "
           "longer videos attend in windows, window_size)",
           minimum=1, maximum=MAX_FRAMES, flag="--video_length", aliases=("--num_frames", "--frames"),
           ui=(1, MAX_FRAMES, 1), label="Number of frames"),
    Option("window_size", int, None,
           "FreeNoise: with more frames than this, temporal attention runs in windows of this many frames",
           minimum=1, maximum=MAX_FRAMES, label="Window size (frames)",
           none_means="the model's trained length, 16"),
    Option("window_stride", int, 4, "FreeNoise: frames between the starts of two windows, at most window_size",
           minimum=1, maximum=MAX_FRAMES, label="Window stride (frames)"),
    Option("noise_rescheduling", bool, True,
           "FreeNoise: the starting noise of each later block of window_stride frames is a shuffled copy of "
           "the block window_size frames earlier (with windows, unless latents are given)",
           label="Noise rescheduling"),
    Option("augmentation_level", float, 0.0,
           "noise added to the input image(s) before they are encoded, as kijai's wrapper: its standard deviation "
           "on the 0-1 pixel scale; more loosens the video's hold on the image (0 is off)",
           minimum=0, maximum=1, ui=(0.0, 0.5, 0.01), label="Image augmentation (noise on the input image)"),
    Option("image_embed_ratio", float, 1.0,
           "interpolation: the image tokens are this much the start image's and the rest the end image's "
           "(1 = the start image only, as the original; 0 = the end image only)",
           minimum=0, maximum=1, applies=lambda config: config.interp, ui=(0.0, 1.0, 0.05),
           label="Start/end image embedding mix"),
    Option("segments", int, 1,
           "chained segments: each of num_frames frames, each later one animating the last frame of the one "
           "before; per-segment prompts from a list or one prompt-file line per segment",
           minimum=1, maximum=MAX_SEGMENTS, ui=(1, 8, 1), label="Segments (chained)"),
    Option("overlap", int, None,
           "chained segments: the last frames of a segment cross-faded with the first of the next (1: their "
           "shared frame once; 0 joins them end to end, that frame twice)",
           minimum=0, maximum=MAX_FRAMES - 1, ui=(0, 8, 1), label="Overlap between segments (frames)",
           none_means="1 (0 for segments of one frame)"),
    Option("cut_near_keyframes", int, 1,
           "keyframes: frames dropped where two interpolations meet at a keyframe, as kijai's node (one pass): "
           "1 drops the repeated keyframe, 2 both its copies, 3 one more after it, ...; 0 keeps the repeat",
           minimum=0, maximum=MAX_CUT, ui=(0, MAX_CUT, 1), label="Frames cut at each keyframe"),
    Option("start_step", int, None,
           "leakage-free start (Zhao et al. 2024): sampling starts at training timestep M (of the model's 1000) "
           "instead of the last, the steps spread over [0, M); smaller M = more motion, too small = blur",
           minimum=1, maximum=MAX_STEPS, flag="--start_step", ui=(1, MAX_STEPS, 1),
           label="Start step M (1000 = the usual start)", none_means="the last timestep: the usual sampler"),
    Option("analytic_init", bool, False,
           "leakage-free start: the starting noise at start_step gets the mean and spread of the training "
           "latents (Analytic-Init, Zhao et al. 2024): from analytic_init_path, else the CIL authors' statistics "
           "of the 512 or 1024 model, downloaded once", flag="--analytic_init",
           label="Analytic-Init (start from the training latents' statistics)"),
    Option("analytic_init_path", str, None,
           "an Analytic-Init statistics file (the CIL authors' initial_noise_512.pt / initial_noise_1024.pt, "
           "keys Expectation_X0 and Tr_Cov_d, or a .safetensors copy); giving one turns analytic_init on",
           flag="--analytic_init_path", label="Analytic-Init statistics file (on the server)",
           none_means="the CIL authors' file of the 512 or 1024 model", text_check=_check_statistics_path),
    Option("height", int, None, f"video height in pixels, a multiple of 64 up to {MAX_SIDE}",
           minimum=64, maximum=MAX_SIDE),
    Option("width", int, None, f"video width in pixels, a multiple of 64 up to {MAX_SIDE}",
           minimum=64, maximum=MAX_SIDE),
    Option("guidance_rescale", float, None,
           "rescale of the guided prediction towards the conditional one's spread, 0-1",
           minimum=0, maximum=1, none_means="the model's: 0 for 256, 0.7 for the others"),
    Option("timestep_spacing", str, None, "which training timesteps the sampler visits",
           choices=SPACINGS),
    Option("num_videos_per_prompt", int, 1, "videos per image, each from its own noise (sample k uses seed + k)",
           minimum=1, maximum=64, flag="--n_samples", aliases=("--num_videos_per_prompt",)),
    Option("seed", int, 123, f"random seed, 0 to {MAX_SEED}", minimum=0, maximum=MAX_SEED, label="Seed"),
    Option("negative_prompt", str, None, "what the video should not show, e.g. 'blurry, low quality'",
           label="Negative prompt", none_means="none"),
    Option("fps", int, 8, "frame rate written into the video file", minimum=1, maximum=120,
           label="Frame rate of the written video"),
    Option("control_scale", float, 0.6,
           "strength of the control images (a ControlNet's or ToonCrafter's sketch encoder's residuals): 0 is no "
           "control; 0.6 is the sketch guidance's default; a list gives one per ControlNet (pipeline only)",
           minimum=0, maximum=2, ui=(0.0, 2.0, 0.05), label="Control strength"),
    Option("control_start", float, 0.0, "the fraction of the sampling steps after which the control starts",
           minimum=0, maximum=1, ui=(0.0, 1.0, 0.05), label="Control from (fraction of the steps)"),
    Option("control_end", float, 1.0, "the fraction of the sampling steps after which the control stops",
           minimum=0, maximum=1, ui=(0.0, 1.0, 0.05), label="Control until (fraction of the steps)"),
)

#: Options that choose how the model runs: device, precision, memory, files.
RUNTIME_OPTIONS: tuple[Option, ...] = (
    Option("device", str, None, "torch device such as cuda:0, cuda:1, mps or cpu",
           none_means="cuda:0, else mps, else cpu", text_check=check_device_name),
    Option("threads", int, None, "CPU threads for the model's arithmetic on the CPU", minimum=1, maximum=1024,
           none_means="the usable CPUs not busy with other work, said in the log"),
    Option("dtype", str, "auto", "weights and compute precision; auto picks per device",
           choices=("auto", "float32", "float16", "bfloat16")),
    Option("offload", str, None,
           "what stays in host memory between uses: none, encoders (the CLIP towers) or model (every "
           "component; least GPU memory)", choices=OFFLOAD_MODES, none_means="encoders on CUDA"),
    Option("checkpoint", str, None, "model weights, .ckpt or .safetensors", none_means="downloaded to checkpoints/"),
    Option("config", str, None, "model config YAML in the original layout", none_means="the preset"),
    Option("clip_checkpoint", str, None,
           "OpenCLIP ViT-H-14 weights for a checkpoint without the CLIP towers (a pruned fp16 file)",
           none_means="downloaded once from laion/CLIP-ViT-H-14-laion2B-s32B-b79K when needed"),
    Option("lora", str, None, "LoRA weights made by `dynamicrafter train` (a folder or adapter_model.safetensors)",
           none_means="none"),
    Option("lora_scale", float, 1.0, "strength of the LoRA: 0 is the base model, 1 as trained", minimum=0,
           maximum=10),
    Option("quantize", str, "none",
           "float8 weights for the UNet's linear layers (torchao): fp8 (float8 matmuls; a CUDA GPU of compute "
           "capability 8.9+ such as Ada or Hopper, with bfloat16) or fp8_weights (half the linear weight memory, "
           "any device, not faster)", choices=QUANTIZE_MODES),
    Option("compile", bool, False, "torch.compile the UNet's repeated blocks (regional): the first video of each "
           "size compiles about two dozen block graphs, cached on disk for later processes"),
    Option("batch_size", int, 1, "videos per pipeline call; more is faster on a large GPU and needs more memory",
           minimum=1, maximum=256),
)

OPTIONS: dict[str, Option] = {option.name: option for option in (*SAMPLING_OPTIONS, *RUNTIME_OPTIONS)}

#: The sampling options that are keywords of a pipeline call (``seed`` becomes its generator,
#: ``fps`` is the written file's); :class:`~dynamicrafter.request.GenerationRequest` checks them.
CALL_OPTIONS = tuple(option.name for option in SAMPLING_OPTIONS if option.name not in ("seed", "fps"))

#: The defaults by attribute: ``DEFAULTS.guidance_scale`` is 7.5.
DEFAULTS = SimpleNamespace(**{option.name: option.default for option in OPTIONS.values()})


def add_arguments(parser: argparse.ArgumentParser | Any, names: Iterable[str], *,
                  defaults: dict[str, Any] | None = None, shown: dict[str, str] | None = None) -> None:
    """Add the named options to an argparse parser (or argument group) with their flags and help.

    Numbers are checked while parsing (type and bounds); ``defaults`` overrides table defaults
    and ``shown`` the default's description in the help. The destination is always the
    pipeline's keyword (``--video_length`` sets ``num_frames``).
    """
    defaults, shown = defaults or {}, shown or {}
    for name in names:
        option = OPTIONS[name]
        default = defaults.get(name, option.default)
        text = shown.get(name, option.none_means if default is None else default)
        kwargs: dict[str, Any] = dict(dest=option.name, default=default, help=f"{option.help} (default: {text})")
        if option.type is bool:
            parser.add_argument(*option.flags, dest=option.name, action=argparse.BooleanOptionalAction,
                                default=bool(default), help=f"{option.help} (default: {'on' if default else 'off'})")
            continue
        if option.choices is not None:
            kwargs["choices"] = option.choices
        elif option.type is not str:
            kwargs["type"] = option.parse
            kwargs["metavar"] = "N" if option.type is int else "X"
        elif option.text_check is not None:
            kwargs["type"] = option.parse
        parser.add_argument(*option.flags, **kwargs)


#: The runtime options every front end takes (the command line, the app, the benchmark).
MODEL_ARGUMENTS = ("device", "dtype", "threads", "offload", "quantize", "checkpoint", "config", "clip_checkpoint",
                   "lora", "lora_scale", "compile")


def add_model_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """Add :data:`MODEL_ARGUMENTS`: how the model is loaded and run."""
    add_arguments(parser, MODEL_ARGUMENTS)
