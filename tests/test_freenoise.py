"""FreeNoise for long videos: windowed temporal attention and noise rescheduling against FreeNoise's own code.

``tests/data/freenoise.safetensors`` holds what FreeNoise's ``attention_freenoise.TemporalTransformer``
computed on the tiny256 model's temporal-transformer weights, and what its noise-rescheduling loop
made of recorded noise with recorded shuffles (see tests/data/README.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dynamicrafter.diffusion.rescheduling import block_permutations, reschedule_noise
from dynamicrafter.models.attention import pyramid_weights, temporal_windows, use_temporal_windows

from .conftest import CHAIN_TOL, DATA, MODULE_TOL, load_tiny, reference_image, relative_error, tiny_pipeline

VECTORS = DATA / "freenoise.safetensors"
IMAGE = np.full((64, 64, 3), 90, dtype=np.uint8)
FAST = dict(num_inference_steps=2, height=64, width=64, output_type="latent")


def _cases() -> dict:
    with safe_open(str(VECTORS), "pt") as f:
        return json.loads(f.metadata()["cases"])


CASES = _cases()
ATTENTION_CASES = sorted(key for key in CASES if key.startswith("attn"))
RESCHEDULE_CASES = sorted(key for key in CASES if key.startswith("resched"))


@pytest.fixture(scope="module")
def vectors() -> dict[str, torch.Tensor]:
    return load_file(str(VECTORS))


def _layer(prefix: str) -> torch.nn.Module:
    unet = load_tiny("tiny256").model.unet
    return unet.get_submodule(prefix.removeprefix("model.diffusion_model.").rstrip("."))


def _settings(key: str) -> tuple[int, int, int]:
    frames, rest = key.split(".f")[1].split("s")
    size, stride = rest.split("d")
    return int(frames), int(size), int(stride)


def _run(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Our layer on FreeNoise's ``[B, C, T, h, w]`` input, returned in that layout."""
    b, c, t, h, w = x.shape
    y = layer(x.transpose(1, 2).reshape(b * t, c, h, w), t)
    return y.view(b, t, c, h, w).transpose(1, 2)


def test_windows_are_freenoise_views_plus_one_ending_at_the_last_frame():
    for key in ATTENTION_CASES:
        frames, size, stride = _settings(key)
        assert temporal_windows(frames, size, stride) == [tuple(v) for v in CASES[key]["views"]], key
    assert temporal_windows(12, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10), (8, 12)]
    assert temporal_windows(11, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10), (7, 11)]
    assert temporal_windows(4, 4, 2) == [(0, 4)]
    assert pyramid_weights(4) == [1, 2, 2, 1]
    assert pyramid_weights(5) == [1, 2, 3, 2, 1]
    assert pyramid_weights(16) == [*range(1, 9), *range(8, 0, -1)]


@pytest.mark.parametrize("key", ATTENTION_CASES)
def test_windowed_temporal_attention_matches_freenoise(vectors, key):
    frames, size, stride = _settings(key)
    layer = _layer(CASES[key]["layer"])
    with torch.no_grad(), use_temporal_windows(layer, size, stride):
        ours = _run(layer, vectors[f"{key}.x"])
    assert relative_error(ours, vectors[f"{key}.y"]) < MODULE_TOL
    assert layer.window is None  # put back after the block


def test_on_exact_fits_the_extra_window_is_not_added(vectors):
    for key in ATTENTION_CASES:
        if CASES[key]["views"] == CASES[key]["freenoise_views"]:
            assert torch.equal(vectors[f"{key}.y"], vectors[f"{key}.y_freenoise_views"])
        else:  # FreeNoise's own views leave the tail without temporal attention: its output differs there
            frames = _settings(key)[0]
            last = CASES[key]["freenoise_views"][-1][1]
            tail = slice(last, frames)
            assert not torch.allclose(vectors[f"{key}.y"][:, :, tail], vectors[f"{key}.y_freenoise_views"][:, :, tail])


def test_windows_change_nothing_up_to_the_window_size():
    layer = _layer("model.diffusion_model.input_blocks.1.2.")
    x = torch.randn(2 * 4, 32, 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = layer(x, 4)
        with use_temporal_windows(layer, 4, 1):
            windowed = layer(x, 4)
        with use_temporal_windows(layer, 8, 4):
            larger = layer(x, 4)
    assert torch.equal(plain, windowed) and torch.equal(plain, larger)


@pytest.mark.parametrize("key", RESCHEDULE_CASES)
def test_noise_rescheduling_matches_freenoise_with_the_same_shuffles(vectors, key):
    frames, size, stride = _settings(key)
    permutations = list(vectors[f"{key}.perms"])
    ours = reschedule_noise(vectors[f"{key}.x_T"], size, stride, permutations)
    assert torch.equal(ours, vectors[f"{key}.rescheduled"])


def test_a_short_last_block_takes_the_first_entries_of_its_shuffle():
    noise = torch.arange(7.0).view(1, 1, 7, 1, 1)
    permutations = [torch.tensor([1, 0]), torch.tensor([1, 0])]
    # window 4, stride 2: frames 4-5 copy frames 0-1 shuffled, frame 6 the first of frames 2-3 shuffled
    assert reschedule_noise(noise, 4, 2, permutations).flatten().tolist() == [0, 1, 2, 3, 1, 0, 3]


def test_shuffles_come_from_the_generator():
    first = block_permutations(16, 4, 4, torch.Generator().manual_seed(3))
    again = block_permutations(16, 4, 4, torch.Generator().manual_seed(3))
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(sorted(p.tolist()) == [0, 1, 2, 3] for p in first)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("tiny256", dtype="float32")


def test_pipeline_noise_is_rescheduled_after_the_first_window(pipe):
    request = pipe.check_inputs(IMAGE, "x", num_frames=10, window_stride=2, generator=torch.Generator().manual_seed(5),
                                **FAST)
    assert request.window_size == 4 and request.windowed and request.noise_rescheduling
    noise = pipe.prepare_latents(request)
    generator = torch.Generator().manual_seed(5)
    plain = torch.randn(request.latent_shape, generator=generator)
    expected = reschedule_noise(plain, 4, 2, block_permutations(10, 4, 2, generator))
    assert torch.equal(noise, expected)
    assert torch.equal(noise[:, :, :4], plain[:, :, :4])
    off = pipe.check_inputs(IMAGE, "x", num_frames=10, window_stride=2, noise_rescheduling=False,
                            generator=torch.Generator().manual_seed(5), **FAST)
    assert torch.equal(pipe.prepare_latents(off), plain)
    given = pipe.check_inputs(IMAGE, "x", num_frames=10, latents=plain, **FAST)
    assert torch.equal(pipe.prepare_latents(given), plain)
    short = pipe.check_inputs(IMAGE, "x", num_frames=4, generator=torch.Generator().manual_seed(5), **FAST)
    assert not short.windowed
    assert torch.equal(pipe.prepare_latents(short), torch.randn(short.latent_shape,
                                                                generator=torch.Generator().manual_seed(5)))


def test_pipeline_runs_windows_only_for_longer_videos(pipe, monkeypatch):
    seen = []
    forward = type(pipe.model.unet.init_attn[0]).forward

    def spy(layer, x, num_frames):
        seen.append(layer.window)
        return forward(layer, x, num_frames)

    monkeypatch.setattr(type(pipe.model.unet.init_attn[0]), "forward", spy)
    pipe(IMAGE, "x", num_frames=6, window_stride=2, eta=0.0, generator=torch.Generator().manual_seed(1), **FAST)
    assert set(seen) == {(4, 2)}
    seen.clear()
    pipe(IMAGE, "x", num_frames=4, window_stride=2, eta=0.0, generator=torch.Generator().manual_seed(1), **FAST)
    assert set(seen) == {None}
    assert all(layer.window is None for layer in pipe.model.unet.modules() if hasattr(layer, "window"))


def test_a_window_larger_than_the_video_means_no_windows(pipe):
    def run(**options):
        return pipe(IMAGE, "x", num_frames=6, eta=0.0, generator=torch.Generator().manual_seed(2), **FAST,
                    **options)["videos"]
    plain = run(window_size=6)
    assert torch.equal(plain, run(window_size=64))
    assert not torch.allclose(plain, run())  # the model's window, 4: windows and rescheduled noise


def test_a_seed_gives_the_same_long_video(pipe):
    def run():
        return pipe(IMAGE, "x", num_frames=7, window_stride=2, generator=torch.Generator().manual_seed(9), **FAST)
    assert torch.equal(run()["videos"], run()["videos"])


def _chains() -> dict:
    with safe_open(str(DATA / "freenoise_chains.safetensors"), "pt") as f:
        return json.loads(f.metadata()["chains"])


@pytest.mark.parametrize("name", ["tiny256", "tiny512"])
def test_windowed_chain_matches_the_original_with_freenoise_attention(name):
    settings = _chains()[name]
    chains = load_file(str(DATA / "freenoise_chains.safetensors"))
    pipe = tiny_pipeline(name, dtype="float32")
    image = reference_image(load_tiny(name).vectors)

    def run(**options):
        return pipe(image, settings["prompt"], num_inference_steps=settings["steps"],
                    guidance_scale=settings["guidance_scale"], eta=settings["eta"],
                    frame_stride=settings["frame_stride"], num_frames=settings["frames"], height=settings["height"],
                    width=settings["width"], guidance_rescale=settings["guidance_rescale"],
                    timestep_spacing=settings["timestep_spacing"], latents=chains[f"{name}.chain.x_T"],
                    output_type="latent", return_dict=False, **options)

    assert temporal_windows(settings["frames"], 4, 2) == [tuple(v) for v in settings["views"]]
    ours = run(window_size=settings["window_size"], window_stride=settings["window_stride"])
    err = relative_error(ours, chains[f"{name}.chain.latents"])
    assert err < CHAIN_TOL, f"{name} windowed chain: relative error {err:.3g}"
    unwindowed = run(window_size=settings["frames"])  # the same call with whole-sequence attention
    assert relative_error(unwindowed, chains[f"{name}.chain.latents"]) > 10 * CHAIN_TOL


@pytest.mark.parametrize("model", ["512_interp", "tooncrafter"])
def test_interpolation_models_make_windowed_videos(model, tmp_path):
    from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

    from .test_tooncrafter import assemble_checkpoint

    if model == "tooncrafter":
        checkpoint, config = assemble_checkpoint(tmp_path / "tinytoon.ckpt"), DATA / "tinytoon.yaml"
    else:
        checkpoint, config = DATA / "tiny512.ckpt", load_tiny("tiny512").config.replace(interp=True)
    pipe = DynamiCrafterImg2VideoPipeline(model, device="cpu", checkpoint=checkpoint, config=config, dtype="float32")
    end = np.full((64, 64, 3), 200, dtype=np.uint8)
    seen = []
    forward = type(pipe.model.unet.init_attn[0]).forward

    def spy(layer, x, num_frames):
        seen.append(layer.window)
        return forward(layer, x, num_frames)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipe.model.unet.init_attn[0]), "forward", spy)
        video = pipe(IMAGE, "x", end_image=end, num_frames=7, window_stride=2, num_inference_steps=2, height=64,
                     width=64, generator=torch.Generator().manual_seed(0))["videos"]
    assert video.shape == (1, 7, 3, 64, 64) and torch.isfinite(video).all()
    assert set(seen) == {(4, 2)}
