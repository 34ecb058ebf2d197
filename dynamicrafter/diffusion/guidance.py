"""Classifier-free guidance: one text/image scale, or separate image and text scales.

:func:`guided` and :func:`two_scale_guided` combine UNet outputs (noise or velocity,
``[B, C, T, h, w]``) of branches that saw the same noisy latent and differ only in their
conditioning; :func:`guided_model` wraps the UNet into the guided model function a denoiser
calls, running the branches of :class:`GuidanceBranches` as one batch or one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

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


@dataclass
class GuidanceBranches:
    """What the UNet is conditioned on in each guidance branch, for a batch of ``B`` videos.

    ``context`` ``[B, 77 + image tokens, D]`` is the conditional branch (prompt + image tokens);
    ``uncond_context`` the unconditional one (negative prompt + an all-zero image's tokens), or
    ``None`` without guidance or when two-scale guidance with an image scale of 1 cancels it;
    ``image_context`` the two-scale guidance's image branch (negative prompt + the real image
    tokens), or ``None``. The conditional context may also be per frame, ``[B, T, L, D]``
    (several prompts over time); the others keep theirs on every frame. Every branch shares
    ``concat`` ``[B, 4, T, h, w]`` (the image latents concatenated to the noisy latent) and
    ``fs`` ``[B]`` (frame stride or frame rate).
    """

    context: torch.Tensor
    concat: torch.Tensor
    fs: torch.Tensor
    uncond_context: torch.Tensor | None = None
    image_context: torch.Tensor | None = None

    @property
    def contexts(self) -> list[torch.Tensor]:
        """The branches' contexts in the order the UNet runs them: conditional, unconditional, image."""
        return [c for c in (self.context, self.uncond_context, self.image_context) if c is not None]


UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided_model(unet: UNetFn, branches: GuidanceBranches, scale: float, rescale: float = 0.0,
                 image_scale: float | None = None, sequential: bool = False
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guided model function ``(x [B, 4, T, h, w], t [B]) -> output`` (float32) over ``unet``.

    ``unet(x_in [n*B, 8, T, h, w], t, context, fs)`` is called once per step with every branch of
    ``branches`` in one batch, or once per branch with ``sequential`` (less memory); the outputs
    are combined by :func:`guided` (one scale) or :func:`two_scale_guided` (with ``image_scale``
    and an image branch). A denoiser wraps the result (:class:`~.denoiser.ModelDenoiser`).
    """
    contexts = branches.contexts
    n = len(contexts)
    has_uncond = branches.uncond_context is not None
    has_image = branches.image_context is not None
    batched = n > 1 and not sequential
    if batched:  # what stays the same at every step, repeated once for the batch of n branches
        concat_n = torch.cat([branches.concat] * n)
        context_n = torch.cat(_per_frame_if_any(contexts, branches.concat.shape[2]))
        fs_n = torch.cat([branches.fs] * n)

    def combine(outs: Sequence[torch.Tensor]) -> torch.Tensor:
        if n == 1:
            return outs[0]
        cond_out, rest = outs[0], iter(outs[1:])
        uncond_out = next(rest) if has_uncond else None
        if not has_image:
            return guided(cond_out, uncond_out, scale, rescale)
        return two_scale_guided(cond_out, next(rest), uncond_out, scale, image_scale, rescale)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if batched:
            out = unet(torch.cat([torch.cat([x] * n), concat_n], dim=1), torch.cat([t] * n), context_n, fs_n)
            return combine(out.float().chunk(n))
        x_in = torch.cat([x, branches.concat], dim=1)
        return combine([unet(x_in, t, context, branches.fs).float() for context in contexts])

    return model_fn


def _per_frame_if_any(contexts: list[torch.Tensor], frames: int) -> list[torch.Tensor]:
    """The contexts as they batch: when one is per frame ``[B, T, L, D]``, each ``[B, L, D]`` repeated on every frame."""
    if all(c.dim() == 3 for c in contexts):
        return contexts
    return [c if c.dim() == 4 else c[:, None].expand(-1, frames, -1, -1) for c in contexts]
