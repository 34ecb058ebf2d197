"""The training objective of DynamiCrafter: conditioning dropout, noising, eps / v target, MSE.

What one training example goes through, as the original's ``LatentVisualDiffusion`` computes it:

1. the clip ``[B, 3, T, H, W]`` is encoded frame by frame by the VAE and a sample of the
   posterior, times the scale factor, is the clean latent ``x0`` ``[B, 4, T, h, w]``;
2. the prompt becomes 77 text tokens; the conditioning frame (the first, or a random one)
   becomes CLIP image tokens and, through the resampler, the image tokens of the context;
   its latent, repeated over time, is concatenated to the noisy latent (the interpolation
   model concatenates the first and last latent instead, zeros between them);
3. dropout for classifier-free guidance: a dropped text is the empty prompt's tokens, a dropped
   image gives the tokens of an all-zero frame; the concatenated latent is never dropped;
4. at the timestep ``t`` the clean latent is first scaled by the dynamic-rescale factor of the
   v-prediction models, then noised; the target is the noise (eps) or the velocity (v);
5. the loss is the mean squared error of the UNet's output against the target.

The random draws (timesteps, noise, dropout, conditioning frame, posterior sample) are
arguments, so the objective can be checked against the original and a run can be resumed
exactly; :func:`draw` makes them the way the original's training does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.dynamicrafter import DynamiCrafter

__all__ = [
    "EncodedBatch",
    "NullConditioning",
    "RandomDraws",
    "diffusion_loss",
    "draw",
    "encode_batch",
    "loss_on_encoded",
    "null_conditioning",
    "posterior_moments",
    "sample_posterior",
]


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@dataclass
class NullConditioning:
    """What a dropped condition becomes: the empty prompt's tokens ``[1, 77, D]`` and the CLIP
    tokens ``[1, N, Dv]`` of an all-zero image (before the resampler)."""

    text: torch.Tensor
    clip_tokens: torch.Tensor


@torch.no_grad()
def null_conditioning(model: DynamiCrafter, device: torch.device | str | None = None) -> NullConditioning:
    """Encode the empty prompt and an all-zero image once."""
    device = torch.device(device) if device is not None else next(model.cond_stage_model.parameters()).device
    size = model.config.clip.image_size
    text = model.encode_text([""]).float()
    tokens = model.embedder(torch.zeros(1, 3, size, size, device=device)).float()
    return NullConditioning(text, tokens)


@dataclass
class EncodedBatch:
    """A batch after the frozen encoders: everything the trained parts need.

    Attributes:
        latents: ``[B, 4, T, h, w]`` clean latents, already times the scale factor.
        text: ``[B, 77, D]`` text tokens of the prompts.
        clip_tokens: ``[B, N, Dv]`` CLIP tokens of each sample's conditioning frame.
    """

    latents: torch.Tensor
    text: torch.Tensor
    clip_tokens: torch.Tensor


@torch.no_grad()
def posterior_moments(model: DynamiCrafter, videos: torch.Tensor, chunk: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior of every frame: mean and standard deviation ``[B, 4, T, h, w]`` (unscaled).

    Frames go through the encoder ``chunk`` at a time, by default about a megapixel (6 frames
    at 320x512); the original encodes one at a time.
    """
    b, c, t, h, w = videos.shape
    chunk = chunk or max(1, 2 ** 20 // (h * w))
    frames = videos.transpose(1, 2).reshape(b * t, c, h, w)
    dtype = _param_dtype(model.vae)
    means, stds = [], []
    for part in frames.split(chunk):
        mean, logvar = model.vae.encode(part.to(dtype))
        means.append(mean.float())
        stds.append(torch.exp(0.5 * logvar.float()))

    def back(x: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(x)
        return x.view(b, t, *x.shape[1:]).transpose(1, 2).contiguous()

    return back(means), back(stds)


def sample_posterior(model: DynamiCrafter, mean: torch.Tensor, std: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """A scaled posterior sample ``(mean + std * noise) * scale_factor`` of ``[B, 4, T, h, w]`` moments.

    The noise is drawn on the CPU in the original's order (frame after frame of sample after
    sample, ``[B*T, 4, h, w]``) from ``generator``, by default the global generator, as the
    original's ``DiagonalGaussianDistribution.sample`` does; it is then moved to the moments' device.
    """
    b, c, t, h, w = mean.shape
    noise = torch.randn((b * t, c, h, w), generator=generator)
    noise = noise.view(b, t, c, h, w).transpose(1, 2).to(mean.device)
    return (mean + std * noise) * model.config.diffusion.scale_factor


def _select_frames(videos: torch.Tensor, cond_frame: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, ...]`` and ``[B]`` indices -> ``[B, C, ...]``, frame ``cond_frame[i]`` of sample ``i``."""
    index = cond_frame.to(videos.device).long().view(-1, *([1] * (videos.ndim - 1)))
    index = index.expand(-1, videos.shape[1], 1, *videos.shape[3:])
    return videos.gather(2, index).squeeze(2)


@torch.no_grad()
def encode_batch(model: DynamiCrafter, videos: torch.Tensor, prompts: Sequence[str], cond_frame: torch.Tensor,
                 latents: torch.Tensor | None = None, generator: torch.Generator | None = None) -> EncodedBatch:
    """Run the frozen encoders on a batch (no gradients).

    Args:
        videos: ``[B, 3, T, H, W]`` in [-1, 1].
        prompts: ``B`` captions.
        cond_frame: ``[B]`` index of each sample's conditioning frame (for the CLIP tokens).
        latents: the clip's scaled latents ``[B, 4, T, h, w]``; if ``None`` the VAE posterior
            is sampled (:func:`sample_posterior`, noise from ``generator``).
    """
    if latents is None:
        mean, std = posterior_moments(model, videos)
        latents = sample_posterior(model, mean, std, generator)
    frame = _select_frames(videos, cond_frame)
    text = model.encode_text(list(prompts)).float()
    clip_tokens = model.embedder(frame.to(_param_dtype(model.embedder))).float()
    return EncodedBatch(latents.float(), text, clip_tokens)


class _ScheduleTables:
    """The float32 schedule tables the original registers as buffers, per device."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def __call__(self, model: DynamiCrafter, device: torch.device) -> dict[str, torch.Tensor]:
        key = (id(model.schedule), str(device))
        if key not in self._cache:
            ac = model.schedule.alphas_cumprod
            tables = {"sqrt_ac": np.sqrt(ac), "sqrt_1m_ac": np.sqrt(1.0 - ac)}
            if model.config.diffusion.use_dynamic_rescale and model.schedule.scale_arr is not None:
                tables["scale"] = model.schedule.scale_arr
            self._cache[key] = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in tables.items()}
        return self._cache[key]


_tables = _ScheduleTables()


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.view(-1, *([1] * (ndim - 1)))


def _as_batch(value: int | float | torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(value, device=device).to(dtype)
    return tensor.expand(batch).contiguous() if tensor.ndim == 0 else tensor


def loss_on_encoded(model: DynamiCrafter, batch: EncodedBatch, frame_stride: int | torch.Tensor, *,
                    timesteps: torch.Tensor, noise: torch.Tensor, cond_frame: torch.Tensor,
                    drop_text: torch.Tensor, drop_image: torch.Tensor, null: NullConditioning,
                    unet: torch.nn.Module | None = None, image_proj: torch.nn.Module | None = None) -> torch.Tensor:
    """The loss on an encoded batch; gradients flow into the UNet and the resampler.

    ``unet`` / ``image_proj`` default to the model's own (pass a wrapped or compiled UNet to
    use it instead). The other arguments are those of :func:`diffusion_loss`.
    """
    unet = model.unet if unet is None else unet
    image_proj = model.image_proj_model if image_proj is None else image_proj
    x0 = batch.latents
    device = x0.device
    b = x0.shape[0]
    t = timesteps.to(device).long()
    drop_text = drop_text.to(device).bool()
    drop_image = drop_image.to(device).bool()
    tables = _tables(model, device)

    # Conditioning: text and image tokens (dropped ones replaced), the concatenated latent.
    text = torch.where(drop_text[:, None, None], null.text.to(device), batch.text)
    clip_tokens = torch.where(drop_image[:, None, None], null.clip_tokens.to(device), batch.clip_tokens)
    image_tokens = image_proj(clip_tokens.to(_param_dtype(image_proj))).float()
    context = torch.cat([text, image_tokens], dim=1)
    if model.config.interp:
        concat = torch.zeros_like(x0)
        concat[:, :, 0] = x0[:, :, 0]
        concat[:, :, -1] = x0[:, :, -1]
    else:
        concat = _select_frames(x0, cond_frame)[:, :, None].expand_as(x0)

    # Noising at t, after the v models' dynamic rescale of the clean latent.
    if "scale" in tables:
        x0 = x0 * _per_sample(tables["scale"][t], x0.ndim)
    a = _per_sample(tables["sqrt_ac"][t], x0.ndim)
    s = _per_sample(tables["sqrt_1m_ac"][t], x0.ndim)
    noise = noise.to(device).float()
    x_noisy = a * x0 + s * noise
    target = noise if model.config.diffusion.parameterization == "eps" else a * noise - s * x0

    fs = _as_batch(frame_stride, b, device, torch.long)
    out = unet(torch.cat([x_noisy, concat], dim=1), t, context, fs)
    return F.mse_loss(out.float(), target)


def diffusion_loss(model: DynamiCrafter, videos: torch.Tensor, prompts: Sequence[str],
                   frame_stride: int | torch.Tensor, *, timesteps: torch.Tensor, noise: torch.Tensor,
                   cond_frame: torch.Tensor, drop_text: torch.Tensor, drop_image: torch.Tensor,
                   latents: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The original's training loss for one batch, every random draw given.

    Args:
        model: a :class:`DynamiCrafter`; the UNet's and the resampler's parameters get
            gradients where they require them.
        videos: ``[B, 3, T, H, W]`` clips in [-1, 1].
        prompts: ``B`` captions.
        frame_stride: the UNet's frame-stride / frame-rate condition, an int or ``[B]`` (the
            frame stride for the 256 model, the clip's frame rate for the others).
        timesteps: ``[B]`` training timesteps in ``[0, 1000)``.
        noise: ``[B, 4, T, h, w]`` Gaussian noise.
        cond_frame: ``[B]`` long, the conditioning frame of each sample: its CLIP tokens and
            (except for the interpolation model) its latent, repeated over time, for the concatenation.
        drop_text: ``[B]`` bool, use the empty prompt instead of the caption.
        drop_image: ``[B]`` bool, use the tokens of an all-zero image (the concatenated latent stays).
        latents: the clip's scaled VAE latents ``[B, 4, T, h, w]``; if ``None`` the posterior is
            sampled with noise from ``generator`` (default: the global generator, like the original).

    Returns:
        The scalar mean squared error of the UNet's output against the eps / v target.
    """
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise UserError(f"videos must be [B, 3, T, H, W], got {list(videos.shape)}.")
    if len(prompts) != videos.shape[0]:
        raise UserError(f"Got {videos.shape[0]} video(s) but {len(prompts)} prompt(s).")
    encoded = encode_batch(model, videos, prompts, cond_frame, latents, generator)
    null = null_conditioning(model, videos.device)
    return loss_on_encoded(model, encoded, frame_stride, timesteps=timesteps, noise=noise, cond_frame=cond_frame,
                           drop_text=drop_text, drop_image=drop_image, null=null)


@dataclass
class RandomDraws:
    """The random inputs of one training step (see :func:`diffusion_loss`)."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    cond_frame: torch.Tensor
    drop_text: torch.Tensor
    drop_image: torch.Tensor


def draw(model: DynamiCrafter, latent_shape: Sequence[int], *, uncond_prob: float = 0.05,
         rand_cond_frame: bool = True, generator: torch.Generator | None = None) -> RandomDraws:
    """Draw a step's randomness as the original's training does (on the CPU, from ``generator``).

    One uniform draw ``r`` per sample: ``r < p`` drops the text, ``p <= r < 2p`` drops text and
    image, ``2p <= r < 3p`` drops the image. The conditioning frame is uniform over the clip's
    frames with ``rand_cond_frame`` (one per sample; the original draws one per batch), else
    the first. Timesteps are uniform over the schedule.
    """
    b, c, t, h, w = latent_shape
    timesteps = torch.randint(0, model.schedule.num_timesteps, (b,), generator=generator)
    noise = torch.randn((b, c, t, h, w), generator=generator)
    r = torch.rand((b,), generator=generator)
    drop_text = r < 2 * uncond_prob
    drop_image = (r >= uncond_prob) & (r < 3 * uncond_prob)
    if rand_cond_frame:
        cond_frame = torch.randint(0, t, (b,), generator=generator)
    else:
        cond_frame = torch.zeros(b, dtype=torch.long)
    return RandomDraws(timesteps, noise, cond_frame, drop_text, drop_image)
