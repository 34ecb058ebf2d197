"""Motion masks (dynamicrafter/masks.py), image augmentation and the image-embedding mix (augmentation.py).

Against what the original's code computes with kijai's wrapper's mask, augmentation and mix put in
as the wrapper does them (tests/data/control.safetensors, see tests/data/README.md), and the
invariants: a white mask, ``augmentation_level=0`` and ``image_embed_ratio=1`` change nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dynamicrafter import DynamiCrafterImg2VideoPipeline
from dynamicrafter.augmentation import augment_pixels, mix_image_tokens
from dynamicrafter.configs import get_config
from dynamicrafter.errors import UserError
from dynamicrafter.images import fit_image
from dynamicrafter.masks import StillRegions, latent_mask, load_mask
from dynamicrafter.options import CALL_OPTIONS, OPTIONS
from dynamicrafter.request import GenerationRequest

from .conftest import CHAIN_TOL, DATA, MODULE_TOL, load_tiny, reference_image, relative_error, replay_noise

FAST = dict(num_inference_steps=2, num_frames=3, height=64, width=64, output_type="latent", return_dict=False)


@pytest.fixture(scope="module")
def control() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "control.safetensors"))


@pytest.fixture(scope="module")
def runs() -> dict:
    with safe_open(str(DATA / "control.safetensors"), "pt") as f:
        return json.loads(f.metadata()["runs"])


@pytest.fixture(scope="module")
def pipes() -> dict[str, DynamiCrafterImg2VideoPipeline]:
    return {name: DynamiCrafterImg2VideoPipeline.from_model(load_tiny(name).model, "cpu", "float32", cast=False)
            for name in ("tiny256", "tiny512")}  # the session's tiny models, shared as they are


@pytest.fixture(scope="module")
def interp_pipe() -> DynamiCrafterImg2VideoPipeline:
    return DynamiCrafterImg2VideoPipeline("512_interp", device="cpu", checkpoint=DATA / "tiny512.ckpt",
                                          config=load_tiny("tiny512").config.replace(interp=True), dtype="float32")


def _settings(run: dict) -> dict:
    return dict(num_inference_steps=run["steps"], guidance_scale=run["cfg"], frame_stride=run["fs"],
                num_frames=run["frames"], height=run["height"], width=run["width"], guidance_rescale=run["rescale"],
                timestep_spacing=run["spacing"], output_type="latent", return_dict=False)


@pytest.mark.parametrize("name", ["tiny256", "tiny512"])
def test_mask_on_the_latent_grid_is_the_wrappers(control, runs, name):
    run = runs[name]
    mask = load_mask(control[f"{name}.mask.input"].numpy())
    ours = latent_mask(mask, run["height"], run["width"])
    assert torch.equal(ours, control[f"{name}.mask.latent_mask"][:, :, :1])
    # the same mask at twice the size (same aspect ratio) samples the same pixels
    big = mask.resize((2 * mask.width, 2 * mask.height), Image.NEAREST)
    assert torch.equal(latent_mask(big, run["height"], run["width"]), ours)


@pytest.mark.parametrize("name", ["tiny256", "tiny512"])
def test_masked_chain_matches_the_original_with_the_wrappers_mask(pipes, control, runs, monkeypatch, name):
    run = runs[name]
    replay_noise(monkeypatch, control[f"{name}.mask.step_noise"])
    ours = pipes[name](reference_image(load_tiny(name).vectors), run["prompt"], eta=1.0,
                       mask=control[f"{name}.mask.input"].numpy(), latents=control[f"{name}.mask.x_T"],
                       **_settings(run))
    err = relative_error(ours, control[f"{name}.mask.latents"])
    assert err < CHAIN_TOL, f"{name} masked chain: relative error {err:.3g}"


def test_augmented_chain_matches_the_original_with_the_wrappers_noise(pipes, control, runs, monkeypatch):
    name, run = "tiny256", runs["tiny256"]
    pipe, image = pipes[name], reference_image(load_tiny(name).vectors)
    noise = control[f"{name}.aug.noise"]
    pixels = augment_pixels(fit_image(image, run["height"], run["width"])[None], run["aug_level"], noise)
    err = relative_error(pipe.model.encode_image_tokens(pixels), control[f"{name}.aug.tokens"])
    assert err < MODULE_TOL, f"augmented image tokens: relative error {err:.3g}"
    err = relative_error(pipe.model.encode_latents(pixels), control[f"{name}.aug.concat"][:, :, 0])
    assert err < MODULE_TOL, f"augmented image latent: relative error {err:.3g}"
    replay_noise(monkeypatch, [noise])  # the augmentation is the only draw (given latents, eta 0)
    ours = pipe(image, run["prompt"], eta=0.0, augmentation_level=run["aug_level"],
                latents=control[f"{name}.aug.x_T"], **_settings(run))
    err = relative_error(ours, control[f"{name}.aug.latents"])
    assert err < CHAIN_TOL, f"augmented chain: relative error {err:.3g}"


def test_interpolation_embedding_mix_and_augmentation_match_the_original(interp_pipe, control, runs, monkeypatch):
    run = runs["interp"]
    v = load_tiny("tiny512").vectors
    mixed = mix_image_tokens(control["interp.mix.tokens_start"], control["interp.mix.tokens_end"],
                             run["image_embed_ratio"])
    assert relative_error(mixed, control["interp.mix.tokens"]) < MODULE_TOL
    replay_noise(monkeypatch, control["interp.mix.aug_noise"])  # start image's noise, then the end image's
    ours = interp_pipe(reference_image(v), run["prompt"], end_image=reference_image(v, "interp.image_end"), eta=0.0,
                       image_embed_ratio=run["image_embed_ratio"], augmentation_level=run["aug_level"],
                       latents=control["interp.mix.x_T"], **_settings(run))
    err = relative_error(ours, control["interp.mix.latents"])
    assert err < CHAIN_TOL, f"interpolation with mix and augmentation: relative error {err:.3g}"


def test_neutral_values_change_nothing(pipes, interp_pipe):
    pipe, image = pipes["tiny256"], np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)

    def run(p=pipe, **options):
        return p(image, "x", generator=torch.Generator().manual_seed(5), **FAST, **options)

    plain = run()
    assert torch.equal(run(mask=np.full((32, 32), 255, np.uint8), augmentation_level=0.0), plain)
    plain = run(interp_pipe, end_image=image[::-1].copy())
    assert torch.equal(run(interp_pipe, end_image=image[::-1].copy(), image_embed_ratio=1.0, augmentation_level=0.0),
                       plain)


def test_still_regions_hold_the_image_latent_before_every_step(pipes, monkeypatch):
    """Every sampler's input is the image latent where the mask is black; the rest is the sampler's own."""
    pipe = pipes["tiny256"]
    image = np.random.RandomState(1).randint(0, 256, (64, 64, 3)).astype(np.uint8)
    mask = np.full((64, 64), 255, np.uint8)
    mask[:, :24] = 0  # latent columns 0-2 are still
    seen = []
    forward = pipe._unet_forward
    monkeypatch.setattr(pipe, "_unet_forward", lambda x, *a, **k: seen.append(x[:1, :4].clone()) or forward(x, *a, **k))
    pipe(image, "x", generator=torch.Generator().manual_seed(3), mask=mask, sampler="dpmpp_2m", guidance_scale=1.0,
         **FAST)
    latent = pipe.model.encode_latents(fit_image(Image.fromarray(image), 64, 64)[None])
    assert len(seen) == 2
    for x in seen:
        assert torch.equal(x[..., :3], latent[:, :, None, :, :3].expand_as(x[..., :3]))
        assert not torch.equal(x[..., 3:], latent[:, :, None, :, 3:].expand_as(x[..., 3:]))


def _build(config, **given):
    values = {name: OPTIONS[name].default for name in CALL_OPTIONS if name != "negative_prompt"}
    return GenerationRequest.build(config, max_steps=1000, **{**values, "num_inference_steps": 2, **given})


def test_a_mask_per_image():
    images = [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 64, 3), np.uint8)]
    config = get_config("256")
    request = _build(config, image=images, mask=[np.zeros((64, 64), np.uint8), np.full((16, 32), 255, np.uint8)])
    assert [m.size for m in request.masks] == [(64, 64), (32, 16)]
    with pytest.raises(UserError) as info:
        _build(config, image=images, mask=np.zeros((64, 64), np.uint8))
    assert str(info.value) == ("The mask is 64x64 pixels but image 1 is 64x32; give a mask of the image's size or "
                               "aspect ratio.")


def test_mask_with_an_end_image_is_refused():
    config = get_config("512_interp")
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(UserError) as info:
        _build(config, image=image, end_image=image, mask=np.zeros((64, 64), bool))
    assert str(info.value) == ("A mask holds parts of the video to the one input image; it cannot be combined with "
                               "end_image (interpolation or a loop).")


def test_mask_values_black_is_still_everything_else_moves():
    values = np.array([[0, 1, 128, 255]] * 4, np.uint8).repeat(8, axis=0).repeat(8, axis=1)  # 32x32
    assert latent_mask(load_mask(values), 32, 32)[0, 0, 0].tolist() == [[1.0, 0.0, 0.0, 0.0]] * 4
    as_bool = load_mask(values > 0)
    assert torch.equal(latent_mask(as_bool, 32, 32), latent_mask(load_mask(values), 32, 32))
    as_tensor = load_mask(torch.from_numpy(values).float() / 255)
    assert torch.equal(latent_mask(as_tensor, 32, 32), latent_mask(load_mask(values), 32, 32))
    still = torch.tensor([[[[[1.0, 0.0]]]]])
    blend = StillRegions(torch.full((1, 1, 2, 1, 2), 5.0), still)
    assert blend(torch.zeros(1, 1, 2, 1, 2)).tolist() == [[[[[5.0, 0.0]], [[5.0, 0.0]]]]]
