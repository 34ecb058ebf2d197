"""Motion masks: which parts of the video may move and which are held to the input image.

A mask is a greyscale image (a file, a PIL image or an ``HxW`` array) the size of the input
image, or of the same aspect ratio. **Black (0) is still, every other value moves**: the
convention of kijai's ComfyUI-DynamiCrafterWrapper, whose ComfyUI ``MASK`` marks with 1 (white,
painted) what is masked for change, and holds only where the mask is exactly 0. A colour image
is read as its luma (PIL's ``L``); transparent pixels count as white (they move), as the one image
loader composites them on white.

How it acts, as the wrapper does it: the mask is fitted to the video like the image (scaled
to cover and centre-cropped, here with nearest-neighbour sampling) and sampled down to the
latent grid with nearest-neighbour (``h = H / 8``, ``w = W / 8``); before every sampler step,
including the first, the latent is replaced by the image's latent (the clean one the UNet is
also given, not a noised copy) wherever the mask is still. The sampler's last output is not
blended. One mask applies to every frame. A mask that is white everywhere changes nothing.

:func:`load_mask` reads and checks a mask before any model work (torch-free);
:func:`latent_mask` turns it into the ``[1, 1, 1, h, w]`` weights and :class:`StillRegions` is
the blend the pipeline applies between steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .errors import UserError
from .images import cover_geometry, load_image

if TYPE_CHECKING:
    import torch

__all__ = ["MASK_ASPECT_TOLERANCE", "load_mask", "check_mask_size", "latent_mask", "StillRegions"]

#: How far a mask's aspect ratio may be from its image's (relative) and still be scaled to it.
MASK_ASPECT_TOLERANCE = 0.01


def load_mask(mask: Any, name: str | None = None) -> Image.Image:
    """A mask as an 8-bit greyscale (``L``) PIL image: 0 is still, anything else moves.

    Takes what :func:`~dynamicrafter.images.load_image` takes (a path, a PIL image, an ``HxW``
    or ``HxWx3``/``HxWx4`` array; a boolean array is True where it moves) and a 2-D torch tensor
    (values in [0, 1], as a ComfyUI mask; float values are read on 8-bit levels).
    Raises :class:`UserError` (one sentence starting with ``name``, default ``"The mask"`` or
    ``"Mask <path>"``) for anything unreadable.
    """
    if hasattr(mask, "detach") and hasattr(mask, "cpu"):  # a torch tensor, without importing torch
        mask = mask.detach().cpu().float().numpy()
    if name is None:
        name = f"Mask {mask}" if isinstance(mask, (str, bytes)) or hasattr(mask, "__fspath__") else (
            "The mask array" if isinstance(mask, np.ndarray) else "The mask")
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255  # True moves
    if isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[2] == 2:
        raise UserError(f"{name} must be HxW (greyscale), HxWx3 or HxWx4, got shape {mask.shape}.")
    return load_image(mask, name).convert("L")


def check_mask_size(mask: Image.Image, image: Image.Image, index: int | None = None) -> None:
    """Refuse a mask whose aspect ratio is not its image's (within :data:`MASK_ASPECT_TOLERANCE`)."""
    if mask.size == image.size:
        return
    ratio = (mask.width / mask.height) / (image.width / image.height)
    if abs(ratio - 1) > MASK_ASPECT_TOLERANCE:
        which = "the image" if index is None else f"image {index}"
        raise UserError(f"The mask is {mask.width}x{mask.height} pixels but {which} is {image.width}x{image.height}; "
                        "give a mask of the image's size or aspect ratio.")


def latent_mask(mask: Image.Image, height: int, width: int, downscale: int = 8) -> "torch.Tensor":
    """The still regions on the latent grid: ``[1, 1, 1, height / downscale, width / downscale]`` float32.

    1 where the mask is still (0), 0 where it moves. The mask is scaled to cover the video and
    centre-cropped as :func:`~dynamicrafter.images.fit_image` does the image, then sampled to the
    latent grid; both with ``torch``'s nearest-neighbour (the wrapper's ``F.interpolate(...,
    mode="nearest")``), so a mask already of the video size is sampled exactly as the wrapper does.
    """
    import torch
    import torch.nn.functional as F

    values = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).float()[None, None] / 255.0
    if mask.size != (width, height):
        (scaled_w, scaled_h), (left, top) = cover_geometry(mask.width, mask.height, width, height)
        values = F.interpolate(values, size=(scaled_h, scaled_w), mode="nearest")
        values = values[:, :, top:top + height, left:left + width]
    values = F.interpolate(values, size=(height // downscale, width // downscale), mode="nearest")
    return (values == 0).float()[:, :, None]


class StillRegions:
    """The blend applied to the sampler's latent before each step: the image latent where still.

    Args:
        image_latents: ``[B, 4, T, h, w]``, the latents concatenated to the UNet's input (the
            image's latent on every frame).
        still: ``[B, 1, 1 or T, h, w]``, 1 where the latent is held to the image, 0 where it moves.
    """

    def __init__(self, image_latents: "torch.Tensor", still: "torch.Tensor") -> None:
        self.image_latents = image_latents
        self.still = still.to(image_latents)

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        """``image * still + (1 - still) * x`` in ``x``'s dtype, as the original sampler's ``mask``/``x0`` blend."""
        still = self.still.to(x)
        return self.image_latents.to(x) * still + (1.0 - still) * x
