"""The one image loader: orientation, bit depths, transparency, formats, size limits, and the crop."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dynamicrafter import cli, images, page, pipeline
from dynamicrafter.images import MAX_ASPECT_RATIO, fit_image, load_image


def as_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """``fit_image``'s [-1, 1] output back to the uint8 levels it came from, ``[3, H, W]``."""
    return ((pixels + 1) * 127.5).round().to(torch.uint8)


def test_every_front_end_uses_the_same_loader():
    import scripts.pipeline_examples as examples

    assert pipeline.load_image is images.load_image
    assert cli.load_image is images.load_image
    assert page.load_image is images.load_image
    assert examples.load_image is images.load_image


def test_exif_orientation_is_applied(tmp_path):
    """A portrait photo stored sideways with EXIF orientation 6 comes out upright (as the app always did)."""
    stored = Image.new("RGB", (80, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 10, 40))  # a blue band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (40, 80)
    top = np.asarray(upright)[:5].reshape(-1, 3).mean(axis=0)
    assert top[2] > 200 and top[0] < 60  # the band is now at the top
    with Image.open(path) as opened:  # a PIL image the user opened gets the same treatment
        assert np.array_equal(np.asarray(load_image(opened)), np.asarray(upright))


def test_16_bit_greyscale_keeps_its_levels(tmp_path):
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (64, 64, 3)
    expected = np.round(levels / 257.0).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected)
    assert (pixels == 255).mean() < 0.01  # was 99.6 % white before


def test_16_bit_array_and_float_array():
    levels = np.full((8, 8, 3), 32896, dtype=np.uint16)  # 128 * 257
    assert np.asarray(load_image(levels)).max() == 128
    assert np.asarray(load_image(np.full((8, 8, 3), 0.5))).max() == 128
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        load_image(np.full((8, 8, 3), np.nan))


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red where opaque, transparent elsewhere
    rgba[:8, :, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(load_image(path))
    assert (pixels[:8] == [255, 0, 0]).all()
    assert (pixels[8:] == [255, 255, 255]).all()
    assert np.array_equal(np.asarray(load_image(rgba)), pixels)  # arrays too
    palette = Image.fromarray(rgba, "RGBA").convert("P", palette=Image.ADAPTIVE)
    palette.info["transparency"] = 0
    assert load_image(palette).mode == "RGB"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".bmp", ".tif", ".tiff"])
def test_every_listed_format_loads(tmp_path, suffix):
    assert suffix in images.IMAGE_EXTENSIONS
    path = tmp_path / f"image{suffix}"
    Image.new("RGB", (32, 24), (10, 200, 30)).save(path)
    assert load_image(path).size == (32, 24)


def test_other_formats_and_non_images_are_refused(tmp_path):
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (8, 8)).save(gif)
    with pytest.raises(ValueError, match=r"anim.gif is a GIF file; use a PNG, JPEG, WebP, BMP or TIFF image\."):
        load_image(gif)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.png is not an image file"):
        load_image(text)
    with pytest.raises(ValueError, match=r"is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match=r"The start image is a URL"):
        load_image("https://example.com/cat.png", "The start image")


def test_thin_strip_is_refused_before_decoding(tmp_path):
    """A 1x100000 PNG (a few hundred KB) used to be resized whole: ~1 GB per 12 KB of upload."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (1, 100_000), (0, 0, 0)).save(path)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="too narrow a strip to animate"):
            load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_pixel_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)
    with pytest.raises(ValueError, match=r"has 0 megapixels \(40x40\); the limit is 0"):
        load_image(path)


def test_widest_accepted_strip_stays_within_the_output_bound():
    strip = Image.new("RGB", (MAX_ASPECT_RATIO * 50, 50), (1, 2, 3))
    tracemalloc.start()
    try:
        fit_image(strip, 256, 256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (MAX_ASPECT_RATIO + 2) * 256 * 256 * 3 * 4  # the scaled strip, not more


@pytest.mark.parametrize(("size", "frame"), [
    ((1920, 1080), (320, 512)), ((777, 333), (320, 512)), ((640, 480), (256, 256)), ((480, 640), (256, 256)),
    ((2000, 1000), (576, 1024)), ((100, 60), (320, 512)),
])
def test_crop_is_torchvisions_resize_and_center_crop(size, frame):
    """Where the original's Resize(min side) + CenterCrop fills the frame, we match it to the pixel."""
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    height, width = frame
    expected = T.Compose([T.Resize(min(frame)), T.CenterCrop(frame), T.PILToTensor()])(image)
    assert torch.equal(as_uint8(fit_image(image, height, width)), expected)


def test_documented_difference_where_the_original_pads_with_black():
    """A 4:3 photo in a 320x512 frame: the original's crop has black side bars, ours covers the frame."""
    image = Image.new("RGB", (640, 480), (200, 150, 100))
    original = T.Compose([T.Resize(320), T.CenterCrop((320, 512)), T.PILToTensor()])(image)
    ours = as_uint8(fit_image(image, 320, 512))
    assert (original[:, :, :20] == 0).all() and (original[:, :, -20:] == 0).all()
    assert (ours == torch.tensor([200, 150, 100], dtype=torch.uint8)[:, None, None]).all()
