"""Classifier-free guidance: one text/image scale, or separate image and text scales.

All functions combine UNet outputs (noise or velocity, ``[B, C, T, h, w]``) of branches that
saw the same noisy latent and differ only in their conditioning.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def rescale_guidance(guided_out: torch.Tensor, cond_out: torch.Tensor, rescale: float) -> torch.Tensor:
    """Match the guided output's std to the conditional one's, mixed by ``rescale`` (Lin et al. 2024, 3.4).

    The std is taken per sample, over all dimensions but the first.
    """
    dims = list(range(1, cond_out.ndim))
    rescaled = guided_out * (cond_out.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1.0 - rescale) * guided_out


def guided(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)``, optionally rescaled.

    ``cond_out``: the branch with the prompt and the image tokens; ``uncond_out``: the one with
    the negative (default empty) prompt and the image tokens of an all-zero image.
    """
    out = uncond_out + scale * (cond_out - uncond_out)
    return rescale_guidance(out, cond_out, rescale) if rescale > 0 else out


def two_scale_guided(cond_out: torch.Tensor, image_out: torch.Tensor, uncond_out: torch.Tensor | None,
                     scale: float, image_scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Separate image and text guidance: ``uncond + image_scale * (image - uncond) + scale * (cond - image)``.

    This is the original's multi-condition guidance (``DDIMSampler_multicond``, ``--cfg_img``).
    ``image_out`` is the branch with the negative (default empty) prompt and the *real* image
    tokens; ``cond_out`` and ``uncond_out`` are those of :func:`guided`. With
    ``image_scale == 1`` the unconditional branch cancels out and may be ``None``:
    ``image + scale * (cond - image)``. The rescale, as in the original, matches the std of
    ``cond_out``.
    """
    if uncond_out is None:
        if image_scale != 1.0:
            raise UserError("The unconditional branch is needed unless image_scale is 1.")
        out = image_out + scale * (cond_out - image_out)
    else:
        out = uncond_out + image_scale * (image_out - uncond_out) + scale * (cond_out - image_out)
    return rescale_guidance(out, cond_out, rescale) if rescale > 0 else out
