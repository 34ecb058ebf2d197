"""The whole DynamiCrafter model: its components under the checkpoints' key names."""

from __future__ import annotations

import torch
from torch import nn

from ..configs import ModelConfig
from ..diffusion.schedule import NoiseSchedule
from .encoders import CLIPImageEncoder, CLIPTextEncoder
from .resampler import Resampler
from .unet import UNet3D
from .vae import AutoencoderKL
from .vae_dualref import AutoencoderKLDualRef


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``model.diffusion_model``, the checkpoints' name for it."""

    def __init__(self, unet: UNet3D) -> None:
        super().__init__()
        self.diffusion_model = unet


class DynamiCrafter(nn.Module):
    """Image + text conditioned latent video diffusion model.

    Components (checkpoint prefixes): ``model.diffusion_model`` (:class:`UNet3D`),
    ``first_stage_model`` (:class:`AutoencoderKL`, or ToonCrafter's
    :class:`~.vae_dualref.AutoencoderKLDualRef` when ``config.vae.dual_reference``), ``cond_stage_model``
    (:class:`CLIPTextEncoder`), ``embedder`` (:class:`CLIPImageEncoder`) and
    ``image_proj_model`` (:class:`Resampler`). The noise schedule is not a module state:
    it is recomputed from the config (``self.schedule``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNet3D(config.unet))
        vae_class = AutoencoderKLDualRef if config.vae.dual_reference else AutoencoderKL
        self.first_stage_model = vae_class(config.vae)
        self.cond_stage_model = CLIPTextEncoder(config.clip)
        self.embedder = CLIPImageEncoder(config.clip)
        self.image_proj_model = Resampler(config.resampler)
        self.schedule = NoiseSchedule.from_config(config.diffusion)

    @property
    def unet(self) -> UNet3D:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def dual_reference(self) -> bool:
        """Whether the decoder reads the key frames' encoder features (ToonCrafter)."""
        return isinstance(self.first_stage_model, AutoencoderKLDualRef)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 77, D]`` text tokens."""
        return self.cond_stage_model(prompts)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [-1, 1] -> ``[B, 16 * video_length, D]`` image tokens for the UNet."""
        tokens = self.embedder(images)
        return self.image_proj_model(tokens.to(_dtype(self.image_proj_model)))

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` images in [-1, 1] -> ``[N, 4, H/8, W/8]`` latents (posterior mean, scaled)."""
        mean, _ = self.vae.encode(images.to(_dtype(self.vae)))
        return mean.float() * self.config.diffusion.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, 4, h, w]`` scaled latents -> ``[N, 3, H, W]`` images in about [-1, 1]."""
        return self.vae.decode((latents / self.config.diffusion.scale_factor).to(_dtype(self.vae))).float()

    def encode_key_frames(self, start: torch.Tensor,
                          end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """ToonCrafter: ``[B, 3, H, W]`` start and end images in [-1, 1] -> their latents
        ``[B, 4, H/8, W/8]`` (posterior means, scaled) and the decoder's reference features
        (per VAE level, then ``conv_in``: ``[B, C_i, 2, H_i, W_i]``, start at index 0)."""
        dtype = _dtype(self.vae)
        first, last, reference = self.vae.key_frame_states(start.to(dtype), end.to(dtype))
        scale = self.config.diffusion.scale_factor
        return first.float() * scale, last.float() * scale, reference

    def decode_video(self, latents: torch.Tensor, reference: list[torch.Tensor]) -> torch.Tensor:
        """ToonCrafter: ``[B, 4, T, h, w]`` scaled latents -> ``[B, 3, T, H, W]`` frames in about [-1, 1].

        Decoded as its inference code does (:meth:`AutoencoderKLDualRef.decode_video`), in windows
        of the UNet's ``temporal_length`` frames.
        """
        dtype = _dtype(self.vae)
        z = (latents / self.config.diffusion.scale_factor).to(dtype)
        window = self.config.unet.temporal_length  # the original's perframe_ae decoding window
        return self.vae.decode_video(z, [r.to(dtype) for r in reference], window).float()
