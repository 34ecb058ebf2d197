"""Input images: the one loader used by the pipeline, the command line, the app and the examples.

:func:`load_image` turns a file, a PIL image or an array into an 8-bit RGB PIL image the same
way everywhere:

- the EXIF orientation of a photo is applied (a portrait photo stays upright);
- 16-bit images are scaled to 8 bits (``value / 257``), 32-bit integer images are read as
  16-bit data and float images as values in [0, 1];
- transparent pixels are composited on **white** (the original code dropped the alpha channel,
  which shows whatever colour the transparent pixels happen to store, often black);
- files are checked before they are decoded: one of :data:`IMAGE_FORMATS`, at most
  :data:`MAX_IMAGE_PIXELS` pixels and an aspect ratio of at most :data:`MAX_ASPECT_RATIO`, so a
  small file cannot make the decoder or the resize allocate gigabytes.

:func:`fit_image` then scales and centre-crops to the video size; the largest intermediate
scaled image is at most :data:`MAX_ASPECT_RATIO` times the output, so memory stays bounded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FORMATS", "MAX_IMAGE_PIXELS", "MAX_ASPECT_RATIO", "ImageInput",
           "load_image", "fit_image", "cover_geometry"]

#: File formats read (PIL's names) and the file extensions a folder scan picks up.
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF"})
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
IMAGE_KINDS = "PNG, JPEG, WebP, BMP or TIFF"
#: Largest input image, in pixels (64 megapixels: about 200 MB once decoded as RGB).
MAX_IMAGE_PIXELS = 64_000_000
#: Largest ratio of the longer to the shorter side of an input image.
MAX_ASPECT_RATIO = 20

ImageInput = Union[Image.Image, np.ndarray, str, os.PathLike]


def _check_geometry(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise UserError(f"{name} is empty ({width}x{height} pixels).")
    if width * height > MAX_IMAGE_PIXELS:
        raise UserError(f"{name} has {width * height / 1e6:.0f} megapixels ({width}x{height}); "
                         f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f}.")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UserError(f"{name} is {width}x{height} pixels, too narrow a strip to animate; the longer side "
                         f"may be at most {MAX_ASPECT_RATIO} times the shorter.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: high bit depths scaled, alpha composited on white."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        levels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        levels = np.nan_to_num(np.asarray(image, dtype=np.float64)) * 255.0
        image = Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    """A PIL image from ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` uint8/uint16/float ([0, 1]) data."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise UserError(f"{name} must be HxW, HxWx3 or HxWx4, got shape {array.shape}.")
    _check_geometry(array.shape[1], array.shape[0], name)
    if array.dtype == np.uint16:
        array = np.round(array / 257.0)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise UserError(f"{name} holds NaN or infinite values.")
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0)
    elif array.dtype != np.uint8:
        raise UserError(f"{name} must be uint8, uint16 or float in [0, 1], got {array.dtype}.")
    mode = "L" if array.ndim == 2 else ("RGB" if array.shape[2] == 3 else "RGBA")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode))


def _open_file(path: Path, name: str) -> Image.Image:
    """Decode an image file after checking its format and size from the header alone."""
    if path.is_dir():
        raise UserError(f"{name} is a folder, not an image file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.format not in IMAGE_FORMATS:
                    raise UserError(f"{name} is a {opened.format} file; use a {IMAGE_KINDS} image.")
                _check_geometry(opened.width, opened.height, name)
                image = ImageOps.exif_transpose(opened)
                image.load()
                return image
    except FileNotFoundError:
        raise UserError(f"{name} does not exist.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{name} is too large to decode safely.") from None
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image file ({IMAGE_KINDS}).") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(f"{name} cannot be read ({reason.rstrip('.')}).") from None


def load_image(image: ImageInput, name: str | None = None) -> Image.Image:
    """An 8-bit RGB PIL image from a file path, a PIL image or an ``HxW[xC]`` array.

    See the module docstring for the rules (EXIF orientation, bit depths, alpha on white,
    formats and size limits). Every problem is one ``ValueError`` sentence that starts with
    ``name`` (default ``"Image <path>"`` for a file, ``"The image"`` otherwise).
    """
    if isinstance(image, Image.Image):
        _check_geometry(image.width, image.height, name or "The image")
        return _to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, np.ndarray):
        return _from_array(image, name or "The image array")
    if isinstance(image, (str, os.PathLike)):
        name = name or f"Image {image}"
        if str(image).startswith(("http://", "https://")):
            raise UserError(f"{name} is a URL; download it and give the file.")
        return _to_rgb(_open_file(Path(image), name))
    raise UserError(f"Unsupported image type {type(image).__name__}; give a PIL image, a numpy array or a path.")


def cover_geometry(width: int, height: int, out_width: int, out_height: int
                   ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Scaled size and crop offset that cover ``out_width x out_height`` with a ``width x height`` image.

    The side that limits the scale is set to the output's exactly and the other is truncated
    to an integer, as torchvision's ``Resize`` does; the crop is centred with its rounding.
    Returns ``((scaled_width, scaled_height), (left, top))``.
    """
    if out_width * height >= out_height * width:  # the width limits: match it exactly
        scaled = (out_width, max(out_height, int(out_width * height / width)))
    else:
        scaled = (max(out_width, int(out_height * width / height)), out_height)
    left = int(round((scaled[0] - out_width) / 2.0))
    top = int(round((scaled[1] - out_height) / 2.0))
    return scaled, (left, top)


def fit_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Scale an RGB image to cover ``height x width`` and centre-crop it: ``[3, height, width]`` in [-1, 1].

    Where the image is at least as wide (or as tall) as the frame's aspect ratio needs, this is
    torchvision's ``Resize(min(height, width))`` + ``CenterCrop((height, width))``, the
    original's preprocessing, to the pixel. Where that would leave the frame partly empty (the
    original pads with black), the image is scaled up to cover the frame instead. The
    scaled image is at most :data:`MAX_ASPECT_RATIO` times the output's size (the loader refuses
    narrower strips), so memory stays bounded by the output. An image already of the output
    size is used untouched.
    """
    import torch  # here only: reading and checking images needs no torch

    if image.size != (width, height):
        if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
            raise UserError(f"The image is {image.width}x{image.height} pixels, too narrow a strip to animate.")
        scaled, (left, top) = cover_geometry(image.width, image.height, width, height)
        image = image.resize(scaled, Image.BILINEAR).crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0
