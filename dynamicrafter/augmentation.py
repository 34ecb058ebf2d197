"""Conditioning image augmentation and the interpolation's image-embedding mix (kijai's wrapper's options).

- ``augmentation_level``: Gaussian noise added to the input image(s) once, before they are
  encoded, so that both the VAE latent the UNet is given and the CLIP image tokens see the noisy
  image. As the wrapper (``image += randn_like(image) * augmentation_level`` on ComfyUI's
  ``[0, 1]`` pixels), the level is the noise's standard deviation in units of the ``[0, 1]``
  pixel range, added at the video size, without clipping; the start image's noise is drawn
  first, then the end image's. 0 (the default) draws nothing and changes nothing.
- ``image_embed_ratio``: for interpolation, the image tokens the UNet attends to are
  ``ratio * start + (1 - ratio) * end``, mixed after the resampler (the tokens of each image
  projected separately), as the wrapper's ``ToonCrafterInterpolation``. 1 (the default, the
  original's) is the start image's tokens alone; 0 the end image's.
"""

from __future__ import annotations

import torch

__all__ = ["augment_pixels", "mix_image_tokens"]


def augment_pixels(pixels: torch.Tensor, level: float, noise: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` images in [-1, 1] with noise of standard deviation ``level`` on the [0, 1] scale.

    ``noise`` is standard Gaussian, like ``pixels``. On [0, 1] pixels the wrapper adds
    ``noise * level``; on the [-1, 1] pixels the encoders take that is ``2 * level * noise``.
    """
    return pixels + noise.to(pixels) * (2.0 * level)


def mix_image_tokens(start: torch.Tensor, end: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ratio * start + (1 - ratio) * end`` of two ``[N, L, D]`` image-token tensors (after the resampler)."""
    return start * ratio + end * (1.0 - ratio)
