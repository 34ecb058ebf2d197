"""Samplers apart from the model: exactness on toy denoisers, convergence order, callbacks, pipeline use.

Toy denoisers have a known exact solution of the probability-flow ODE over the same noise
levels as the real models (eps and v prediction, zero terminal SNR, dynamic rescale):

* a point mass (the clean latent is a constant): DDIM, DPM-Solver++(2M) and UniPC are exact;
* a clean latent affine in the log-SNR: UniPC (second order) is exact;
* Gaussian data (the denoiser is linear in x): the error falls with the solver's order
  (over levels uniform in log-SNR).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dynamicrafter.configs import get_config
from dynamicrafter.diffusion.ddim import DDIMSampler
from dynamicrafter.diffusion.denoiser import ModelDenoiser, Prediction
from dynamicrafter.diffusion.sampling import SAMPLERS, StepInfo, get_sampler, sample, sample_ddim, sample_dpmpp_2m, sample_unipc
from dynamicrafter.diffusion.schedule import NoiseLevels, NoiseSchedule, ddim_timesteps

from .conftest import load_tiny, relative_error, tiny_pipeline

# 256: eps, no rescale; 512: v, zero terminal SNR, dynamic rescale 0.7
SCHEDULES = {res: (NoiseSchedule.from_config(get_config(res).diffusion), get_config(res).diffusion.parameterization)
             for res in ("256", "512")}
NAMES = list(SAMPLERS)


def as_model_fn(clean, schedule: NoiseSchedule, parameterization: str):
    """A model function (``(x, t [B]) -> eps or v``) whose denoiser predicts ``clean(x, t)`` (unscaled x0)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = int(t[0])
        ac, scale = schedule.alphas_cumprod[step], schedule.scale(step)
        x0 = clean(x, step)
        eps = (x - ac ** 0.5 * scale * x0) / (1 - ac) ** 0.5
        return eps if parameterization == "eps" else ac ** 0.5 * eps - (1 - ac) ** 0.5 * scale * x0

    return model_fn


def run(name: str, clean, schedule: NoiseSchedule, parameterization: str, x: torch.Tensor, steps: int,
        spacing: str = "uniform_trailing"):
    denoiser = ModelDenoiser(as_model_fn(clean, schedule, parameterization), schedule, parameterization)
    levels = schedule.levels(ddim_timesteps(steps, spacing), get_sampler(name).keep_last_scale)
    return sample(name, denoiser, x, schedule, steps, spacing, eta=0.0), levels


@pytest.mark.parametrize("res", SCHEDULES)
@pytest.mark.parametrize("name", NAMES)
def test_exact_for_a_point_mass(name, res):
    """x0 is a constant c: the ODE solution is ``sigma_f / sigma_0 * x + (alpha_f - sigma_f * alpha_0 / sigma_0) * c``."""
    schedule, param = SCHEDULES[res]
    gen = torch.Generator().manual_seed(0)
    c, x = torch.randn(2, 4, 3, 4, 4, generator=gen, dtype=torch.float64)
    for steps, spacing in ((1, "uniform_trailing"), (4, "uniform_trailing"), (7, "uniform"), (25, "uniform")):
        out, levels = run(name, lambda x_, t: c, schedule, param, x, steps, spacing)
        a, s = levels.alphas, levels.sigmas
        exact = s[-1] / s[0] * x + (a[-1] - s[-1] * a[0] / s[0]) * c
        assert relative_error(out, exact) < 1e-9, (name, res, steps, spacing)


@pytest.mark.parametrize("res", SCHEDULES)
def test_unipc_exact_for_x0_affine_in_log_snr(res):
    schedule, param = SCHEDULES[res]
    gen = torch.Generator().manual_seed(1)
    c0, c1, x = torch.randn(3, 1, 4, 2, 4, 4, generator=gen, dtype=torch.float64)
    levels = schedule.levels(np.array([100, 300, 500, 700, 899]))  # every level with a finite log-SNR
    snr = dict(zip(levels.timesteps.tolist(), levels.log_snrs))
    denoiser = ModelDenoiser(as_model_fn(lambda x_, t: c0 + snr[t] * c1, schedule, param), schedule, param)
    out = sample_unipc(denoiser, x, levels)
    lam, _a, s = levels.log_snrs, levels.alphas, levels.sigmas
    # x / sigma grows by the integral of exp(lam) * (c0 + lam * c1) dlam
    integral = lambda lam_: np.exp(lam_) * c0 + np.exp(lam_) * (lam_ - 1) * c1  # noqa: E731
    exact = s[-1] * (x / s[0] + integral(lam[-1]) - integral(lam[0]))
    assert relative_error(out, exact) < 1e-9
    dpm = sample_dpmpp_2m(denoiser, x, levels)
    assert relative_error(dpm, exact) > 1e-6  # DPM-Solver++(2M) is only exact for a constant x0


def gaussian_error(sampler, steps: int) -> float:
    """Relative error against the exact solution for data ``N(mu, c^2)``, over levels uniform in log-SNR.

    The models' timestep spacings are uniform in t, which puts most of the log-SNR range into
    the last steps; levels uniform in log-SNR (from -3 to 3.5) show each solver's order cleanly.
    """
    gen = torch.Generator().manual_seed(2)
    mu, x = torch.randn(2, 1, 4, 2, 4, 4, generator=gen, dtype=torch.float64)
    c2 = 0.3
    lam = np.linspace(-3.0, 3.5, steps + 1)
    levels = NoiseLevels(np.arange(steps)[::-1].copy(), 1 / (1 + np.exp(-2 * lam)), np.ones(steps + 1))
    alpha = dict(zip(levels.timesteps.tolist(), levels.alphas))

    def ideal(x_: torch.Tensor, t: int) -> Prediction:
        a = alpha[t]
        x0 = mu + a * c2 / (a * a * c2 + 1 - a * a) * (x_ - a * mu)
        return Prediction(x0, (x_ - a * x0) / (1 - a * a) ** 0.5)

    out = sampler(ideal, x, levels)
    a, s = levels.alphas, levels.sigmas
    exact = a[-1] * mu + np.sqrt((a[-1] ** 2 * c2 + s[-1] ** 2) / (a[0] ** 2 * c2 + s[0] ** 2)) * (x - a[0] * mu)
    return relative_error(out, exact)


@pytest.mark.parametrize(("sampler", "order"), [(sample_ddim, 1), (sample_dpmpp_2m, 2), (sample_unipc, 3)])
def test_convergence_order_on_gaussian_data(sampler, order):
    """Measured: DDIM 0.94, 0.97; DPM-Solver++(2M) 1.66, 1.94; UniPC 2.99, 3.01 (10 -> 20 -> 40 steps)."""
    errors = [gaussian_error(sampler, n) for n in (10, 20, 40)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > order - 0.4) and orders[-1] > order - 0.1, f"errors {errors}, observed orders {orders}"


# --------------------------------------------------------------------------------------------
# DDIM kept as it was; the tiny model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", SCHEDULES)
def test_ddim_function_equals_the_ddim_sampler_object(res):
    schedule, param = SCHEDULES[res]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 2, 4, 4, generator=gen)
    noise = torch.randn(5, 1, 4, 2, 4, 4, generator=gen)
    model_fn = lambda x_, t: torch.tanh(x_ * (1 + t[0] / 1000))  # noqa: E731
    spacing = get_config(res).diffusion.timestep_spacing
    old = DDIMSampler(schedule, param).sample(model_fn, x, 5, 1.0, spacing, noise_sampler=lambda i: noise[i])
    new = sample("ddim", ModelDenoiser(model_fn, schedule, param), x, schedule, 5, spacing, eta=1.0,
                 noise_sampler=lambda i: noise[i])
    assert torch.equal(old, new)


@pytest.fixture(scope="module")
def tiny256_denoiser():
    """The tiny 256 model (eps) on the reference image and prompt, no guidance, 1 frame of 8x8."""
    tm = load_tiny("tiny256")
    m, v = tm.model, tm.vectors
    context = torch.cat([m.encode_text(["a tiny robot dancing in the rain"]), m.encode_image_tokens(v["image.input"])], 1)
    concat = m.encode_latents(v["image.input"])[:, :, None]
    fs = torch.tensor([3])

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return m.unet(torch.cat([x, concat], 1), t, context, fs)

    x_T = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return ModelDenoiser(model_fn, m.schedule, "eps"), m.schedule, x_T


@torch.no_grad()
def test_convergence_order_on_the_tiny_model(tiny256_denoiser):
    """Errors at 5 and 10 steps against 40 steps of UniPC (uniform_trailing spacing)."""
    denoiser, schedule, x_T = tiny256_denoiser
    reference = sample("unipc", denoiser, x_T, schedule, 40, "uniform_trailing")
    errors = {name: [relative_error(sample(name, denoiser, x_T, schedule, n, "uniform_trailing"), reference)
                     for n in (5, 10)] for name in NAMES}
    orders = {name: np.log2(e5 / e10) for name, (e5, e10) in errors.items()}
    # Measured: ddim 0.85, dpmpp_2m 1.53, unipc 2.46; errors at 10 steps 4.6e-3, 1.8e-3, 9.3e-4.
    assert 0.7 < orders["ddim"] < 1.3, orders
    assert orders["dpmpp_2m"] > 1.4 and orders["unipc"] > 1.8, orders
    assert errors["unipc"][1] < errors["dpmpp_2m"][1] < errors["ddim"][1] / 2, errors


def test_one_denoiser_call_per_step(tiny256_denoiser):
    denoiser, schedule, x_T = tiny256_denoiser
    for name in NAMES:
        before = denoiser.calls
        sample(name, denoiser, x_T, schedule, 3, "uniform")
        assert denoiser.calls - before == 3, name


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------


def constant_denoiser(value: float = 0.5):
    def denoiser(x: torch.Tensor, t: int) -> Prediction:
        return Prediction(torch.full_like(x, value), x.clone())

    return denoiser


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmpp_2m, sample_unipc])
def test_callback_sees_every_step_and_can_stop(sampler):
    schedule, _ = SCHEDULES["512"]
    levels = schedule.levels(ddim_timesteps(4, "uniform_trailing"))
    seen: list[StepInfo] = []
    x = torch.randn(1, 4, 1, 2, 2)
    sampler(constant_denoiser(), x, levels, callback=seen.append)
    assert [i.step for i in seen] == [0, 1, 2, 3] and all(i.total == 4 for i in seen)
    assert [i.t for i in seen] == [999, 749, 499, 249]
    assert all(torch.all(i.denoised == 0.5) and i.x.shape == x.shape for i in seen)

    def stop_after_two(info: StepInfo) -> None:
        info.stop = info.step == 1
        if info.step == 1:
            info.x = torch.zeros_like(info.x)

    calls = []
    denoiser = constant_denoiser()
    out = sampler(lambda x_, t: calls.append(t) or denoiser(x_, t), x, levels, callback=stop_after_two)
    assert calls == [999, 749] and torch.equal(out, torch.zeros_like(x))


def test_unknown_sampler_is_one_clear_error():
    with pytest.raises(ValueError, match="Unknown sampler 'euler'; choose one of: ddim, dpmpp_2m, unipc."):
        get_sampler("euler")
    with pytest.raises(ValueError, match="UniPC order must be 1, 2 or 3"):
        sample_unipc(constant_denoiser(), torch.zeros(1), SCHEDULES["256"][0].levels(np.array([1])), order=4)


# --------------------------------------------------------------------------------------------
# In the pipeline
# --------------------------------------------------------------------------------------------

FAST = dict(num_inference_steps=3, num_frames=2, height=64, width=64, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("tiny256", dtype="float32")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_pipeline_runs_each_sampler(pipe, image, name):
    steps = []
    out = pipe(image, "x", latents=noise(), sampler=name, callback=lambda s, n: steps.append((s, n)), **FAST)
    ddim = pipe(image, "x", latents=noise(), eta=0.0, **FAST)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert out["videos"].shape == (1, 4, 2, 8, 8) and torch.isfinite(out["videos"]).all()
    assert 1e-4 < relative_error(out["videos"], ddim["videos"]) < 0.5  # another solver of the same ODE
    again = pipe(image, "x", latents=noise(), sampler=name, eta=0.3, **FAST)  # eta is DDIM's: ignored
    assert torch.equal(again["videos"], out["videos"])


def test_callback_on_step_end_gets_tensors_replaces_latents_and_interrupts(pipe, image):
    seen = []

    def record(p, step, t, tensors):
        seen.append((step, t, sorted(tensors)))
        assert p is pipe and tensors["latents"].shape == (1, 4, 2, 8, 8)
        return {}

    pipe(image, "x", latents=noise(), callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["latents", "denoised"], **FAST)
    assert seen == [(0, 667, ["denoised", "latents"]), (1, 334, ["denoised", "latents"]),
                    (2, 1, ["denoised", "latents"])]

    denoised = {}

    def stop_at_1(p, step, t, tensors):
        denoised[step] = tensors["denoised"]
        if step == 1:
            p._interrupt = True
        return {"latents": tensors["latents"]}

    stopped = pipe(image, "x", latents=noise(), sampler="dpmpp_2m", callback_on_step_end=stop_at_1,
                   callback_on_step_end_tensor_inputs=["denoised", "latents"], **FAST)["videos"]
    assert sorted(denoised) == [0, 1] and torch.equal(stopped, denoised[1])
    zeros = pipe(image, "x", latents=noise(), eta=0.0,
                 callback_on_step_end=lambda p, s, t, k: {"latents": torch.zeros_like(k["latents"])}, **FAST)
    assert torch.equal(zeros["videos"], torch.zeros(1, 4, 2, 8, 8))
    assert not pipe.interrupt
    steps = []  # the plain callback can stop it too
    pipe(image, "x", latents=noise(), callback=lambda s, n: steps.append(s) or setattr(pipe, "_interrupt", s == 1),
         **FAST)
    assert steps == [1]


def test_callback_returning_latents_of_another_shape_is_one_sentence(pipe, image):
    with pytest.raises(ValueError) as info:
        pipe(image, "x", **FAST, callback_on_step_end=lambda p, s, t, k: {"latents": torch.zeros(2)})
    assert str(info.value) == "callback_on_step_end must return latents of shape [1, 4, 2, 8, 8]."


def test_non_finite_half_precision_redo_with_another_sampler(pipe, caplog):
    """The float32 redo also works for the new samplers (same noise, same result as float32)."""
    reference, pipe = pipe, tiny_pipeline("tiny256", dtype="bfloat16")

    def poison_in_half(module, inputs, output):
        return output * float("nan") if next(module.parameters()).dtype != torch.float32 else output

    pipe.model.unet.register_forward_hook(poison_in_half)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="dynamicrafter"):
        out = pipe(image, "x", latents=noise(), sampler="unipc", **FAST)["videos"]
    assert any("running it again in float32" in r.getMessage() for r in caplog.records)
    expected = reference(image, "x", latents=noise(), sampler="unipc", **FAST)["videos"]
    assert relative_error(out, expected) < 2e-2


def test_convergence_report_table_and_plot(tmp_path):
    from dynamicrafter.bench import convergence

    results = {"steps": [5, 10], "frames": 2, "reference_steps": 1000,
               "runs": {"tiny256/uniform_trailing": {"ddim": [2e-2, 1e-2], "dpmpp_2m": [1e-2, 3e-3]}}}
    table = convergence.markdown(results).splitlines()
    assert table[0] == "| model / spacing | sampler | 5 steps | 10 steps |"
    assert table[3] == "| tiny256/uniform_trailing | dpmpp_2m | 1.0e-02 | 3.0e-03 |"
    pytest.importorskip("matplotlib")
    out = convergence.plot(results, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*.tmp"))
