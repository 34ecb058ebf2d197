"""Two-scale (image + text) guidance against the original's ``DDIMSampler_multicond``.

``tests/data/multicond.safetensors`` holds what the original computed on the tiny checkpoints
(``tests/data/README.md`` says how): the three conditionings, one guided model output with
its DDIM step, and whole chains with eta 1 (noise replayed) and eta 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dynamicrafter.pipeline as pipeline_module
from dynamicrafter.diffusion.denoiser import ModelDenoiser
from dynamicrafter.diffusion.guidance import GuidanceBranches, guided, guided_model, two_scale_guided
from dynamicrafter.diffusion.sampling import StepInfo, sample_ddim
from dynamicrafter.diffusion.schedule import NoiseLevels

from .conftest import (
    CHAIN_TOL,
    DATA,
    MODULE_TOL,
    TINY_NAMES,
    load_tiny,
    reference_image,
    relative_error,
    replay_noise,
    tiny_pipeline,
)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "multicond.safetensors"))


@pytest.fixture(scope="module")
def settings() -> dict:
    return json.loads((DATA / "multicond.json").read_text())


@pytest.fixture(scope="module")
def pipes():
    return {name: tiny_pipeline(name, dtype="float32") for name in TINY_NAMES}


def check(ours: torch.Tensor, expected: torch.Tensor, tol: float, label: str) -> None:
    err = relative_error(ours, expected)
    assert err < tol, f"{label}: relative error {err:.3g}"


@pytest.mark.parametrize("name", TINY_NAMES)
def test_three_conditionings_match_reference(pipes, ref, settings, name):
    s, p = settings[name], f"{name}."
    pipe = pipes[name]
    request = pipe.check_inputs(ref_image(name), s["prompt"], num_frames=s["frames"], frame_stride=s["frame_stride"],
                                height=s["height"], width=s["width"], image_guidance_scale=2.0)
    cond, _ = pipe.encode(request)
    for ours, key in ((cond.context, "context"), (cond.uncond_context, "uncond_context"),
                      (cond.image_context, "image_context"), (cond.concat, "concat")):
        check(ours, ref[p + "mc." + key], MODULE_TOL, f"{name} {key}")


def ref_image(name: str):
    return reference_image(load_tiny(name).vectors)


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("name", TINY_NAMES)
def test_guided_output_and_step_match_reference(pipes, ref, settings, name, sequential):
    """One three-branch guided UNet output, and the DDIM step the original takes with it."""
    s, p = settings[name]["mc_module"], f"{name}.mc_module."
    pipe = pipes[name]
    cond = GuidanceBranches(ref[f"{name}.mc.context"], ref[f"{name}.mc.concat"],
                            torch.tensor([settings[name]["frame_stride"]]), ref[f"{name}.mc.uncond_context"],
                            ref[f"{name}.mc.image_context"])
    model_fn = guided_model(pipe.model.unet, cond, s["guidance_scale"], s["guidance_rescale"], s["cfg_img"],
                            sequential=sequential)
    x, t = ref[p + "x"], ref[p + "t"]
    check(model_fn(x, t), ref[p + "guided"], MODULE_TOL, f"{name} guided output")
    unet = pipe.model.unet
    x_in = torch.cat([x, cond.concat], 1)
    for context, key in ((cond.context, "out_cond"), (cond.uncond_context, "out_uncond"),
                         (cond.image_context, "out_image")):
        check(unet(x_in, t, context, cond.fs), ref[p + key], MODULE_TOL, f"{name} {key}")

    # The step from timestep index 3 to index 2 of the run's 5, eta 0.
    schedule = pipe.model.schedule
    steps = ref[f"{name}.mc.timesteps"].numpy()
    t_now, t_next = int(steps[s["index"]]), int(steps[s["index"] - 1])
    assert t_now == int(t[0])
    levels = NoiseLevels(np.array([t_now]), schedule.alphas_cumprod[[t_now, t_next]],
                         np.array([schedule.scale(t_now), schedule.scale(t_next)]))
    seen: list[StepInfo] = []
    x_prev = sample_ddim(ModelDenoiser(model_fn, schedule, pipe.config.diffusion.parameterization), x, levels,
                         callback=seen.append)
    check(x_prev, ref[p + "x_prev"], MODULE_TOL, f"{name} x_prev")
    # The original's pred_x0 is already multiplied by the next timestep's rescale factor.
    check(seen[0].denoised * schedule.scale(t_next), ref[p + "pred_x0"], MODULE_TOL, f"{name} pred_x0")


def run_reference_chain(pipe, name: str, run: str, settings: dict, ref: dict, monkeypatch) -> torch.Tensor:
    s, r = settings[name], settings[name][run]
    if run == "mc":
        replay_noise(monkeypatch, ref[f"{name}.mc.step_noise"])
    return pipe(reference_image(load_tiny(name).vectors), s["prompt"], num_inference_steps=s["ddim_steps"],
                guidance_scale=r["guidance_scale"], image_guidance_scale=r["cfg_img"], eta=r["ddim_eta"],
                frame_stride=s["frame_stride"], num_frames=s["frames"], height=s["height"], width=s["width"],
                guidance_rescale=r["guidance_rescale"], timestep_spacing=s["timestep_spacing"],
                latents=ref[f"{name}.{run}.x_T"], output_type="latent")["videos"]


@pytest.mark.parametrize("run", ["mc", "mc_eta0"])
@pytest.mark.parametrize("name", TINY_NAMES)
def test_chain_matches_reference(pipes, ref, settings, monkeypatch, name, run):
    """eta 1 with the original's noise replayed (``mc``), and eta 0 with other scales (``mc_eta0``)."""
    ours = run_reference_chain(pipes[name], name, run, settings, ref, monkeypatch)
    check(ours, ref[f"{name}.{run}.latents"], CHAIN_TOL, f"{name} {run}.latents")


def test_sequential_chain_matches_reference(pipes, ref, settings, monkeypatch):
    pipe = pipes["tiny512"]
    pipe.sequential_guidance = True
    try:
        ours = run_reference_chain(pipe, "tiny512", "mc", settings, ref, monkeypatch)
    finally:
        pipe.sequential_guidance = False
    check(ours, ref["tiny512.mc.latents"], CHAIN_TOL, "tiny512 mc.latents, sequential")


# --------------------------------------------------------------------------------------------
# Semantics at the edges, batching
# --------------------------------------------------------------------------------------------

FAST = dict(num_inference_steps=2, num_frames=2, height=64, width=64, eta=0.0, output_type="latent")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def noise() -> torch.Tensor:
    return torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(9))


def unet_batches(pipe, monkeypatch) -> list[int]:
    sizes: list[int] = []
    forward = pipe._unet_forward
    monkeypatch.setattr(pipe, "_unet_forward", lambda x, *a: sizes.append(x.shape[0]) or forward(x, *a))
    return sizes


def test_three_branches_are_one_batch(pipes, image, monkeypatch):
    pipe = pipes["tiny256"]
    sizes = unet_batches(pipe, monkeypatch)
    pipe(image, "x", latents=noise(), guidance_scale=7.5, image_guidance_scale=2.0, **FAST)
    assert sizes == [3, 3]
    sizes.clear()
    pipe.sequential_guidance = True
    try:
        pipe(image, "x", latents=noise(), guidance_scale=7.5, image_guidance_scale=2.0, **FAST)
    finally:
        pipe.sequential_guidance = False
    assert sizes == [1] * 6


def test_equal_scales_are_one_scale_guidance(pipes, image):
    pipe = pipes["tiny512"]
    args = dict(latents=torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1)), guidance_scale=5.0,
                **FAST)
    assert relative_error(pipe(image, "x", image_guidance_scale=5.0, **args)["videos"],
                          pipe(image, "x", **args)["videos"]) < 1e-5


def test_image_scale_one_drops_the_unconditional_branch(pipes, image, monkeypatch):
    pipe = pipes["tiny256"]
    sizes = unet_batches(pipe, monkeypatch)
    ours = pipe(image, "x", latents=noise(), guidance_scale=4.0, image_guidance_scale=1.0, **FAST)["videos"]
    assert sizes == [2, 2]
    # The same with all three branches: the unconditional one cancels out.
    real = pipeline_module.DynamiCrafterImg2VideoPipeline.encode

    def with_uncond(self, request):  # encode the unconditional branch too; the image scale stays 1
        return real(self, dataclasses.replace(request, image_guidance_scale=1.5))

    monkeypatch.setattr(pipeline_module.DynamiCrafterImg2VideoPipeline, "encode", with_uncond)
    three = pipe(image, "x", latents=noise(), guidance_scale=4.0, image_guidance_scale=1.0, **FAST)["videos"]
    assert sizes[2:] == [3, 3]
    assert relative_error(ours, three) < 1e-5


def test_guidance_off_ignores_image_scale_like_the_original(pipes, image, caplog):
    pipe = pipes["tiny256"]
    with caplog.at_level(logging.WARNING, logger="dynamicrafter.pipeline"):
        ours = pipe(image, "x", latents=noise(), guidance_scale=1.0, image_guidance_scale=3.0, **FAST)["videos"]
    assert any("image_guidance_scale has no effect with guidance_scale 1" in r.getMessage() for r in caplog.records)
    assert torch.equal(ours, pipe(image, "x", latents=noise(), guidance_scale=1.0, **FAST)["videos"])


def test_two_scale_formula():
    gen = torch.Generator().manual_seed(0)
    c, i, u = torch.randn(3, 2, 4, 2, 3, 3, generator=gen)
    out = two_scale_guided(c, i, u, 7.5, 2.0)
    torch.testing.assert_close(out, u + 2.0 * (i - u) + 7.5 * (c - i))
    torch.testing.assert_close(two_scale_guided(c, i, u, 3.0, 3.0), guided(c, u, 3.0))
    torch.testing.assert_close(two_scale_guided(c, i, None, 3.0, 1.0), i + 3.0 * (c - i))
    rescaled = two_scale_guided(c, i, u, 7.5, 2.0, rescale=1.0)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3, 4)), c.std(dim=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="The unconditional branch is needed unless image_scale is 1."):
        two_scale_guided(c, i, None, 3.0, 2.0)
