"""Leakage-free start (``start_step``, ``analytic_init``) against the CIL authors' code.

``tests/data/cil.safetensors`` holds what ``thu-ml/cond-image-leakage``'s DynamiCrafter inference
computed on the tiny checkpoints (see tests/data/README.md): Analytic-Init's ``x_M`` for given
statistics, start step and noise, and whole chains started at ``M``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dynamicrafter.diffusion.leakage import AnalyticInit, analytic_initial_latents
from dynamicrafter.diffusion.schedule import ddim_timesteps
from dynamicrafter.errors import UserError
from tests.conftest import DATA, load_tiny, reference_image, relative_error, replay_noise

MODULE_TOL, CHAIN_TOL = 1e-4, 1e-3
TINY = ("tiny256", "tiny512")


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "cil.safetensors"))


@pytest.fixture(scope="module")
def runs() -> dict:
    with safe_open(str(DATA / "cil.safetensors"), "pt") as f:
        return json.loads(f.metadata()["runs"])


def tiny_data(name: str) -> tuple[dict, dict]:
    """A tiny model's reference vectors and run settings, without loading the model."""
    return (load_file(str(DATA / f"{name}.vectors.safetensors")),
            json.loads((DATA / "manifest.json").read_text())[name])


def tiny_schedule(name: str):
    from dynamicrafter.configs import load_config
    from dynamicrafter.diffusion.schedule import NoiseSchedule

    return NoiseSchedule.from_config(load_config(DATA / f"{name}.yaml").diffusion)


@pytest.fixture(scope="module")
def pipes():
    """Pipelines around the session's tiny models (float32), shared as they are: nothing here changes them."""
    from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

    return {name: DynamiCrafterImg2VideoPipeline.from_model(load_tiny(name).model, "cpu", torch.float32, cast=False)
            for name in TINY}


def statistics_file(ref, name: str, folder, suffix: str = ".pt"):
    """The tiny statistics in the authors' layout: ``torch.save({"Expectation_X0": ..., "Tr_Cov_d": ...})``."""
    path = folder / f"{name}_initial_noise{suffix}"
    stats = {"Expectation_X0": ref[f"{name}.stats.Expectation_X0"], "Tr_Cov_d": ref[f"{name}.stats.Tr_Cov_d"]}
    if suffix == ".pt":
        torch.save(stats, path)
    else:
        save_file(stats, str(path))
    return path


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("start", [1000, 700, 1])
def test_analytic_init_matches_reference(ref, name, start):
    schedule = tiny_schedule(name)
    ours = analytic_initial_latents(ref[f"{name}.stats.Expectation_X0"], ref[f"{name}.stats.Tr_Cov_d"],
                                    schedule.alphas_cumprod[start - 1], ref[f"{name}.init{start}.eps"])
    assert relative_error(ours, ref[f"{name}.init{start}.x_M"]) < MODULE_TOL


def test_start_step_timesteps_are_the_authors(runs):
    """``M`` counts training timesteps; the spacing runs over ``[0, M)`` (their ``ddpm_from``)."""
    for name, spacing in (("tiny256", "uniform"), ("tiny512", "uniform_trailing")):
        for run in runs[name].values():
            assert ddim_timesteps(run["steps"], spacing, run["start_step"]).tolist() == run["timesteps"]


def run_chain(pipe, name, run, settings, ref, monkeypatch, tmp_path):
    vectors, m = tiny_data(name)
    if settings["eta"] > 0:
        replay_noise(monkeypatch, ref[f"{name}.{run}.step_noise"])
    extra = {"analytic_init": str(statistics_file(ref, name, tmp_path))} if settings["analytic_init"] else {}
    seen: list[int] = []
    out = pipe(reference_image(vectors), m["prompts"][0], num_inference_steps=settings["steps"],
               guidance_scale=m["guidance_scale"], eta=settings["eta"], frame_stride=m["frame_stride"],
               num_frames=m["frames"], height=m["height"], width=m["width"],
               guidance_rescale=m["guidance_rescale"], timestep_spacing=m["timestep_spacing"],
               latents=ref[f"{name}.{run}.eps"], output_type="latent", start_step=settings["start_step"],
               callback_on_step_end=lambda p, i, t, tensors: seen.append(int(t)), **extra)["videos"]
    assert seen == settings["timesteps"][::-1]
    return out


@pytest.mark.parametrize("name", TINY)
def test_chain_from_analytic_init_matches_reference(pipes, ref, runs, monkeypatch, tmp_path, name):
    """eta 1 with the authors' per-step noise replayed; the given latents are Analytic-Init's ``eps``."""
    ours = run_chain(pipes[name], name, "cil", runs[name]["cil"], ref, monkeypatch, tmp_path)
    assert relative_error(ours, ref[f"{name}.cil.latents"]) < CHAIN_TOL


def test_chain_from_plain_noise_at_start_step_matches_reference(pipes, ref, runs, monkeypatch, tmp_path):
    ours = run_chain(pipes["tiny512"], "tiny512", "cil_plain", runs["tiny512"]["cil_plain"], ref, monkeypatch,
                     tmp_path)
    assert relative_error(ours, ref["tiny512.cil_plain.latents"]) < CHAIN_TOL


FAST = dict(num_inference_steps=2, num_frames=4, height=64, width=128, eta=0.0, output_type="latent")


def test_defaults_and_last_start_step_are_todays_sampler(pipes, ref):
    """``start_step`` of the model's 1000 timesteps is the usual run, bit for bit."""
    pipe, image = pipes["tiny512"], reference_image(tiny_data("tiny512")[0])
    noise = ref["tiny512.cil_plain.eps"]
    plain = pipe(image, "", latents=noise, **FAST)["videos"]
    assert torch.equal(pipe(image, "", latents=noise, start_step=1000, **FAST)["videos"], plain)
    assert not torch.equal(pipe(image, "", latents=noise, start_step=500, **FAST)["videos"], plain)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_other_samplers_start_later(pipes, ref, tmp_path, sampler):
    pipe, image = pipes["tiny512"], reference_image(tiny_data("tiny512")[0])
    seen: list[int] = []
    out = pipe(image, "", latents=ref["tiny512.cil.eps"], sampler=sampler, start_step=700,
               analytic_init=str(statistics_file(ref, "tiny512", tmp_path, ".safetensors")),
               callback_on_step_end=lambda p, i, t, tensors: seen.append(int(t)), **FAST)["videos"]
    assert seen == [699, 349] and torch.isfinite(out).all()


def test_analytic_init_draws_its_noise_from_the_generator(pipes, ref, tmp_path):
    """Without ``latents``, ``eps`` is the generator's usual draw."""
    pipe, image = pipes["tiny512"], reference_image(tiny_data("tiny512")[0])
    path = statistics_file(ref, "tiny512", tmp_path)
    settings = {k: v for k, v in FAST.items() if k != "output_type"}
    eps = torch.randn(pipe.check_inputs(image, "", **settings).latent_shape, generator=torch.Generator().manual_seed(5))
    expected = analytic_initial_latents(ref["tiny512.stats.Expectation_X0"], ref["tiny512.stats.Tr_Cov_d"],
                                        pipe.model.schedule.alphas_cumprod[699], eps)
    # the authors' two settings (whether_analytic_init, analytic_init_path), and a path as the short form
    for given in (dict(analytic_init=True, analytic_init_path=str(path)), dict(analytic_init=str(path)),
                  dict(analytic_init_path=path)):
        request = pipe.check_inputs(image, "", start_step=700, generator=torch.Generator().manual_seed(5),
                                    **given, **settings)
        assert torch.equal(pipe.prepare_latents(request), expected)


def test_statistics_files_refused_with_one_sentence(pipes, ref, tmp_path):
    pipe, image = pipes["tiny512"], reference_image(tiny_data("tiny512")[0])
    path = statistics_file(ref, "tiny512", tmp_path)
    with pytest.raises(UserError, match=r"^The Analytic-Init statistics in .* are for 4 frames of 64x128 pixels "
                                        r"\(4 latent channels\), but this video has 3 frames of 64x128; use the "
                                        r"statistics of this model's resolution with its default size and frame "
                                        r"count\.$"):
        pipe.check_inputs(image, "", analytic_init=str(path), **{**FAST, "num_frames": 3})
    other = tmp_path / "other.safetensors"
    save_file({"mean": torch.zeros(1)}, str(other))
    with pytest.raises(UserError, match=r"^analytic_init file .*other.safetensors lacks Expectation_X0 and "
                                        r"Tr_Cov_d; give an Analytic-Init statistics file such as "
                                        r"initial_noise_512.pt\.$"):
        pipe.check_inputs(image, "", analytic_init=str(other), **FAST)
    assert AnalyticInit.from_file(path).trace == pytest.approx(0.8)


def test_cil_checkpoint_layouts_read_as_the_original(tmp_path):
    """The CIL fine-tuned files are the original's layout: their loader is the original's (strict), taking
    a Lightning ``{"state_dict": ...}`` or a DeepSpeed ``{"module": {"_forward_module.<key>": ...}}``.

    Both read to the release keys here; loading such files strictly into a model is
    ``tests/test_checkpoints.py``'s (``test_deepspeed_layout_loads`` and the release-layout tests).
    """
    from dynamicrafter.checkpoints import read_state_dict

    expected = read_state_dict(DATA / "tiny512.ckpt")
    lightning, deepspeed = tmp_path / "timenoise.ckpt", tmp_path / "timenoise_deepspeed.ckpt"
    torch.save({"state_dict": expected, "epoch": 3}, lightning)
    torch.save({"module": {"_forward_module." + k: v for k, v in expected.items()}}, deepspeed)
    for path in (lightning, deepspeed):
        state = read_state_dict(path)
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
