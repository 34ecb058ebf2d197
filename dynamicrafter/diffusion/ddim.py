"""DDIM sampling (Song et al. 2021) as DynamiCrafter runs it, independent of any model.

The sampler only sees a ``denoise(x, t) -> model output`` function; classifier-free guidance
is a separate helper the caller folds into that function (:func:`guided`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .schedule import NoiseSchedule, ddim_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[int], torch.Tensor]


def rescale_guidance(guided_out: torch.Tensor, cond_out: torch.Tensor, rescale: float) -> torch.Tensor:
    """Match the guided output's std to the conditional one's, mixed by ``rescale`` (Lin et al. 2024, 3.4)."""
    dims = list(range(1, cond_out.ndim))
    rescaled = guided_out * (cond_out.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1.0 - rescale) * guided_out


def guided(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)``, optionally rescaled."""
    out = uncond_out + scale * (cond_out - uncond_out)
    return rescale_guidance(out, cond_out, rescale) if rescale > 0 else out


class DDIMSampler:
    """DDIM over a model's noise schedule, for epsilon or v prediction, with dynamic rescale.

    Args:
        schedule: the model's :class:`NoiseSchedule`.
        parameterization: ``"eps"`` or ``"v"``: what the denoiser predicts.
    """

    def __init__(self, schedule: NoiseSchedule, parameterization: str = "eps") -> None:
        if parameterization not in ("eps", "v"):
            raise ValueError(f"Unknown parameterization {parameterization!r}; expected 'eps' or 'v'.")
        self.schedule = schedule
        self.parameterization = parameterization

    def tables(self, num_steps: int, spacing: str, eta: float) -> dict[str, np.ndarray]:
        """Per-step coefficients (float64), indexed in ascending timestep order."""
        ac = self.schedule.alphas_cumprod
        steps = ddim_timesteps(num_steps, spacing, self.schedule.num_timesteps)
        alphas = ac[steps]
        alphas_prev = np.concatenate([ac[:1], ac[steps[:-1]]])
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        tables = {"timesteps": steps, "alphas": alphas, "alphas_prev": alphas_prev, "sigmas": sigmas}
        if self.schedule.scale_arr is not None:
            scale = self.schedule.scale_arr[steps]
            tables["rescale"] = np.concatenate([scale[:1], scale[:-1]]) / scale
        return tables

    @torch.no_grad()
    def sample(self, denoise: Denoiser, x: torch.Tensor, num_steps: int, eta: float = 1.0,
               spacing: str = "uniform", noise_sampler: NoiseSampler | None = None,
               generator: torch.Generator | None = None,
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Run DDIM from the noise ``x`` (the latent at the last timestep) down to a clean latent.

        Args:
            denoise: ``(x, t) -> output`` of the model (guidance already applied).
            noise_sampler: ``step -> noise`` for the stochastic part (eta > 0); default
                ``randn`` drawn from ``generator``.
            callback: called as ``callback(step, num_steps)`` after each step (1-based).
        """
        tables = self.tables(num_steps, spacing, eta)
        if noise_sampler is None:
            def noise_sampler(_: int) -> torch.Tensor:
                return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        for step, index in enumerate(reversed(range(num_steps))):
            t = torch.full((x.shape[0],), int(tables["timesteps"][index]), device=x.device, dtype=torch.long)
            out = denoise(x, t).to(x.dtype)
            a_t, a_prev = tables["alphas"][index], tables["alphas_prev"][index]
            sigma = tables["sigmas"][index]
            if self.parameterization == "v":
                pred_x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * out
                eps = a_t ** 0.5 * out + (1 - a_t) ** 0.5 * x
            else:
                eps = out
                pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            if "rescale" in tables:
                pred_x0 = pred_x0 * tables["rescale"][index]
            # Clamped: with zero terminal SNR and eta = 1 this is 0 up to rounding, and a
            # negative rounding error would turn the whole video into NaN.
            x = a_prev ** 0.5 * pred_x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * noise_sampler(step)
            if callback is not None:
                callback(step + 1, num_steps)
        return x
