"""Bad input is refused with one ValueError sentence before any model work; bad numbers never make a black video."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dynamicrafter.options import DEFAULTS, OPTIONS, SAMPLING_OPTIONS
from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline, GenerationError

from .conftest import DATA

FAST = dict(num_inference_steps=2, num_frames=3, height=64, width=64)
IMAGE = np.full((64, 64, 3), 90, dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe() -> DynamiCrafterImg2VideoPipeline:
    return DynamiCrafterImg2VideoPipeline("256", device="cpu", checkpoint=DATA / "tiny256.ckpt",
                                          config=DATA / "tiny256.yaml", dtype="float32")


@pytest.fixture
def no_model_work(pipe, monkeypatch):
    """Fail the test if an encoder, the UNet or the VAE runs."""
    def forbidden(*args, **kwargs):
        raise AssertionError("model work started before the inputs were checked")

    for name in ("encode_text", "encode_image_tokens", "encode_latents", "decode_latents"):
        monkeypatch.setattr(pipe.model, name, forbidden)
    monkeypatch.setattr(pipe, "_unet_forward", forbidden)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(latents=torch.full((1, 4, 3, 8, 8), float("nan"))), "latents hold NaN or infinite values."),
    (dict(latents=torch.full((1, 4, 3, 8, 8), float("inf"))), "latents hold NaN or infinite values."),
    (dict(latents=np.zeros((1, 4, 3, 8, 8), dtype=np.float32)), "latents must be a torch.Tensor, got ndarray."),
    (dict(latents=torch.zeros((1, 4, 3, 8, 8), dtype=torch.long)), "latents must be a floating-point tensor"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan."),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf."),
    (dict(guidance_scale="7.5"), "guidance_scale must be a number, got str '7.5'."),
    (dict(eta=float("nan")), "eta must be a finite number, got nan."),
    (dict(eta=2.0), "eta must be between 0 and 1, got 2."),
    (dict(num_frames=10**9), "num_frames must be between 1 and 64, got 1000000000."),
    (dict(num_frames=True), "num_frames must be a whole number, got bool True."),
    (dict(num_frames=3.5), "num_frames must be a whole number, got 3.5."),
    (dict(frame_stride=-5), "frame_stride must be between 1 and 100, got -5."),
    (dict(height=4096), "height must be between 64 and 2048, got 4096."),
    (dict(generator=123), "generator must be a torch.Generator or a list of them, got int"),
    (dict(generator=[torch.Generator()] * 2), "Got 2 generators for 1 video(s)"),
    (dict(image=[], prompt=[]), "No image given; pass an image or a non-empty list of images."),
    (dict(image=None), "image is required."),
    (dict(prompt=5), "prompt must be a string (or a list of strings), got int."),
    (dict(negative_prompt=["a", "b"]), "Got 1 image(s) but 2 negative_prompt(s)"),
    (dict(num_videos_per_prompt=0), "num_videos_per_prompt must be between 1 and 64, got 0."),
    (dict(timestep_spacing="quad"), "Unknown timestep_spacing 'quad'; choose one of: uniform, uniform_trailing."),
    (dict(callback=3), "callback must be callable, got int."),
])
def test_bad_input_is_one_sentence_before_any_model_work(pipe, no_model_work, kwargs, message):
    args = dict(image=IMAGE, prompt="x", **FAST)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        pipe(**args)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and str(info.value).endswith(".")


def test_none_prompt_is_the_empty_prompt(pipe, monkeypatch):
    seen = []
    encode = pipe.model.encode_text
    monkeypatch.setattr(pipe.model, "encode_text", lambda prompts: seen.append(list(prompts)) or encode(prompts))
    pipe(IMAGE, None, num_inference_steps=1, num_frames=1, height=64, width=64, guidance_scale=1.0,
         output_type="latent")
    assert seen == [[""]]


def test_long_prompt_warns_that_it_is_cut(pipe, caplog):
    long = " ".join(["dancing"] * 100)
    with caplog.at_level(logging.WARNING, logger="dynamicrafter.pipeline"):
        pipe(IMAGE, long, num_inference_steps=1, num_frames=1, height=64, width=64, output_type="latent")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "has 102 tokens; the text encoder reads only the first 77" in warning


def test_non_finite_result_that_float32_cannot_fix_is_an_error(pipe):
    """No black video: a NaN in float32 (no redo possible) raises instead of returning garbage."""
    handle = pipe.model.unet.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    try:
        with pytest.raises(GenerationError, match="NaN or infinite values even in float32"):
            pipe(IMAGE, "x", **FAST)
    finally:
        handle.remove()
    handle = pipe.model.vae.decoder.register_forward_hook(lambda module, inputs, output: output * float("inf"))
    try:
        with pytest.raises(GenerationError, match="The VAE produced NaN"):
            pipe(IMAGE, "x", **FAST)
    finally:
        handle.remove()


def test_videos_per_prompt_and_per_video_generators(pipe):
    """Sample k of an image does not depend on what else is in the batch when each video has its generator."""
    images = [IMAGE, np.full((64, 64, 3), 200, dtype=np.uint8)]
    gens = [torch.Generator().manual_seed(seed) for seed in (1, 2, 1, 2)]
    batch = pipe(images, ["a", "b"], num_videos_per_prompt=2, generator=gens, eta=1.0, output_type="latent",
                 **FAST)["videos"]
    assert batch.shape == (4, 4, 3, 8, 8)
    alone = pipe(images[1], "b", generator=[torch.Generator().manual_seed(2)], eta=1.0, output_type="latent",
                 **FAST)["videos"]
    torch.testing.assert_close(batch[3:], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch[2], batch[3])


def test_step_callback_receives_step_and_total(pipe):
    seen = []
    pipe(IMAGE, "x", callback=lambda step, total: seen.append((step, total)), output_type="latent", **FAST)
    assert seen == [(1, 2), (2, 2)]


def test_signature_defaults_come_from_the_options_table():
    import inspect

    parameters = inspect.signature(DynamiCrafterImg2VideoPipeline.__call__).parameters
    for option in SAMPLING_OPTIONS:
        if option.name in parameters:
            assert parameters[option.name].default == option.default, option.name
    assert DEFAULTS.guidance_scale == 7.5 and OPTIONS["num_frames"].flag == "--video_length"
