"""Image-to-video pipeline: image + prompt -> encoders -> sampler <-> UNet -> VAE -> frames."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .checkpoints import load_model
from .configs import ModelConfig, get_config, load_config, resolve_resolution
from .diffusion.denoiser import ModelDenoiser
from .diffusion.guidance import guided, two_scale_guided
from .diffusion.sampling import StepInfo, get_sampler, sample as run_sampler
from .diffusion.schedule import SPACINGS
from .models.dynamicrafter import DynamiCrafter
from .offload import Offloader, offload_mode
from .runtime import resolve_device, resolve_dtype, vae_dtype_for

logger = logging.getLogger(__name__)

ImageInput = Union[Image.Image, np.ndarray, str, Path]
OUTPUT_TYPES = ("pt", "np", "latent")
#: What ``callback_on_step_end`` can be given: the latent after the step and the predicted clean latent.
CALLBACK_TENSOR_INPUTS = ("latents", "denoised")


@dataclass
class _Conditioning:
    """What the denoiser needs besides the noisy latent, for the conditional and unconditional branch."""

    context: torch.Tensor  # [B, 77 + image tokens, D]
    uncond_context: torch.Tensor | None  # None without guidance
    concat: torch.Tensor  # [B, 4, T, h, w] image latents concatenated to the noisy latent
    fs: torch.Tensor  # [B] frame stride / frame rate
    # Two-scale guidance: the negative (default empty) prompt with the real image tokens.
    image_context: torch.Tensor | None = None


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image, an ``HxWx3`` array (uint8, or float in [0, 1]) or a file path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"An image array must be HxWx3, got shape {image.shape}.")
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(image[..., :3])
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                return img.convert("RGB")
        except (FileNotFoundError, IsADirectoryError):
            raise ValueError(f"Image {image} does not exist.") from None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
            raise ValueError(f"Cannot read image {image}: {exc}.") from None
    raise ValueError(f"Unsupported image type {type(image).__name__}; give a PIL image, a numpy array or a path.")


def fit_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Resize to cover ``height x width`` and centre-crop, as the original's Resize + CenterCrop.

    Returns ``[3, height, width]`` in [-1, 1]. An image already of that size is used untouched.
    """
    if image.size != (width, height):
        scale = max(height / image.height, width / image.width)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Float32 Gaussian noise on ``device``, drawn on the generator's own device."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)


class DynamiCrafterImg2VideoPipeline:
    """Animate an image with a text prompt using a DynamiCrafter model.

    Args:
        resolution: which released model: ``'256'``, ``'512'``, ``'1024'`` or ``'512_interp'``
            (also ``'256_256'``, ``'512_512'``, ``'1024_1024'``, ``'320_512'``, ``'576_1024'``).
        device: where to run; default ``cuda:0`` when available, else the CPU (with a warning).
        checkpoint: a ``.ckpt`` or ``.safetensors`` file; default
            ``checkpoints/dynamicrafter_{name}_v1/model.ckpt``, downloaded when missing.
        config: a :class:`ModelConfig` or the path of a model config in the original YAML
            format; default the preset of ``resolution``.
        dtype: ``torch.float32``/``float16``/``bfloat16`` or their names; default bf16 where the
            hardware has fast bf16 (recent GPUs, CPUs with AMX/AVX-512 BF16), fp16 on other GPUs,
            else float32. The VAE never runs in float16.

    Example::

        pipe = DynamiCrafterImg2VideoPipeline("256")
        out = pipe(Image.open("cat.png"), "a cat turning its head", generator=torch.Generator().manual_seed(123))
        pipe.save_video(out["videos"], "cat.mp4", fps=8)
    """

    def __init__(self, resolution: str = "256", device: str | torch.device | None = None,
                 checkpoint: str | Path | None = None, config: ModelConfig | str | Path | None = None,
                 dtype: str | torch.dtype | None = None, *, offload: bool | str | None = None, compile: bool = False,
                 sequential_guidance: bool = False, decode_chunk_size: int | None = None) -> None:
        name = resolve_resolution(resolution)
        if config is None:
            config = get_config(name)
        elif not isinstance(config, ModelConfig):
            config = load_config(config)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if checkpoint is None:
            from .hub import ensure_checkpoint  # the download stack is only needed here

            checkpoint = ensure_checkpoint(name)
        elif not Path(checkpoint).is_file():
            raise ValueError(f"Checkpoint {checkpoint} does not exist.")
        self.checkpoint: Path | None = Path(checkpoint)
        home = device if offload_mode(offload, device) == "none" else torch.device("cpu")
        model = load_model(config, checkpoint, dtype=dtype, device=home, vae_dtype=vae_dtype_for(dtype))
        self._setup(model, device, dtype, offload, compile, sequential_guidance, decode_chunk_size)

    @classmethod
    def from_model(cls, model: DynamiCrafter, device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None, **options: Any) -> "DynamiCrafterImg2VideoPipeline":
        """A pipeline around an already built model (cast and moved to ``device``/``dtype``).

        ``options`` are the keyword-only options of the constructor.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model.to(dtype=dtype)
        model.vae.to(dtype=vae_dtype_for(dtype))
        pipe = cls.__new__(cls)
        pipe.checkpoint = None
        pipe._setup(model.eval().requires_grad_(False), device, dtype, **options)
        return pipe

    def _setup(self, model: DynamiCrafter, device: torch.device, dtype: torch.dtype,
               offload: bool | str | None = None,
               compile: bool = False, sequential_guidance: bool = False,
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
        self._unet_forward: Callable = torch.compile(model.unet) if compile else model.unet
        self._uncond_text: dict[str, torch.Tensor] = {}
        self._zero_image_tokens: torch.Tensor | None = None
        if device.type == "cuda" and dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        logger.info("Ready: %s model on %s in %s (offload: %s).", self.config.name, device,
                    str(dtype).replace("torch.", ""), self.offload)

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

    def _on_device(self, *modules: torch.nn.Module) -> Any:
        return self._offloader.on_device(*modules)

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, images: list, prompts: list[str], negative: list[str] | None, steps: int,
                      frames: int, height: int, width: int, guidance_scale: float, eta: float,
                      spacing: str, output_type: str, end_images: list | None) -> None:
        multiple = self.config.size_multiple
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number of at least 1, got {steps!r}.")
        if steps > self.model.schedule.num_timesteps:
            raise ValueError(f"num_inference_steps can be at most {self.model.schedule.num_timesteps}, got {steps}.")
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"num_frames must be a whole number of at least 1, got {frames!r}.")
        for label, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"{label} must be a positive multiple of {multiple} pixels, got {value!r}.")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must not be negative, got {guidance_scale}.")
        if eta < 0:
            raise ValueError(f"eta must not be negative, got {eta}.")
        if spacing not in SPACINGS:
            raise ValueError(f"Unknown timestep_spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type {output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}.")
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(images)} image(s) but {len(prompts)} prompt(s); give one prompt per image.")
        if negative is not None and len(negative) != len(images):
            raise ValueError(f"Got {len(images)} image(s) but {len(negative)} negative prompt(s).")
        if end_images is not None:
            if not self.config.interp:
                raise ValueError(f"end_image needs the interpolation model ('512_interp'), not {self.config.name}.")
            if len(end_images) != len(images):
                raise ValueError(f"Got {len(images)} start image(s) but {len(end_images)} end image(s).")

    @staticmethod
    def _as_list(value: Any, batch: int | None = None) -> list:
        if isinstance(value, (list, tuple)):
            return list(value)
        return [value] * (batch or 1)

    # ------------------------------------------------------------- conditioning
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

    def _condition(self, pixels: torch.Tensor, prompts: list[str], negative: list[str] | None,
                   end_pixels: torch.Tensor | None, frames: int, fs: int, use_guidance: bool,
                   image_guidance_scale: float | None = None) -> _Conditioning:
        model = self.model
        batch = pixels.shape[0]
        with self._on_device(model.cond_stage_model, model.embedder, model.image_proj_model):
            image_tokens = model.encode_image_tokens(pixels)
            context = torch.cat([model.encode_text(prompts), image_tokens], dim=1)
            uncond = image_context = None
            if use_guidance:
                text = torch.cat([self._uncond_text_tokens(n) for n in (negative or [""] * batch)])
                if image_guidance_scale != 1.0:  # with an image scale of 1 this branch cancels out
                    uncond = torch.cat([text, self._zero_image().expand(batch, -1, -1)], dim=1)
                if image_guidance_scale is not None:
                    image_context = torch.cat([text, image_tokens], dim=1)
        with self._on_device(model.vae):
            first = model.encode_latents(pixels)  # one encode per image, not one per frame
            if end_pixels is None:
                concat = first[:, :, None].expand(-1, -1, frames, -1, -1)
            else:
                concat = torch.zeros(*first.shape[:2], frames, *first.shape[2:], device=self.device)
                concat[:, :, 0] = first
                concat[:, :, -1] = model.encode_latents(end_pixels)
        fs_tensor = torch.full((batch,), fs, dtype=torch.long, device=self.device)
        return _Conditioning(context, uncond, concat, fs_tensor, image_context)

    def _denoiser(self, cond: _Conditioning, scale: float, rescale: float,
                  image_scale: float | None = None) -> Callable:
        """The guided model function ``(x [B, 4, T, h, w], t [B]) -> output`` (float32).

        Its branches (conditional; unconditional; image-only for two-scale guidance, those
        present in ``cond``) run as one batch, or one after the other with ``sequential_guidance``.
        """
        unet = self._unet_forward
        has_uncond, has_image = cond.uncond_context is not None, cond.image_context is not None
        contexts = [c for c in (cond.context, cond.uncond_context, cond.image_context) if c is not None]
        n = len(contexts)
        batched = n > 1 and not self.sequential_guidance
        if batched:  # what stays the same at every step, repeated once for the batch of n branches
            concat_n = torch.cat([cond.concat] * n)
            context_n = torch.cat(contexts)
            fs_n = torch.cat([cond.fs] * n)

        def combine(outs: Sequence[torch.Tensor]) -> torch.Tensor:
            if n == 1:
                return outs[0]
            cond_out, rest = outs[0], iter(outs[1:])
            uncond_out = next(rest) if has_uncond else None
            if not has_image:
                return guided(cond_out, uncond_out, scale, rescale)
            return two_scale_guided(cond_out, next(rest), uncond_out, scale, image_scale, rescale)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if batched:
                out = unet(torch.cat([torch.cat([x] * n), concat_n], dim=1), torch.cat([t] * n), context_n, fs_n)
                return combine(out.float().chunk(n))
            x_in = torch.cat([x, cond.concat], dim=1)
            return combine([unet(x_in, t, context, cond.fs).float() for context in contexts])

        return denoise

    @property
    def interrupt(self) -> bool:
        """Set as ``pipe._interrupt = True`` by a callback to stop sampling after that step."""
        return self._interrupt

    @staticmethod
    def _check_sampling_options(sampler: str, image_guidance_scale: float | None,
                                callback_on_step_end: Callable | None, tensor_inputs: Sequence[str]) -> None:
        get_sampler(sampler)
        if image_guidance_scale is not None and (
                isinstance(image_guidance_scale, bool) or not isinstance(image_guidance_scale, (int, float))
                or not image_guidance_scale >= 0):
            raise ValueError(f"image_guidance_scale must be a non-negative number or None, got {image_guidance_scale!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("callback_on_step_end must be a function (pipe, step, t, tensors) -> dict or None.")
        unknown = [name for name in tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
        if isinstance(tensor_inputs, str) or unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a list drawn from "
                             f"{', '.join(CALLBACK_TENSOR_INPUTS)}; got {tensor_inputs!r}.")

    def _step_end(self, callback: Callable, tensor_inputs: Sequence[str], info: StepInfo) -> None:
        """Call a diffusers-style ``callback_on_step_end`` and apply what it returns or sets."""
        tensors = {"latents": info.x, "denoised": info.denoised}
        outputs = callback(self, info.step, info.t, {name: tensors[name] for name in tensor_inputs})
        if outputs is not None and "latents" in outputs:
            latents = outputs["latents"]
            if not isinstance(latents, torch.Tensor) or latents.shape != info.x.shape:
                raise ValueError(f"callback_on_step_end must return latents of shape {list(info.x.shape)}.")
            info.x = latents.to(info.x.device, info.x.dtype)

    @contextmanager
    def _in_float32(self, module: torch.nn.Module) -> Iterator[None]:
        """Temporarily run ``module`` in float32 (the fallback when half precision overflowed)."""
        dtype = next(module.parameters()).dtype
        module.float()
        try:
            yield
        finally:
            module.to(dtype)

    # ----------------------------------------------------------------- running
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 1.0,
        frame_stride: int | None = None,
        num_frames: int = 16,
        height: int | None = None,
        width: int | None = None,
        guidance_rescale: float | None = None,
        timestep_spacing: str | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        end_image: ImageInput | Sequence[ImageInput] | None = None,
        callback: Callable[[int, int], None] | None = None,
        sampler: str = "ddim",
        image_guidance_scale: float | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> dict[str, Any] | Any:
        """Generate videos.

        Args:
            image: the first frame: a PIL image, an ``HxWx3`` array, a path, or a list of them (a batch).
            prompt: text prompt, or one per image.
            negative_prompt: what to steer away from (the unconditional branch); default empty.
            num_inference_steps: sampler steps (exactly this many are run, one guided UNet call each).
            guidance_scale: classifier-free guidance scale (1 disables guidance).
            eta: DDIM stochasticity (0 = deterministic); only the DDIM sampler uses it.
            frame_stride: frame stride (256 model; larger = more motion) or frame rate (others;
                smaller = more motion); default the model's (3 / 24 / 10 / 5).
            num_frames: frames to generate (the models are trained on 16).
            height, width: output size, multiples of 64; default the model's.
            guidance_rescale: guidance rescale factor; default the model's (0 or 0.7).
            timestep_spacing: ``'uniform'`` or ``'uniform_trailing'``; default the model's.
            generator: a ``torch.Generator`` for reproducible noise.
            latents: initial noise ``[B, 4, T, H/8, W/8]``; default drawn from ``generator``.
            output_type: ``'pt'`` (``[B, T, 3, H, W]`` float in [0, 1]), ``'np'``
                (``[B, T, H, W, 3]`` float in [0, 1]) or ``'latent'`` (``[B, 4, T, h, w]``).
            return_dict: return ``{"videos": ...}`` (else the bare value).
            end_image: last frame(s), for the interpolation model (``'512_interp'``); give the
                same image as ``image`` for a looping video.
            callback: ``callback(step, total)`` after each denoising step.
            sampler: ``'ddim'`` (the original's; the default), ``'dpmpp_2m'`` (DPM-Solver++(2M),
                for 10-25 steps) or ``'unipc'`` (UniPC-2, for 5-15 steps). The other two are
                deterministic: ``eta`` is DDIM's and has no effect on them. Every sampler
                visits the same timesteps (``timestep_spacing``).
            image_guidance_scale: two-scale guidance, as the original's ``--multiple_cond_cfg
                --cfg_img``: the output is ``uncond + image_guidance_scale * (image - uncond) +
                guidance_scale * (cond - image)``, where the ``image`` branch has the negative
                (default empty) prompt and the real image tokens. ``None`` (the default) is the
                usual one-scale guidance; equal scales give it too (at the cost of a third
                branch); 1 needs no unconditional branch. Like ``guidance_scale = 1``
                everywhere, it turns guidance off (the original ignores ``cfg_img`` then).
            callback_on_step_end: diffusers-style ``callback_on_step_end(pipe, step, t, tensors)``
                after each step (``step`` 0-based, ``t`` the timestep, ``tensors`` a dict of
                ``callback_on_step_end_tensor_inputs``). It may return a dict whose ``"latents"``
                replace the current latent, and may set ``pipe._interrupt = True`` to stop:
                the result is then the step's predicted clean latent.
            callback_on_step_end_tensor_inputs: which tensors the callback gets: ``"latents"``
                (``[B, 4, T, h, w]`` after the step) and/or ``"denoised"`` (the predicted clean
                latent of the step, like ``latents``).
        """
        cfg = self.config
        images = self._as_list(image)
        prompts = [str(p) for p in self._as_list(prompt, len(images))]
        negative = None if negative_prompt is None else [str(n) for n in self._as_list(negative_prompt, len(images))]
        end_images = None if end_image is None else self._as_list(end_image, len(images))
        height = cfg.height if height is None else height
        width = cfg.width if width is None else width
        spacing = timestep_spacing or cfg.diffusion.timestep_spacing
        rescale = cfg.diffusion.guidance_rescale if guidance_rescale is None else float(guidance_rescale)
        fs = cfg.default_fs if frame_stride is None else int(frame_stride)
        self._check_inputs(images, prompts, negative, num_inference_steps, num_frames, height, width,
                           guidance_scale, eta, spacing, output_type, end_images)
        self._check_sampling_options(sampler, image_guidance_scale, callback_on_step_end,
                                     callback_on_step_end_tensor_inputs)
        use_guidance = guidance_scale != 1.0
        if image_guidance_scale is not None and not use_guidance:
            logger.warning("image_guidance_scale has no effect with guidance_scale 1 (no guidance), as in the original.")
            image_guidance_scale = None
        down = cfg.latent_downscale
        shape = (len(images), cfg.vae.embed_dim, num_frames, height // down, width // down)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)}, got {list(latents.shape)}.")

        pixels = torch.stack([fit_image(load_image(i), height, width) for i in images]).to(self.device)
        end_pixels = None if end_images is None else \
            torch.stack([fit_image(load_image(i), height, width) for i in end_images]).to(self.device)
        cond = self._condition(pixels, prompts, negative, end_pixels, num_frames, fs, use_guidance,
                               image_guidance_scale)
        x_t = _randn(shape, generator, self.device) if latents is None else latents.to(self.device, torch.float32)

        noise: dict[int, torch.Tensor] = {}  # kept so a float32 redo sees the very same noise

        def noise_sampler(step: int) -> torch.Tensor:
            if step not in noise:
                noise[step] = _randn(shape, generator, self.device)
            return noise[step]

        denoiser = ModelDenoiser(self._denoiser(cond, guidance_scale, rescale, image_guidance_scale),
                                 self.model.schedule, cfg.diffusion.parameterization)

        def sample() -> torch.Tensor:
            self._interrupt = False
            stopped: dict[str, torch.Tensor] = {}
            with tqdm(total=num_inference_steps, desc="Denoising", leave=False) as bar:
                def on_step(info: StepInfo) -> None:
                    bar.update(1)
                    if callback is not None:
                        callback(info.step + 1, info.total)
                    if callback_on_step_end is not None:
                        self._step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, info)
                    if self._interrupt:  # stop with the step's clean-latent prediction
                        info.stop = True
                        stopped["denoised"] = info.denoised

                latents = run_sampler(sampler, denoiser, x_t, self.model.schedule, num_inference_steps, spacing,
                                      eta, noise_sampler=noise_sampler, callback=on_step)
                return stopped.get("denoised", latents)

        with self._on_device(self.model.unet):
            samples = sample()
            if not torch.isfinite(samples).all() and self.dtype != torch.float32:
                logger.warning("Sampling in %s gave non-finite values; redoing it in float32 from the same noise.",
                               str(self.dtype).replace("torch.", ""))
                with self._in_float32(self.model.unet):
                    samples = sample()

        if output_type == "latent":
            result: Any = samples
        else:
            frames = self.decode(samples)  # [B, T, 3, H, W] in [0, 1]
            result = frames if output_type == "pt" else frames.permute(0, 1, 3, 4, 2).cpu().numpy()
        return {"videos": result} if return_dict else result

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 4, T, h, w]`` latents -> ``[B, T, 3, H, W]`` frames in [0, 1].

        Frames are decoded ``decode_chunk_size`` at a time; a chunk that comes out non-finite in
        half precision is decoded again in float32.
        """
        b, c, t, h, w = latents.shape
        flat = latents.transpose(1, 2).reshape(b * t, c, h, w)
        vae = self.model.vae
        chunks = []
        with self._on_device(vae):
            for chunk in flat.split(self.decode_chunk_size):
                images = self.model.decode_latents(chunk)
                if not torch.isfinite(images).all() and next(vae.parameters()).dtype != torch.float32:
                    logger.warning("The VAE gave non-finite values in half precision; decoding again in float32.")
                    with self._in_float32(vae):
                        images = self.model.decode_latents(chunk)
                chunks.append(images)
        images = torch.cat(chunks)
        return ((images.view(b, t, *images.shape[1:]) + 1) / 2).clamp(0, 1)

    @staticmethod
    def save_video(videos: torch.Tensor | np.ndarray, path: str | Path, fps: int = 8) -> Path:
        """Write a video to ``.mp4`` (H.264) or ``.gif``, atomically.

        ``videos``: the pipeline's ``"pt"`` or ``"np"`` output (the first video of the batch
        is written) or a single ``[T, 3, H, W]`` / ``[T, H, W, 3]`` video.
        """
        from .video import save_video  # the encoder stack is only needed here

        return save_video(videos[0] if videos.ndim == 5 else videos, path, fps=fps)
