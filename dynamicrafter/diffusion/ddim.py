"""DDIM over a model's schedule as one object: the original's tables and a ``sample`` method.

The sampler itself is :func:`.sampling.sample_ddim`; this class keeps the per-step tables the
original computes (tested against its ``make_ddim_sampling_parameters``) and the
``sample(denoise, x, num_steps, ...)`` entry point that takes a raw model function.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from .denoiser import ModelDenoiser, ModelFn
from .guidance import guided, rescale_guidance
from .sampling import NoiseSampler, ddim_sigmas, sample_ddim
from .schedule import NoiseSchedule, ddim_timesteps

__all__ = ["DDIMSampler", "guided", "rescale_guidance"]


class DDIMSampler:
    """DDIM over a model's noise schedule, for epsilon or v prediction, with dynamic rescale.

    Args:
        schedule: the model's :class:`NoiseSchedule`.
        parameterization: ``"eps"`` or ``"v"``: what the model function predicts.
    """

    def __init__(self, schedule: NoiseSchedule, parameterization: str = "eps") -> None:
        if parameterization not in ("eps", "v"):
            raise UserError(f"Unknown parameterization {parameterization!r}; expected 'eps' or 'v'.")
        self.schedule = schedule
        self.parameterization = parameterization

    def tables(self, num_steps: int, spacing: str, eta: float) -> dict[str, np.ndarray]:
        """Per-step coefficients (float64), indexed in ascending timestep order, as the original's."""
        ac = self.schedule.alphas_cumprod
        steps = ddim_timesteps(num_steps, spacing, self.schedule.num_timesteps)
        alphas = ac[steps]
        alphas_prev = np.concatenate([ac[:1], ac[steps[:-1]]])
        tables = {"timesteps": steps, "alphas": alphas, "alphas_prev": alphas_prev,
                  "sigmas": ddim_sigmas(alphas, alphas_prev, eta)}
        if self.schedule.scale_arr is not None:
            scale = self.schedule.scale_arr[steps]
            tables["rescale"] = np.concatenate([scale[:1], scale[:-1]]) / scale
        return tables

    @torch.no_grad()
    def sample(self, denoise: ModelFn, x: torch.Tensor, num_steps: int, eta: float = 1.0,
               spacing: str = "uniform", noise_sampler: NoiseSampler | None = None,
               generator: torch.Generator | None = None,
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Run DDIM from the noise ``x`` ``[B, C, T, h, w]`` (the latent at the last timestep) to a clean latent.

        Args:
            denoise: ``(x, t [B] long) -> output`` of the model (guidance already applied).
            noise_sampler: ``step -> noise`` for the stochastic part (eta > 0); default
                ``randn`` drawn from ``generator``.
            callback: called as ``callback(step, num_steps)`` after each step (1-based).
        """
        if noise_sampler is None:
            def noise_sampler(_: int) -> torch.Tensor:
                return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        levels = self.schedule.levels(ddim_timesteps(num_steps, spacing, self.schedule.num_timesteps),
                                      keep_last_scale=True)
        on_step = None if callback is None else (lambda info: callback(info.step + 1, info.total))
        return sample_ddim(ModelDenoiser(denoise, self.schedule, self.parameterization), x, levels, eta,
                           noise_sampler=noise_sampler, callback=on_step)

