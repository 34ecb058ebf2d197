"""Noise schedules, DDIM tables and timestep spacings against the original's (``schedules.safetensors``).

Measured (float64, this package vs the reference): alphas_cumprod and the DDIM alphas / alphas_prev /
sigmas(eta=1) agree to ~1e-15 relative; scale_arr (stored float32 by the reference) to ~3e-8 absolute.
The tests use a relative L2 tolerance of 1e-6 (1e-6 relative for the float32 scale_arr).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynamicrafter.configs import get_config
from dynamicrafter.diffusion.ddim import DDIMSampler
from dynamicrafter.diffusion.schedule import NoiseSchedule, ddim_timesteps

from .conftest import DATA

TOL = 1e-6
RESOLUTIONS = ["256", "512", "1024"]


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "schedules.safetensors"))


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _sampler(resolution: str) -> DDIMSampler:
    config = get_config(resolution)
    return DDIMSampler(NoiseSchedule.from_config(config.diffusion), config.diffusion.parameterization)


# --------------------------------------------------------------------------------------------
# Against the released configs' schedules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_alphas_cumprod(resolution: str, ref) -> None:
    schedule = NoiseSchedule.from_config(get_config(resolution).diffusion)
    expected = ref[f"sched{resolution}.alphas_cumprod"].numpy()
    err = _rel(schedule.alphas_cumprod, expected)
    assert err < TOL, f"sched{resolution}.alphas_cumprod: relative error {err:.3e}"
    np.testing.assert_allclose(schedule.alphas_cumprod, expected, rtol=1e-9, atol=1e-15)
    if get_config(resolution).diffusion.rescale_betas_zero_snr:
        assert schedule.alphas_cumprod[-1] == 0.0  # zero terminal SNR
    assert np.all(np.diff(schedule.alphas_cumprod) < 0)


@pytest.mark.parametrize("resolution", ["512", "1024"])
def test_scale_arr(resolution: str, ref) -> None:
    schedule = NoiseSchedule.from_config(get_config(resolution).diffusion)
    expected = ref[f"sched{resolution}.scale_arr"].numpy()  # stored as float32
    assert schedule.scale_arr is not None
    err = _rel(schedule.scale_arr, expected)
    assert err < TOL, f"sched{resolution}.scale_arr: relative error {err:.3e}"
    np.testing.assert_allclose(schedule.scale_arr, expected, rtol=1e-6)


def test_no_scale_arr_for_256() -> None:
    assert NoiseSchedule.from_config(get_config("256").diffusion).scale_arr is None
    assert "rescale" not in _sampler("256").tables(10, "uniform", 1.0)


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_ddim_tables(resolution: str, steps: int, ref) -> None:
    config = get_config(resolution)
    tables = _sampler(resolution).tables(steps, config.diffusion.timestep_spacing, 1.0)
    prefix = f"sched{resolution}.s{steps}"
    assert tables["timesteps"].tolist() == ref[f"{prefix}.timesteps"].tolist()
    errors = {name: _rel(tables[ours], ref[f"{prefix}.{name}"].numpy())
              for ours, name in [("alphas", "alphas"), ("alphas_prev", "alphas_prev"), ("sigmas", "sigmas_eta1")]}
    assert all(e < TOL for e in errors.values()), f"{prefix}: relative errors {errors}"


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_sigmas_scale_with_eta(resolution: str) -> None:
    sampler = _sampler(resolution)
    spacing = get_config(resolution).diffusion.timestep_spacing
    one, half, zero = (sampler.tables(25, spacing, eta)["sigmas"] for eta in (1.0, 0.5, 0.0))
    np.testing.assert_allclose(half, 0.5 * one, rtol=1e-12)
    assert np.all(zero == 0.0)


# --------------------------------------------------------------------------------------------
# Step counts
# --------------------------------------------------------------------------------------------


def _original_uniform(steps: int) -> np.ndarray:
    """The original's 'uniform' DDIM timesteps."""
    return np.asarray(list(range(0, 1000, 1000 // steps))) + 1


def _original_trailing(steps: int) -> np.ndarray:
    """The original's 'uniform_trailing' DDIM timesteps."""
    return np.flip(np.round(np.arange(1000, 0, -1000 / steps))).astype(np.int64) - 1


@pytest.mark.parametrize("steps", [10, 20, 25, 50, 100, 250])
def test_uniform_matches_original_when_1000_divisible(steps: int) -> None:
    ours = ddim_timesteps(steps, "uniform")
    assert ours.tolist() == _original_uniform(steps).tolist()
    assert _sampler("256").tables(steps, "uniform", 1.0)["timesteps"].tolist() == ours.tolist()


class _CountingDenoiser:
    def __init__(self) -> None:
        self.timesteps: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.timesteps.append(int(t[0]))
        return torch.zeros_like(x)


@pytest.mark.parametrize("steps", [3, 7, 30, 33])
def test_uniform_runs_exactly_the_steps_asked(steps: int) -> None:
    # The original runs one step more here (30 -> 31) or asks for timestep 1000 and crashes (3).
    original = _original_uniform(steps)
    assert len(original) == steps + 1
    if steps == 3:
        assert original.max() == 1000

    ours = ddim_timesteps(steps, "uniform")
    assert len(ours) == steps
    assert len(set(ours.tolist())) == steps
    assert np.all(np.diff(ours) > 0)
    assert ours.min() >= 1 and ours.max() <= 999

    for resolution in ("256", "512"):  # eps and v prediction
        denoiser = _CountingDenoiser()
        noise_steps: list[int] = []

        def noise(step: int) -> torch.Tensor:
            noise_steps.append(step)
            return torch.zeros(2, 4, 3, 2, 2)

        out = _sampler(resolution).sample(denoiser, torch.randn(2, 4, 3, 2, 2), steps, 1.0, "uniform",
                                          noise_sampler=noise)
        assert out.shape == (2, 4, 3, 2, 2) and torch.isfinite(out).all()
        assert len(denoiser.timesteps) == steps, f"{resolution}: {len(denoiser.timesteps)} denoiser calls"
        assert denoiser.timesteps == ours[::-1].tolist()  # from the noisiest down
        assert noise_steps == list(range(steps))  # one draw per step, in order (eta 1: the original draws at every step)


def test_sample_calls_denoiser_once_per_step_trailing() -> None:
    for steps in (1, 5, 33, 61):
        denoiser = _CountingDenoiser()
        _sampler("512").sample(denoiser, torch.randn(1, 4, 2, 2, 2), steps, 0.0, "uniform_trailing")
        assert denoiser.timesteps == ddim_timesteps(steps, "uniform_trailing")[::-1].tolist()


def test_uniform_trailing_is_valid_for_every_step_count() -> None:
    for steps in range(1, 1001):
        ours = ddim_timesteps(steps, "uniform_trailing")
        assert len(ours) == steps and len(set(ours.tolist())) == steps, steps
        assert np.all(np.diff(ours) > 0) and ours.min() >= 0 and ours.max() == 999, steps


def test_original_trailing_overshoots_for_some_step_counts() -> None:
    """Where the original's float ``arange`` gives N + 1 values, the extra one is a spurious timestep -1."""
    extra = []
    for steps in range(1, 1001):
        original = _original_trailing(steps)
        if len(original) != steps:
            assert len(original) == steps + 1 and original[0] == -1, steps
            extra.append(steps)
    # 62 counts with numpy's arange: 61, 103, 121, 122, 201, ..., 994, 995, 998
    assert 61 in extra and 998 in extra
    assert all(n not in extra for n in (5, 10, 25, 50, 100, 250, 500, 1000))


def test_uniform_trailing_matches_original_for_every_step_count() -> None:
    mismatches = {}
    for steps in range(1, 1001):
        ours = ddim_timesteps(steps, "uniform_trailing")
        original = _original_trailing(steps)
        if len(original) == steps + 1:  # see test_original_trailing_overshoots_for_some_step_counts
            original = original[1:]
        if ours.tolist() != original.tolist():
            where = np.nonzero(ours != original)[0]
            mismatches[steps] = [(int(ours[i]), int(original[i])) for i in where[:3]]
    assert not mismatches, (
        f"'uniform_trailing' differs from the original for {len(mismatches)} step counts "
        f"(step count: [(ours, original), ...]): {mismatches}")


def test_every_uniform_step_count_is_valid_or_rejected() -> None:
    """Any step count either gives valid table indices (0..999) or a clear ValueError, never an IndexError."""
    sampler = _sampler("256")
    bad = []
    for steps in range(1, 1001):
        try:
            tables = sampler.tables(steps, "uniform", 1.0)
        except ValueError:
            continue
        except IndexError as exc:
            bad.append((steps, str(exc)))
            continue
        ts = tables["timesteps"]
        assert len(ts) == steps and np.all(np.diff(ts) > 0) and 0 <= ts.min() and ts.max() <= 999, steps
    assert not bad, f"'uniform' spacing crashes for step counts {bad}"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["linear", "Uniform", "", "quad"])
def test_bad_spacing(spacing: str) -> None:
    with pytest.raises(ValueError, match=r"Unknown timestep spacing .*uniform, uniform_trailing"):
        ddim_timesteps(10, spacing)
    with pytest.raises(ValueError, match="Unknown timestep spacing"):
        _sampler("256").sample(_CountingDenoiser(), torch.zeros(1, 4, 1, 2, 2), 10, 0.0, spacing)


@pytest.mark.parametrize("steps", [0, -1, 1001])
@pytest.mark.parametrize("spacing", ["uniform", "uniform_trailing"])
def test_bad_step_count(steps: int, spacing: str) -> None:
    with pytest.raises(ValueError, match=f"number of steps must be between 1 and 1000, got {steps}"):
        ddim_timesteps(steps, spacing)
    denoiser = _CountingDenoiser()
    with pytest.raises(ValueError, match="number of steps"):
        _sampler("512").sample(denoiser, torch.zeros(1, 4, 1, 2, 2), steps, 0.0, spacing)
    assert denoiser.timesteps == []


def test_bad_parameterization() -> None:
    with pytest.raises(ValueError, match="parameterization"):
        DDIMSampler(NoiseSchedule.from_config(get_config("256").diffusion), "x0")
