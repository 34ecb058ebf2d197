"""Image-to-video pipeline: image + prompt -> encoders -> sampler <-> UNet -> VAE -> frames.

:class:`DynamiCrafterImg2VideoPipeline` holds the model components and runs a call as five named
steps: check the inputs (:mod:`.request`), encode the prompts and images, prepare the noise,
denoise (a sampler of :mod:`.diffusion.sampling` over the guided UNet of
:func:`.diffusion.guidance.guided_model`) and decode. Device, precision, offload and the float32
redo of an overflowing half-precision run follow :mod:`.runtime` and :mod:`.offload`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .augmentation import augment_pixels, mix_image_tokens
from .checkpoints import load_model
from .configs import ModelConfig, model_config, resolve_resolution
from .diffusion.denoiser import ModelDenoiser
from .diffusion.guidance import GuidanceBranches, guided_model
from .diffusion.leakage import AnalyticInit
from .diffusion.rescheduling import block_permutations, reschedule_noise
from .diffusion.sampling import StepInfo
from .diffusion.sampling import sample as run_sampler
from .errors import GenerationError, UserError
from .images import ImageInput, fit_image, load_image
from .masks import StillRegions, latent_mask
from .models.attention import use_temporal_windows
from .models.dynamicrafter import DynamiCrafter
from .models.encoders import prompt_token_count
from .offload import Offloader, offload_mode
from .options import CALL_OPTIONS, DEFAULTS, OPTIONS
from .prompt_schedule import interpolate, prompt_text
from .quantization import quantize_mode, quantize_unet
from .request import GenerationRequest, GeneratorInput, SequenceRequest, check_frames
from .runtime import (
    CompiledModule,
    allow_tf32,
    compile_mode,
    finite_or_redo_in_float32,
    resolve_device,
    resolve_dtype,
    vae_dtype_for,
)
from .sequences import make_sequence

__all__ = ["DynamiCrafterImg2VideoPipeline", "GenerationRequest", "GenerationError", "load_image", "fit_image"]

logger = logging.getLogger(__name__)

#: A call's checked arguments besides the images, prompts and the option table's (see :meth:`check_inputs`).
REQUEST_ARGUMENTS = ("generator", "latents", "output_type", "callback", "callback_on_step_end",
                     "callback_on_step_end_tensor_inputs", "mask", "control_images")


def _randn(shape: Sequence[int], generator: torch.Generator | list[torch.Generator] | None,
           device: torch.device) -> torch.Tensor:
    """Float32 Gaussian noise on ``device``, drawn on the generator's own device.

    With a list of generators, video ``i`` of the batch is drawn from ``generator[i]`` alone, so
    it does not depend on what else is in the batch.
    """
    if isinstance(generator, list):
        return torch.cat([_randn((1, *shape[1:]), g, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)


class DynamiCrafterImg2VideoPipeline:
    """Animate an image with a text prompt using a DynamiCrafter model.

    Args:
        resolution: which model: ``'256'``, ``'512'``, ``'1024'``, ``'512_interp'`` or
            ``'tooncrafter'`` (also ``'256_256'``, ``'512_512'``, ``'1024_1024'``, ``'320_512'``,
            ``'576_1024'``, ``'toon'``).
        device: where to run; default ``cuda:0`` when available, else Apple's ``mps``, else the
            CPU (with a warning).
        checkpoint: a ``.ckpt`` or ``.safetensors`` file; default
            ``checkpoints/<model>_v1/model.ckpt``, downloaded when missing.
        clip_checkpoint: an OpenCLIP state dict file for a checkpoint without the CLIP towers
            (the "pruned" files); default the OpenCLIP ViT-H-14 ``laion2b_s32b_b79k`` weights,
            downloaded once into the Hugging Face cache when such a checkpoint is loaded.
        config: a :class:`ModelConfig` or the path of a model config in the original YAML
            format; default the preset of ``resolution``.
        dtype: ``torch.float32``/``float16``/``bfloat16`` or their names; default bf16 where the
            hardware has fast bf16 (recent GPUs, CPUs with AMX/AVX-512 BF16), fp16 on other GPUs,
            else float32. The VAE never runs in float16.
        offload: what stays in host memory between uses: ``'none'``, ``'encoders'`` (the
            default on CUDA) or ``'model'`` (``True``); nothing is offloaded on other devices.
        compile: ``torch.compile`` the UNet: ``True`` (= ``'regional'``: its repeated blocks, one
            graph per distinct block shape shared by every block of that shape), a mode of
            :data:`~dynamicrafter.runtime.COMPILE_MODES` that compiles the whole UNet as one graph
            (``'default'``, ``'reduce-overhead'`` with CUDA graphs, ...), or ``False`` (default).
            The first video of each size compiles; the kernels are cached on disk for the next
            process (see :meth:`compile_unet`).
        quantize: float8 weights for the UNet's linear layers through ``torchao`` (see
            :mod:`dynamicrafter.quantization`): ``'fp8'`` (float8 weights and activations, float8
            matmuls: CUDA GPUs of compute capability 8.9+ and ``dtype`` bfloat16), ``'fp8_weights'``
            (float8 weights computed in ``dtype``: half the linear weight memory, any device) or
            ``'none'``/``None`` (default). The VAE, CLIP towers, resampler and LoRA layers keep
            their dtype. A quantized UNet has no float32 redo for non-finite output (it raises
            :class:`GenerationError`); it stays quantized under ``offload`` and takes LoRAs.

    Example::

        pipe = DynamiCrafterImg2VideoPipeline("256")
        out = pipe(Image.open("cat.png"), "a cat turning its head", generator=torch.Generator().manual_seed(123))
        pipe.save_video(out["videos"], "cat.mp4", fps=8)
    """

    def __init__(self, resolution: str = "256", device: str | torch.device | None = None,
                 checkpoint: str | Path | None = None, config: ModelConfig | str | Path | None = None,
                 dtype: str | torch.dtype | None = None, *, clip_checkpoint: str | Path | None = None,
                 offload: bool | str | None = None, compile: bool | str = False,
                 quantize: str | bool | None = None, sequential_guidance: bool = False,
                 decode_chunk_size: int | None = None) -> None:
        name = resolve_resolution(resolution)
        if not isinstance(config, ModelConfig):
            config = model_config(name, config)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        quantize = quantize_mode(quantize, device, dtype)  # before the download and the load
        if checkpoint is None:
            from .hub import ensure_checkpoint  # the download stack is only needed here

            checkpoint = ensure_checkpoint(name)
        self.checkpoint: Path | None = Path(checkpoint)
        home = device if offload_mode(offload, device) == "none" else torch.device("cpu")
        # load_model says in one sentence what is wrong with a missing, folder or malformed file.
        model = load_model(config, checkpoint, dtype=dtype, device=home, vae_dtype=vae_dtype_for(dtype, device),
                           clip_checkpoint=clip_checkpoint)
        self._setup(model, device, dtype, offload, compile, quantize, sequential_guidance, decode_chunk_size)

    @classmethod
    def from_model(cls, model: DynamiCrafter, device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None, *, cast: bool = True,
                   **options: Any) -> "DynamiCrafterImg2VideoPipeline":
        """A pipeline around an already built model (moved to ``device``).

        With ``cast`` (the default) the model is cast to ``dtype`` (the VAE to its own rule) and
        frozen in eval mode; without it the model is shared as it is, dtypes, gradients and
        training mode untouched (a training loop making sample videos from its live model).
        ``options`` are the keyword-only options of the constructor.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        quantize_mode(options.get("quantize"), device, dtype)  # before the model is cast or moved
        if cast:
            model.to(dtype=dtype)
            model.vae.to(dtype=vae_dtype_for(dtype, device))
            model.eval().requires_grad_(False)
        pipe = cls.__new__(cls)
        pipe.checkpoint = None
        pipe._setup(model, device, dtype, **options)
        return pipe

    def _setup(self, model: DynamiCrafter, device: torch.device, dtype: torch.dtype,
               offload: bool | str | None = None,
               compile: bool | str = False, quantize: str | bool | None = None, sequential_guidance: bool = False,
               decode_chunk_size: int | None = None) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.device = device
        self.dtype = dtype
        #: Run the conditional and unconditional branches one after the other (less memory).
        self.sequential_guidance = sequential_guidance
        #: Frames the VAE decodes at once; default a quarter megapixel per chunk (4 frames at 256x256).
        self.decode_chunk_size = decode_chunk_size or max(1, 2 ** 18 // (self.config.height * self.config.width))
        self._place(offload_mode(offload, device))
        self._interrupt = False
        #: The ``torch.compile`` mode of the UNet, or None when it runs eagerly (see :func:`compile_mode`).
        self.compile_mode = compile_mode(compile)
        self._wrap_unet()
        #: How the UNet's linear weights are stored: one of ``QUANTIZE_MODES`` (see :meth:`quantize_unet`).
        self.quantize = "none"
        self.quantize_unet(quantize)
        self._uncond_text: dict[str, torch.Tensor] = {}
        self._zero_image_tokens: torch.Tensor | None = None
        #: The loaded ControlNets and sketch encoders (:meth:`load_controlnet`), in the order loaded.
        self.controlnets: list[torch.nn.Module] = []
        allow_tf32(device, dtype)
        logger.info("Ready: %s model on %s in %s (offload: %s, compile: %s, quantize: %s).", self.config.name,
                    device, str(dtype).replace("torch.", ""), self.offload, self.compile_mode or "off", self.quantize)

    def quantize_unet(self, mode: str | bool | None) -> int:
        """Give the UNet float8 linear weights in place (see :mod:`dynamicrafter.quantization`); returns the layers.

        ``mode`` is ``'fp8'``, ``'fp8_weights'`` or ``'none'``/``None`` (nothing happens). The
        weights are quantized where the UNet is (on the device, or in host memory when it is
        offloaded, where they are then pinned again); a compiled UNet compiles again. Once
        quantized, the UNet stays so: load the pipeline again for other weights.

        Raises:
            ValueError: one sentence: the mode cannot run here, or the UNet is already quantized.
        """
        mode = quantize_mode(mode, self.device, self.dtype)
        if mode == "none":
            return 0
        if self.quantize != "none":
            raise UserError(f"The UNet is already quantized ({self.quantize}); load the pipeline again "
                             "to quantize it otherwise.")
        count = quantize_unet(self.model.unet, mode, self.device, self.dtype)
        self.quantize = mode
        self._place(self.offload)  # pins the new host tensors of an offloaded UNet
        self._wrap_unet()
        return count

    def compile_unet(self, compile: bool | str | None) -> str | None:
        """Compile the UNet from the next call on, in another mode, or not (``False``); returns the mode.

        ``compile`` is the constructor's: ``True`` (``'regional'``), a mode of
        :data:`~dynamicrafter.runtime.COMPILE_MODES`, or ``False``/``None`` (eager). Regional
        compilation compiles the UNet's blocks in place (their ``forward``; weights and key names
        are untouched) and a change of mode gives them back their eager ``forward`` first.
        """
        self.compile_mode = compile_mode(compile)
        self._wrap_unet()
        return self.compile_mode

    def _wrap_unet(self) -> None:
        """What the sampler calls: the UNet, or its ``torch.compile`` wrapper in :attr:`compile_mode`."""
        previous = getattr(self, "_unet_forward", None)
        if isinstance(previous, CompiledModule):
            previous.restore()
        unet = self.model.unet
        self._unet_forward: Callable = CompiledModule(unet, self.compile_mode) if self.compile_mode else unet

    def _place(self, mode: str) -> None:
        """Put each component on the device or in host memory according to the offload mode."""
        m = self.model
        encoders = [m.cond_stage_model, m.embedder, m.image_proj_model]
        on_host = {"none": [], "encoders": encoders, "model": [*encoders, m.unet, m.vae]}[mode]
        resident = [c for c in (*encoders, m.unet, m.vae) if not any(c is h for h in on_host)]
        self.offload = mode
        self._offloader = Offloader(self.device, resident, on_host)

    def enable_model_cpu_offload(self) -> None:
        """Keep every component in host memory and lend it to the GPU only while it runs.

        The least GPU memory (about the UNet's weights plus its activations) for a few hundred
        milliseconds of copying per video. The default on CUDA already keeps the text and image
        encoders, which run once per call, in host memory.
        """
        self._place(offload_mode(True, self.device))

    def load_lora_weights(self, path: str | Path, scale: float = 1.0) -> None:
        """Apply a LoRA trained with ``dynamicrafter train`` (a folder or its ``adapter_model.safetensors``).

        ``scale`` is its strength, 0 to 10 (0 gives the base model's output; the ``--lora_scale``
        rule of the option table). A LoRA already loaded is replaced once the new one has passed
        every check. Raises :class:`~dynamicrafter.errors.UserError` (one sentence) for a bad
        scale, a missing, unreadable or malformed file or a LoRA of another model; the UNet is then
        left as it was.
        """
        from .lora import load_lora  # peft is imported only when a LoRA is used

        count = load_lora(self.model.unet, path, self.config, scale)
        logger.info("Loaded LoRA %s (%d layers, scale %g).", path, count, scale)

    def load_controlnet(self, path: str | Path) -> int:
        """Load a ControlNet or ToonCrafter's sketch encoder for ``control_images``; returns how many are loaded.

        ``path``: ToonCrafter's ``sketch_encoder.ckpt`` (or a ``.safetensors`` copy) or a Stable
        Diffusion 2.1 ControlNet in the original (``.pth``/``.ckpt``/``.safetensors``, with or
        without ``control_model.``) or diffusers layout. Each call adds one; several add their
        residuals. Raises :class:`~dynamicrafter.checkpoints.CheckpointMismatchError` (one
        sentence) for a file that is not a ControlNet for this model's UNet.
        """
        from .control import load_controlnet

        self.controlnets.append(load_controlnet(path, self.config.unet, self.dtype, self.device))
        return len(self.controlnets)

    def unload_controlnets(self) -> None:
        """Forget every loaded ControlNet: calls run without control again."""
        self.controlnets = []

    def unload_lora_weights(self) -> None:
        """Remove the loaded LoRA, restoring the base UNet exactly (a no-op without one)."""
        from .lora import unload_lora

        unload_lora(self.model.unet)

    def _on_device(self, *modules: torch.nn.Module) -> Any:
        return self._offloader.on_device(*modules)

    # ----------------------------------------------------------------- the call
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput] | None = None,
        prompt: str | dict[int, str] | Sequence[str | dict[int, str]] | None = "",
        negative_prompt: str | Sequence[str] | None = DEFAULTS.negative_prompt,
        num_inference_steps: int = DEFAULTS.num_inference_steps,
        guidance_scale: float = DEFAULTS.guidance_scale,
        eta: float = DEFAULTS.eta,
        frame_stride: int | None = DEFAULTS.frame_stride,
        num_frames: int = DEFAULTS.num_frames,
        height: int | None = DEFAULTS.height,
        width: int | None = DEFAULTS.width,
        guidance_rescale: float | None = DEFAULTS.guidance_rescale,
        timestep_spacing: str | None = DEFAULTS.timestep_spacing,
        generator: GeneratorInput = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        end_image: ImageInput | Sequence[ImageInput] | None = None,
        callback: Callable[[int, int], None] | None = None,
        num_videos_per_prompt: int = DEFAULTS.num_videos_per_prompt,
        sampler: str = DEFAULTS.sampler,
        image_guidance_scale: float | None = DEFAULTS.image_guidance_scale,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        window_size: int | None = DEFAULTS.window_size,
        window_stride: int = DEFAULTS.window_stride,
        noise_rescheduling: bool = DEFAULTS.noise_rescheduling,
        mask: ImageInput | Sequence[ImageInput] | None = None,
        augmentation_level: float = DEFAULTS.augmentation_level,
        image_embed_ratio: float = DEFAULTS.image_embed_ratio,
        segments: int = DEFAULTS.segments,
        overlap: int | None = DEFAULTS.overlap,
        keyframes: Sequence[ImageInput] | None = None,
        loop: bool = False,
        cut_near_keyframes: int = DEFAULTS.cut_near_keyframes,
        start_step: int | None = DEFAULTS.start_step,
        analytic_init: bool | str | os.PathLike = DEFAULTS.analytic_init,
        analytic_init_path: str | os.PathLike | None = DEFAULTS.analytic_init_path,
        control_images: Any = None,
        control_scale: float | Sequence[float] = DEFAULTS.control_scale,
        control_start: float = DEFAULTS.control_start,
        control_end: float = DEFAULTS.control_end,
    ) -> dict[str, Any] | Any:
        """Generate videos.

        Args:
            image: the first frame: a PIL image, an ``HxWx3`` array, a path, or a list of them (a batch).
            prompt: text prompt, or one per image (``None`` is the empty prompt). Several prompts
                over time (FreeNoise's multi-prompt mode): a schedule ``{frame: prompt}`` such as
                ``{0: "a cat sits", 48: "a cat jumps"}``, whose text embeddings are interpolated
                linearly between its frames and held before the first and after the last (see
                :mod:`~dynamicrafter.prompt_schedule`); one schedule for every image, or a list
                mixing prompts and schedules, one per image. The image tokens and the negative
                prompt stay the same on every frame.
            negative_prompt: what to steer away from (the unconditional branch); default empty.
            num_inference_steps: sampling steps (exactly this many are run).
            guidance_scale: classifier-free guidance scale (1 disables guidance).
            eta: DDIM stochasticity, 0 (deterministic) to 1.
            frame_stride: frame stride (256 model; larger = more motion) or frame rate (others;
                smaller = more motion); default the model's (3 / 24 / 10 / 5).
            num_frames: frames to generate, 1 to 128 (the models are trained on 16; see ``window_size``).
            height, width: output size, multiples of 64 up to 2048; default the model's.
            guidance_rescale: guidance rescale factor in [0, 1]; default the model's (0 or 0.7).
            timestep_spacing: ``'uniform'`` or ``'uniform_trailing'``; default the model's.
            generator: a ``torch.Generator`` for the whole batch, or one per video (images x
                ``num_videos_per_prompt``, in that order) so each video is independent of the rest.
            latents: initial noise ``[B, 4, T, H/8, W/8]`` (finite, float); default drawn from ``generator``.
            output_type: ``'pt'`` (``[B, T, 3, H, W]`` float in [0, 1]), ``'np'``
                (``[B, T, H, W, 3]`` float in [0, 1]) or ``'latent'`` (``[B, 4, T, h, w]``).
            return_dict: return ``{"videos": ...}`` (else the bare value).
            end_image: last frame(s), for the interpolation model (``'512_interp'``); give the
                same image as ``image`` for a looping video.
            callback: ``callback(step, total)`` after each denoising step.
            num_videos_per_prompt: videos per image; video ``i * k + j`` is sample ``j`` of image ``i``.
            sampler: ``'ddim'`` (the original's; the default), ``'dpmpp_2m'`` (DPM-Solver++(2M),
                for 10-25 steps) or ``'unipc'`` (UniPC-2, for 5-15 steps). The other two are
                deterministic: ``eta`` is DDIM's and has no effect on them. Every sampler
                visits the same timesteps (``timestep_spacing``).
            image_guidance_scale: two-scale guidance, as the original's ``--multiple_cond_cfg
                --cfg_img``: the output is ``uncond + image_guidance_scale * (image - uncond) +
                guidance_scale * (cond - image)``, where the ``image`` branch has the negative
                (default empty) prompt and the real image tokens. ``None`` (the default) is the
                usual one-scale guidance; equal scales give it too (at the cost of a third
                branch); 1 needs no unconditional branch. With ``guidance_scale = 1`` it is
                ignored, with a warning (the original ignores ``cfg_img`` then).
            callback_on_step_end: diffusers-style ``callback_on_step_end(pipe, step, t, tensors)``
                after each step (``step`` 0-based, ``t`` the timestep, ``tensors`` a dict of
                ``callback_on_step_end_tensor_inputs``). It may return a dict whose ``"latents"``
                replace the current latent, and may set ``pipe._interrupt = True`` to stop:
                the result is then the step's predicted clean latent.
            callback_on_step_end_tensor_inputs: which tensors the callback gets: ``"latents"``
                (``[B, 4, T, h, w]`` after the step) and/or ``"denoised"`` (the predicted clean
                latent of the step, like ``latents``).
            window_size: FreeNoise for videos longer than the model was trained on: with more
                frames than this, every temporal self-attention runs inside windows of this many
                frames, ``window_stride`` apart (plus one ending at the last frame when the stride
                does not reach it), fused with pyramid weights; default the model's trained length
                (16). With ``num_frames <= window_size`` nothing changes.
            window_stride: frames between the starts of two windows, 1 to ``window_size``; default 4.
            noise_rescheduling: with windows, the starting noise of each block of ``window_stride``
                frames after the first window is a shuffled copy of the block ``window_size`` frames
                earlier, the shuffles drawn from ``generator``; not applied to given ``latents``. The
                sampler's per-step noise (``eta > 0``) stays independent per frame.
            mask: a motion mask, or one per image: a greyscale image (file, PIL image, ``HxW`` array
                or 2-D tensor in [0, 1]) of the image's size or aspect ratio; **black (0) is held to
                the input image, any other value moves** (kijai's wrapper's convention). Before every
                step the latent takes the image's latent where the mask is black. Not with
                ``end_image``. See :mod:`dynamicrafter.masks`.
            augmentation_level: noise added to the input image(s) before they are encoded, its
                standard deviation on the [0, 1] pixel scale, 0 to 1 (0, the default, is off); drawn
                from ``generator`` before the starting noise, once per image (with a list of
                generators from that of its first video). See :mod:`dynamicrafter.augmentation`.
            image_embed_ratio: with ``end_image``, the image tokens are ``ratio * start + (1 -
                ratio) * end`` (after the resampler); 1 (the default) is the start image's alone.
            segments: with more than 1, one longer video from one image in chained segments of
                ``num_frames`` (see :mod:`dynamicrafter.sequences`): each later segment animates
                the last frame of the one before; ``prompt`` (and
                ``negative_prompt``) may then be a list of one per segment. A list of prompts
                without ``segments`` keeps its meaning: one per image of a batch.
            overlap: the last frames of a segment cross-faded with the first of the next; 0 to
                ``num_frames - 1`` (default 1: their shared frame, once). The video has
                ``segments * num_frames - (segments - 1) * overlap`` frames.
            keyframes: instead of ``image``, two or more images of one size (interpolation models):
                one interpolation of ``num_frames`` per consecutive pair, joined into one video
                without repeating the shared keyframe; ``prompt`` may be a list of one per
                interpolation.
            loop: with ``keyframes``, one more interpolation from the last keyframe back to the first.
            cut_near_keyframes: frames dropped where two interpolations meet, as kijai's node: 1
                (default) the repeated keyframe, 2 both its copies, ... 0 keeps the repeat. ``N``
                keyframes give ``P * num_frames - J * cut_near_keyframes`` frames, ``P = N - 1``
                interpolations and ``J = P - 1`` junctions (``P = J = N`` with ``loop``).
            start_step: leakage-free start (Zhao et al. 2024, :mod:`.diffusion.leakage`): sampling
                starts at training timestep ``M`` (1 to the model's 1000) instead of the last, the
                ``num_inference_steps`` (at most ``M``) spread over ``[0, M)`` with ``timestep_spacing``;
                every sampler. ``None`` (the default): the usual start.
            analytic_init: start from Analytic-Init's noise (the CIL authors' inference, their
                ``whether_analytic_init``): the starting latent is ``sqrt(abar) * Expectation_X0 +
                sqrt(1 - abar + abar * Tr_Cov_d) * noise`` with ``abar = alphas_cumprod[M - 1]``,
                ``noise`` the usual draw (or the given ``latents``), from the statistics of the
                training latents (``Expectation_X0`` ``[1, 4, T, h, w]`` and ``Tr_Cov_d``) in
                ``analytic_init_path``, else the authors' file of the 512 or 1024 model (downloaded
                once into the Hugging Face cache). A path here is short for ``analytic_init=True,
                analytic_init_path=path``. ``False`` (the default): the noise itself.
            analytic_init_path: the statistics file (``initial_noise_512.pt``, or a ``.safetensors``
                copy) for this video's frame count and latent size; giving it turns ``analytic_init`` on.
            control_images: with a ControlNet or sketch encoder loaded (:meth:`load_controlnet`),
                its control images: one for every frame, a list of one per frame, or a dict
                ``{frame: image}`` (frames without one get no control); with several loaded, a
                list of one such entry per ControlNet. Sketches are line art, dark on light; a
                ControlNet's images are used as given (a depth map, edges, ...). See
                :mod:`dynamicrafter.control`.
            control_scale: the residuals' strength, 0 to 2 (0 gives exactly the uncontrolled
                video); default 0.6; a list gives one per ControlNet.
            control_start, control_end: the fraction of the steps the control acts in (step
                ``i`` of ``n`` when ``start <= i / n`` and ``(i + 1) / n <= end``).

        Segments and keyframes make one video (``[1, F, 3, H, W]``) from one generator: piece
        ``i`` draws its noise after piece ``i - 1``, so the first piece is the plain call's video.

        Raises:
            UserError: a bad input, before any model work (one sentence; a ``ValueError``).
            GenerationError: the model produced NaN or infinite values even in float32.
        """
        options = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
            frame_stride=frame_stride, num_frames=num_frames, height=height, width=width,
            guidance_rescale=guidance_rescale, timestep_spacing=timestep_spacing, callback=callback,
            sampler=sampler, image_guidance_scale=image_guidance_scale, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, window_size=window_size,
            window_stride=window_stride, noise_rescheduling=noise_rescheduling, mask=mask,
            augmentation_level=augmentation_level, image_embed_ratio=image_embed_ratio, start_step=start_step,
            analytic_init=analytic_init, analytic_init_path=analytic_init_path, control_images=control_images,
            control_scale=control_scale, control_start=control_start, control_end=control_end)
        if keyframes is not None or segments != 1 or loop:  # a sequence of plain calls (dynamicrafter.sequences)
            if control_images is not None:
                raise UserError("control_images cannot be combined with segments or keyframes; make each piece "
                                "with its own call.")
            sequence = SequenceRequest.build(
                self.config, image=image, keyframes=keyframes, prompt=prompt, negative_prompt=negative_prompt,
                end_image=end_image, segments=segments, overlap=overlap, cut_near_keyframes=cut_near_keyframes,
                loop=loop, num_frames=num_frames, num_videos_per_prompt=num_videos_per_prompt, latents=latents,
                output_type=output_type, generator=generator)
            result = make_sequence(self, sequence, output_type, options)
            return {"videos": result} if return_dict else result
        request = self.check_inputs(
            image, prompt, negative_prompt, end_image, num_videos_per_prompt=num_videos_per_prompt,
            generator=generator, latents=latents, output_type=output_type, segments=segments, overlap=overlap,
            cut_near_keyframes=cut_near_keyframes, **options)
        branches, reference = self.encode(request)
        x_t = self.prepare_latents(request)
        samples = self.denoise(request, branches, x_t)
        if request.output_type == "latent":
            result: Any = samples
        else:
            frames = self.decode(samples, reference)  # [B, T, 3, H, W] in [0, 1]
            result = frames if request.output_type == "pt" else frames.permute(0, 1, 3, 4, 2).cpu().numpy()
        return {"videos": result} if return_dict else result

    # ------------------------------------------------------------------ 1. check
    def check_inputs(self, image: Any, prompt: Any = "", negative_prompt: Any = None, end_image: Any = None,
                     **options: Any) -> GenerationRequest:
        """Check every input before any model work and fill in the model's defaults.

        Takes ``__call__``'s arguments (the sampling options by their option-table names, the
        callbacks, ``generator``, ``latents``, ``output_type``) and returns the
        :class:`~dynamicrafter.request.GenerationRequest`; raises one
        :class:`~dynamicrafter.errors.UserError` sentence per problem.
        """
        given = {name: options.pop(name) for name in REQUEST_ARGUMENTS if name in options}
        if isinstance(options.get("analytic_init"), (str, os.PathLike)):  # short for True and the file's path
            if options.get("analytic_init_path") is not None:
                raise UserError("Give the Analytic-Init statistics file once: analytic_init=True with "
                                "analytic_init_path=FILE, or analytic_init=FILE.")
            options["analytic_init_path"], options["analytic_init"] = os.fspath(options["analytic_init"]), True
        if isinstance(options.get("analytic_init_path"), os.PathLike):
            options["analytic_init_path"] = os.fspath(options["analytic_init_path"])
        values = {name: options.pop(name, OPTIONS[name].default) for name in CALL_OPTIONS if name != "negative_prompt"}
        if options:
            raise UserError(f"Unknown argument(s): {', '.join(sorted(options))}.")
        request = GenerationRequest.build(self.config, max_steps=self.model.schedule.num_timesteps, image=image,
                                          controlnets=len(self.controlnets),
                                          prompt=prompt, negative_prompt=negative_prompt, end_image=end_image,
                                          **given, **values)
        texts = [text for prompt in request.prompts for text in prompt_text(prompt)]
        self._warn_long_prompts([*texts, *(request.negative_prompts or [])])
        if request.analytic_init:  # read and checked before any model work
            from .hub import ensure_analytic_statistics  # the download stack is only needed here

            path = request.analytic_init_path or ensure_analytic_statistics(self.config.name)
            request.analytic_statistics = AnalyticInit.from_file(path)
            request.analytic_statistics.check_shape(request.latent_shape, request.height, request.width)
        return request

    def _warn_long_prompts(self, prompts: list[str]) -> None:
        limit = self.config.unet.text_context_len
        for text in dict.fromkeys(prompts):
            tokens = prompt_token_count(text)
            if tokens > limit:
                logger.warning("The prompt %r has %d tokens; the text encoder reads only the first %d.",
                               text if len(text) <= 60 else text[:57] + "...", tokens, limit)

    # ----------------------------------------------------------------- 2. encode
    def encode(self, request: GenerationRequest) -> tuple[GuidanceBranches, list[torch.Tensor] | None]:
        """Encode the prompts and images once per image and repeat them for each of its videos.

        Returns the UNet's conditioning of every guidance branch for the ``request.batch`` videos
        and, for ToonCrafter, the key frames' encoder features its decoder reads (else ``None``).
        """
        model = self.model
        pixels, end_pixels = (None if images is None else self._fit(images, request)
                              for images in (request.images, request.end_images))
        if request.augmentation_level > 0:  # start images' noise first, then the end images'
            pixels, end_pixels = (None if p is None else augment_pixels(
                p, request.augmentation_level, _randn(p.shape, self._image_generator(request), self.device))
                for p in (pixels, end_pixels))
        with self._on_device(model.cond_stage_model, model.embedder, model.image_proj_model):
            image_tokens = model.encode_image_tokens(pixels)
            if end_pixels is not None and request.image_embed_ratio != 1.0:
                image_tokens = mix_image_tokens(image_tokens, model.encode_image_tokens(end_pixels),
                                                request.image_embed_ratio)
            if any(isinstance(prompt, dict) for prompt in request.prompts):  # several prompts over time
                text = self._per_frame_text(request.prompts, request.num_frames)
                context = torch.cat([text, image_tokens[:, None].expand(-1, request.num_frames, -1, -1)], dim=2)
            else:
                context = torch.cat([model.encode_text(request.prompts), image_tokens], dim=1)
            uncond = image_context = None
            if request.uses_guidance:
                text = torch.cat([self._uncond_text_tokens(n)
                                  for n in (request.negative_prompts or [""] * len(pixels))])
                if request.image_guidance_scale != 1.0:  # with an image scale of 1 this branch cancels out
                    uncond = torch.cat([text, self._zero_image().expand(len(pixels), -1, -1)], dim=1)
                if request.image_guidance_scale is not None:
                    image_context = torch.cat([text, image_tokens], dim=1)
        concat, reference = self._image_latents(pixels, end_pixels, request.num_frames)

        def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
            per_prompt = request.num_videos_per_prompt
            return t if t is None or per_prompt == 1 else t.repeat_interleave(per_prompt, dim=0)

        fs = torch.full((request.batch,), request.frame_stride, dtype=torch.long, device=self.device)
        branches = GuidanceBranches(repeat(context), repeat(concat), fs, repeat(uncond), repeat(image_context))
        return branches, None if reference is None else [repeat(r) for r in reference]

    @staticmethod
    def _image_generator(request: GenerationRequest) -> Any:
        """The generator(s) an image's own draws come from: with one per video, that of its first video."""
        if isinstance(request.generator, list):
            return request.generator[::request.num_videos_per_prompt]
        return request.generator

    def _still_regions(self, request: GenerationRequest, branches: GuidanceBranches) -> StillRegions | None:
        """The motion masks' blend for the batch, or ``None`` without masks or where nothing is still."""
        if request.masks is None:
            return None
        still = torch.cat([latent_mask(m, request.height, request.width, self.config.latent_downscale)
                           for m in request.masks]).to(self.device)
        if not still.any():  # white everywhere: everything moves, nothing to blend
            return None
        return StillRegions(branches.concat, still.repeat_interleave(request.num_videos_per_prompt, dim=0))

    def _per_frame_text(self, prompts: list[str | dict[int, str]], frames: int) -> torch.Tensor:
        """Each frame's text tokens ``[N, T, 77, D]``: a schedule's interpolated between its keys, a prompt's on every frame."""
        rows = []
        for prompt in prompts:
            tokens = self.model.encode_text(prompt_text(prompt))  # [K, 77, D]: the prompts in frame order
            rows.append(interpolate(tokens, list(prompt), frames) if isinstance(prompt, dict)
                        else tokens.expand(frames, -1, -1))
        return torch.stack(rows)

    def _fit(self, images: list, request: GenerationRequest) -> torch.Tensor:
        """The images scaled and cropped to the video size: ``[N, 3, H, W]`` in [-1, 1] on the device."""
        return torch.stack([fit_image(i, request.height, request.width) for i in images]).to(self.device)

    def _image_latents(self, pixels: torch.Tensor, end_pixels: torch.Tensor | None, frames: int
                       ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The latents concatenated to the noisy latent ``[N, 4, T, h, w]`` (and ToonCrafter's key-frame features).

        Animating an image repeats its latent on every frame; an interpolation puts the start and
        end images' latents on the first and last frame and zeros between.
        """
        model, reference = self.model, None
        with self._on_device(model.vae):
            if model.dual_reference:  # ToonCrafter's decoder also reads both key frames' encoder features
                first, last, reference = model.encode_key_frames(pixels, pixels if end_pixels is None else end_pixels)
            else:
                first = model.encode_latents(pixels)  # one encode per image, not one per frame
                last = None if end_pixels is None else model.encode_latents(end_pixels)
        if end_pixels is None:
            concat = first[:, :, None].expand(-1, -1, frames, -1, -1)
        else:
            concat = torch.zeros(*first.shape[:2], frames, *first.shape[2:], device=self.device)
            concat[:, :, 0] = first
            concat[:, :, -1] = last
        if reference is not None and self.offload == "model":  # not needed on the GPU until decoding
            reference = [r.cpu() for r in reference]
        return concat, reference

    def _uncond_text_tokens(self, negative_prompt: str) -> torch.Tensor:
        if negative_prompt not in self._uncond_text:
            if len(self._uncond_text) > 16:
                self._uncond_text.clear()
            self._uncond_text[negative_prompt] = self.model.encode_text([negative_prompt])
        return self._uncond_text[negative_prompt]

    def _zero_image(self) -> torch.Tensor:
        if self._zero_image_tokens is None:
            size = self.config.clip.image_size
            zeros = torch.zeros(1, 3, size, size, device=self.device)
            self._zero_image_tokens = self.model.encode_image_tokens(zeros)
        return self._zero_image_tokens

    # ----------------------------------------------------------------- 3. prepare
    def prepare_latents(self, request: GenerationRequest) -> torch.Tensor:
        """The starting noise ``[B, 4, T, h, w]`` (float32): the given latents or a draw from the generator.

        With ``analytic_init``, that noise is Analytic-Init's ``eps``: the result is ``x_M``.
        """
        if request.analytic_statistics is not None:
            noise = self.prepare_latents(dataclasses.replace(request, analytic_statistics=None))
            return request.analytic_statistics.initial_latents(noise, self.model.schedule.alphas_cumprod,
                                                               request.start_step)
        if request.latents is not None:
            return request.latents.to(self.device, torch.float32)
        noise = _randn(request.latent_shape, request.generator, self.device)
        if request.windowed and request.noise_rescheduling:
            noise = self._reschedule(noise, request)
        return noise

    @staticmethod
    def _reschedule(noise: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        """FreeNoise's noise rescheduling, shuffles drawn after the noise: one set per generator."""
        size, stride = request.window_size, request.window_stride
        if isinstance(request.generator, list):
            return torch.cat([reschedule_noise(video[None], size, stride, block_permutations(
                noise.shape[2], size, stride, g)) for video, g in zip(noise, request.generator)])
        return reschedule_noise(noise, size, stride, block_permutations(noise.shape[2], size, stride,
                                                                        request.generator))

    # ----------------------------------------------------------------- 4. denoise
    def denoise(self, request: GenerationRequest, branches: GuidanceBranches, x_t: torch.Tensor) -> torch.Tensor:
        """Sample from the noise ``x_t`` to clean latents ``[B, 4, T, h, w]`` with the request's sampler.

        A run that comes out non-finite in half precision is redone in float32 from the same
        noise; one that is still non-finite raises :class:`GenerationError`.
        """
        noise: dict[int, torch.Tensor] = {}  # kept so a float32 redo sees the very same noise

        def noise_sampler(step: int) -> torch.Tensor:
            if step not in noise:
                noise[step] = _randn(x_t.shape, request.generator, self.device)
            return noise[step]

        model_fn = guided_model(self._controlled_unet(request), branches, request.guidance_scale,
                                request.guidance_rescale,
                                request.image_guidance_scale, self.sequential_guidance)
        denoiser = ModelDenoiser(model_fn, self.model.schedule, self.config.diffusion.parameterization)
        still = self._still_regions(request, branches)

        def sample() -> torch.Tensor:
            self._interrupt = False
            stopped: dict[str, torch.Tensor] = {}
            with tqdm(total=request.num_inference_steps, desc="Denoising", leave=False) as bar:
                def on_step(info: StepInfo) -> None:
                    bar.update(1)
                    self._after_step(request, info)
                    if self._interrupt:  # stop with the step's clean-latent prediction
                        info.stop = True
                        stopped["denoised"] = info.denoised
                    elif still is not None and info.step + 1 < info.total:  # the motion mask, before the next step
                        info.x = still(info.x)

                latents = run_sampler(request.sampler, denoiser, x_t if still is None else still(x_t),
                                      self.model.schedule,
                                      request.num_inference_steps, request.timestep_spacing, request.eta,
                                      noise_sampler=noise_sampler, callback=on_step,
                                      start_step=request.start_step)
                return stopped.get("denoised", latents)

        float8 = None if self.quantize == "none" else (
            f"The float8 UNet (quantize={self.quantize}) produced NaN or infinite values; run without quantize.")
        window = request.window_size if request.windowed else None
        with self._on_device(self.model.unet), use_temporal_windows(self.model.unet, window, request.window_stride):
            return finite_or_redo_in_float32(sample, self.model.unet, "The model",
                                             "check the checkpoint and the settings", no_redo=float8)

    def _controlled_unet(self, request: GenerationRequest) -> Callable:
        """The UNet function the sampler calls: with the request's control residuals added, if any."""
        if request.control_images is None:
            return self._unet_forward
        from .control import controlled, prepare_control
        from .diffusion.schedule import ddim_timesteps

        controls = [prepare_control(net, images, request.num_frames, request.height, request.width, scale,
                                    request.control_start, request.control_end)
                    for net, images, scale in zip(self.controlnets, request.control_images, request.control_scale)]
        # the timesteps sampling.sample visits, in its order
        steps = ddim_timesteps(request.num_inference_steps, request.timestep_spacing, request.start_step)[::-1]
        index = {int(t): i for i, t in enumerate(steps)}
        return controlled(self._unet_forward, controls, index.__getitem__, len(steps),
                          self.config.unet.out_channels)

    @property
    def interrupt(self) -> bool:
        """Set as ``pipe._interrupt = True`` by a callback to stop sampling after that step."""
        return self._interrupt

    def _after_step(self, request: GenerationRequest, info: StepInfo) -> None:
        """Call the request's callbacks; apply the latents a ``callback_on_step_end`` returns."""
        if request.callback is not None:
            request.callback(info.step + 1, info.total)
        if request.callback_on_step_end is None:
            return
        tensors = {"latents": info.x, "denoised": info.denoised}
        outputs = request.callback_on_step_end(
            self, info.step, info.t, {name: tensors[name] for name in request.callback_on_step_end_tensor_inputs})
        if outputs is not None and "latents" in outputs:
            latents = outputs["latents"]
            if not isinstance(latents, torch.Tensor) or latents.shape != info.x.shape:
                raise UserError(f"callback_on_step_end must return latents of shape {list(info.x.shape)}.")
            info.x = latents.to(info.x.device, info.x.dtype)

    # ------------------------------------------------------------------ 5. decode
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, reference: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``[B, 4, T, h, w]`` latents -> ``[B, T, 3, H, W]`` frames in [0, 1].

        Frames are decoded ``decode_chunk_size`` at a time; a chunk that comes out non-finite in
        half precision is decoded again in float32. ToonCrafter's decoder needs ``reference``, the
        key frames' encoder features (``model.encode_key_frames``), and decodes exactly as its
        inference code: each video in windows of ``temporal_length`` (16) frames, plus a second
        pass for the two middle frames; ``decode_chunk_size`` does not apply to it.
        """
        vae = self.model.vae
        if self.model.dual_reference:
            reference = self._check_reference(latents, reference)
            with self._on_device(vae):
                reference = [r.to(self.device) for r in reference]
                videos = finite_or_redo_in_float32(  # [B, 3, T, H, W]
                    lambda: self.model.decode_video(latents.to(self.device), reference), vae, "The VAE")
            return ((videos.transpose(1, 2) + 1) / 2).clamp(0, 1)
        b, c, t, h, w = latents.shape
        flat = latents.transpose(1, 2).reshape(b * t, c, h, w)
        with self._on_device(vae):
            images = torch.cat([finite_or_redo_in_float32(lambda chunk=chunk: self.model.decode_latents(chunk),
                                                          vae, "The VAE")
                                for chunk in flat.split(self.decode_chunk_size)])
        return ((images.view(b, t, *images.shape[1:]) + 1) / 2).clamp(0, 1)

    def _check_reference(self, latents: torch.Tensor, reference: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if reference is None:
            raise UserError("ToonCrafter's decoder needs the key frames' encoder features (reference=); "
                            "get them from pipeline.model.encode_key_frames(start, end).")
        check_frames(self.config, latents.shape[2], what="The latents' frame count")
        return reference

    @staticmethod
    def save_video(videos: torch.Tensor | np.ndarray, path: str | Path, fps: int = 8) -> Path:
        """Write a video to ``.mp4`` (H.264) or ``.gif``, atomically and checked.

        ``videos``: the pipeline's ``"pt"`` or ``"np"`` output (the first video of the batch
        is written) or a single ``[T, 3, H, W]`` / ``[T, H, W, 3]`` video. The file is written
        under a temporary name, re-opened and its frames counted, and only then renamed to
        ``path`` (see :func:`dynamicrafter.video.save_video`).
        """
        from .video import save_video  # the encoder stack is only needed here

        return save_video(videos[0] if videos.ndim == 5 else videos, path, fps=fps)
