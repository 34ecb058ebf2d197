"""The image-to-video pipeline on the tiny reference models: parity, outputs, inputs, precision."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dynamicrafter import DynamiCrafterImg2VideoPipeline
from dynamicrafter.errors import GenerationError
from dynamicrafter.offload import offload_mode
from dynamicrafter.options import SAMPLING_OPTIONS
from dynamicrafter.pipeline import fit_image

from .conftest import CHAIN_TOL, DATA, MODULE_TOL, load_tiny, reference_image, relative_error, replay_noise, tiny_pipeline

FAST = dict(num_inference_steps=2, num_frames=3, height=64, width=64)


@pytest.fixture(scope="module")
def pipes() -> dict[str, DynamiCrafterImg2VideoPipeline]:
    return {name: tiny_pipeline(name, dtype="float32") for name in ("tiny256", "tiny512")}


@pytest.mark.parametrize("name", ["tiny256", "tiny512"])
def test_image_to_video_chain_matches_reference(pipes, monkeypatch, name):
    ref = load_tiny(name)
    v, m = ref.vectors, ref.manifest
    replay_noise(monkeypatch, v["i2v.step_noise"])
    out = pipes[name](reference_image(v), m["prompts"][0], num_inference_steps=m["ddim_steps"],
                      guidance_scale=m["guidance_scale"], eta=m["ddim_eta"], frame_stride=m["frame_stride"],
                      num_frames=m["frames"], height=m["height"], width=m["width"],
                      guidance_rescale=m["guidance_rescale"], timestep_spacing=m["timestep_spacing"],
                      latents=v["i2v.x_T"], output_type="latent")
    err = relative_error(out["videos"], v["i2v.latents"])
    assert err < CHAIN_TOL, f"{name} i2v.latents: relative error {err:.3g}"
    frames = pipes[name].decode(v["i2v.latents"])  # [B, T, 3, H, W] in [0, 1]
    expected = ((v["i2v.video"].transpose(1, 2) + 1) / 2).clamp(0, 1)
    err = relative_error(frames, expected)
    assert err < MODULE_TOL, f"{name} i2v.video: relative error {err:.3g}"


@pytest.mark.parametrize("name", ["tiny256", "tiny512"])
def test_deterministic_chain_matches_reference(pipes, name):
    ref = load_tiny(name)
    v, m = ref.vectors, ref.manifest
    out = pipes[name](reference_image(v), m["prompts"][0], num_inference_steps=m["ddim_steps"],
                      guidance_scale=m["guidance_scale"], eta=0.0, frame_stride=m["frame_stride"],
                      num_frames=m["frames"], height=m["height"], width=m["width"], guidance_rescale=0.0,
                      latents=v["i2v_eta0.x_T"], output_type="latent", return_dict=False)
    err = relative_error(out, v["i2v_eta0.latents"])
    assert err < CHAIN_TOL, f"{name} i2v_eta0.latents: relative error {err:.3g}"


def test_interpolation_chain_matches_reference(monkeypatch):
    ref = load_tiny("tiny512")
    v, m = ref.vectors, ref.manifest
    pipe = DynamiCrafterImg2VideoPipeline("512_interp", device="cpu", checkpoint=DATA / "tiny512.ckpt",
                                          config=ref.config.replace(interp=True), dtype="float32")
    replay_noise(monkeypatch, v["interp.step_noise"])
    out = pipe(reference_image(v), m["prompts"][0], end_image=reference_image(v, "interp.image_end"),
               num_inference_steps=m["ddim_steps"], guidance_scale=m["guidance_scale"], eta=m["ddim_eta"],
               frame_stride=m["frame_stride"], num_frames=m["frames"], height=m["height"], width=m["width"],
               latents=v["interp.x_T"], output_type="latent")
    err = relative_error(out["videos"], v["interp.latents"])
    assert err < CHAIN_TOL, f"interp.latents: relative error {err:.3g}"


def test_output_types_and_ranges(pipes):
    pipe = pipes["tiny256"]
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    pt = pipe(image, "a", generator=torch.Generator().manual_seed(0), **FAST)["videos"]
    assert pt.shape == (1, 3, 3, 64, 64) and pt.dtype == torch.float32
    assert 0.0 <= pt.min() and pt.max() <= 1.0
    arr = pipe(image, "a", generator=torch.Generator().manual_seed(0), output_type="np", **FAST)["videos"]
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 3, 64, 64, 3)
    np.testing.assert_allclose(arr, pt.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    lat = pipe(image, "a", generator=torch.Generator().manual_seed(0), output_type="latent", **FAST)["videos"]
    assert lat.shape == (1, 4, 3, 8, 8)


def test_model_size_is_the_default(pipes):
    videos = pipes["tiny512"](np.zeros((40, 60, 3), dtype=np.uint8), "x", num_inference_steps=1, num_frames=1,
                              output_type="latent")["videos"]
    cfg = pipes["tiny512"].config
    assert (cfg.height, cfg.width) == (320, 512)
    assert videos.shape == (1, 4, 1, 40, 64)


def test_same_seed_same_video_and_other_seed_differs(pipes):
    pipe = pipes["tiny256"]
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    runs = [pipe(image, "x", generator=torch.Generator().manual_seed(s), **FAST)["videos"] for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_batch_of_images_with_prompt_list(pipes, tmp_path):
    pipe = pipes["tiny256"]
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    path = tmp_path / "b.png"
    Image.fromarray(images[1]).save(path)
    noise = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    batch = pipe([images[0], path], ["one", "two"], latents=noise, eta=0.0, **FAST)["videos"]
    single = pipe(images[1], "two", latents=noise[1:], eta=0.0, **FAST)["videos"]
    assert batch.shape == (2, 3, 3, 64, 64)
    assert relative_error(batch[1:], single) < 1e-4


def test_sequential_guidance_equals_batched(pipes):
    pipe = pipes["tiny256"]
    image = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    batched = pipe(image, "x", latents=noise, eta=0.0, output_type="latent", **FAST)["videos"]
    pipe.sequential_guidance = True
    try:
        sequential = pipe(image, "x", latents=noise, eta=0.0, output_type="latent", **FAST)["videos"]
    finally:
        pipe.sequential_guidance = False
    assert relative_error(sequential, batched) < 1e-5


def test_conditioning_is_encoded_once(pipes, monkeypatch):
    """One VAE encode per image (not per frame); the empty prompt and zero image are encoded once."""
    pipe = tiny_pipeline("tiny256", dtype="float32")
    calls = {"vae": [], "text": 0, "image": 0}
    model = pipe.model
    encode, text, image_tokens = model.vae.encode, model.encode_text, model.encode_image_tokens
    monkeypatch.setattr(model.vae, "encode", lambda x: calls["vae"].append(x.shape[0]) or encode(x))
    monkeypatch.setattr(model, "encode_text", lambda p: calls.__setitem__("text", calls["text"] + 1) or text(p))
    monkeypatch.setattr(model, "encode_image_tokens",
                        lambda x: calls.__setitem__("image", calls["image"] + 1) or image_tokens(x))
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    for _ in range(2):
        pipe(image, "x", **FAST)
    assert calls["vae"] == [1, 1]  # one image each call, whatever the frame count
    assert calls["text"] == 3  # prompt twice + the empty negative prompt once
    assert calls["image"] == 3  # image twice + the zero image once


def test_fit_image_covers_and_crops():
    wide = Image.fromarray(np.zeros((100, 300, 3), dtype=np.uint8))
    assert fit_image(wide, 64, 128).shape == (3, 64, 128)
    tall = Image.fromarray(np.zeros((300, 100, 3), dtype=np.uint8))
    assert fit_image(tall, 320, 512).shape == (3, 320, 512)
    exact = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    pixels = fit_image(Image.fromarray(exact), 64, 64)
    assert torch.equal(((pixels + 1) * 127.5).round().byte().permute(1, 2, 0), torch.from_numpy(exact))


def test_constructor_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown resolution '999'"):
        DynamiCrafterImg2VideoPipeline("999", device="cpu")
    with pytest.raises(ValueError, match="Checkpoint .*missing.ckpt does not exist"):
        DynamiCrafterImg2VideoPipeline("256", device="cpu", checkpoint=tmp_path / "missing.ckpt",
                                       config=DATA / "tiny256.yaml")
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        tiny_pipeline("tiny256", dtype="float8")


def test_save_video_writes_the_first_video(pipes, tmp_path):
    import av

    videos = pipes["tiny256"](np.zeros((64, 64, 3), dtype=np.uint8), "x", **FAST)["videos"]
    path = pipes["tiny256"].save_video(videos, tmp_path / "out.mp4", fps=8)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height, len(frames)) == (64, 64, 3)
        assert stream.average_rate == 8


def test_bfloat16_close_to_float32(pipes):
    """Half precision is checked against our own float32 run (same noise), not the reference."""
    bf16 = tiny_pipeline("tiny512", dtype="bfloat16")
    assert bf16.model.unet.time_embed[0].weight.dtype == torch.bfloat16
    image = reference_image(load_tiny("tiny512").vectors)
    noise = torch.randn(1, 4, 4, 8, 16, generator=torch.Generator().manual_seed(5))
    args = dict(num_inference_steps=5, num_frames=4, height=64, width=128, latents=noise, eta=0.0,
                output_type="latent")
    ours = bf16(image, "a tiny robot dancing in the rain", **args)["videos"]
    ref = pipes["tiny512"](image, "a tiny robot dancing in the rain", **args)["videos"]
    err = relative_error(ours, ref)
    assert ours.dtype == torch.float32 and err < 2e-2, f"bf16 vs float32 relative error {err:.3g}"


def test_non_finite_sampling_and_decoding_are_redone_in_float32(caplog):
    """Half precision that overflows (forced here by hooks) is redone in float32: no NaN video."""
    pipe = tiny_pipeline("tiny256", dtype="bfloat16")
    reference = tiny_pipeline("tiny256", dtype="float32")

    def poison_in_half(module, inputs, output):
        half = next(module.parameters()).dtype != torch.float32
        return output * float("nan") if half else output

    pipe.model.unet.register_forward_hook(poison_in_half)
    pipe.model.vae.decoder.register_forward_hook(poison_in_half)
    image = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with caplog.at_level(logging.WARNING, logger="dynamicrafter"):
        videos = pipe(image, "x", latents=noise, eta=0.0, **FAST)["videos"]
    assert torch.isfinite(videos).all()
    messages = [r.getMessage() for r in caplog.records]
    assert "The model gave non-finite values in bfloat16; running it again in float32 from the same inputs." in messages
    assert "The VAE gave non-finite values in bfloat16; running it again in float32 from the same inputs." in messages
    assert pipe.model.unet.time_embed[0].weight.dtype == torch.bfloat16  # back to its dtype afterwards
    expected = reference(image, "x", latents=noise, eta=0.0, **FAST)["videos"]
    assert relative_error(videos, expected) < 2e-2


def test_offload_modes():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert offload_mode(None, cuda) == "encoders"  # the default on a GPU
    assert offload_mode(True, cuda) == "model" and offload_mode(False, cuda) == "none"
    assert offload_mode(True, cpu) == "none"  # nothing to offload to on the CPU
    with pytest.raises(ValueError, match="Unknown offload mode 'disk'"):
        offload_mode("disk", cuda)


def test_offloader_lends_and_returns_weights():
    """Host-kept modules are on the device only inside ``on_device``; their host copies are kept, not copied back."""
    from dynamicrafter.offload import Offloader

    resident, kept = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    host_pointers = [p.data_ptr() for p in kept.parameters()]
    lender = Offloader(torch.device("meta"), [resident], [kept])  # "meta" stands in for a GPU
    assert all(p.is_meta for p in resident.parameters())
    assert not any(p.is_meta for p in kept.parameters())
    with lender.on_device(kept, resident):
        assert all(p.is_meta for p in kept.parameters())
    assert [p.data_ptr() for p in kept.parameters()] == host_pointers
    assert all(p.device.type == "cpu" for p in kept.parameters())


def test_pipeline_offload_modes_lend_what_they_say(monkeypatch):
    """encoders: only the CLIP towers and resampler stay on the host; model: every component does."""
    for mode, kept in (("encoders", 3), ("model", 5)):
        pipe = tiny_pipeline("tiny256", dtype="float32")
        m = pipe.model
        monkeypatch.setattr(pipe, "device", torch.device("meta"))  # a stand-in for a GPU
        pipe._place(mode)
        assert len(pipe._offloader.on_host) == kept
        assert all(not next(c.parameters()).is_meta for c in pipe._offloader.on_host)
        assert next(m.unet.parameters()).is_meta == (mode == "encoders")
        with pipe._on_device(m.embedder):
            assert next(m.embedder.parameters()).is_meta
        assert not next(m.embedder.parameters()).is_meta


IMAGE = np.full((64, 64, 3), 90, dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe(pipes) -> DynamiCrafterImg2VideoPipeline:
    return pipes["tiny256"]


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
