"""From a model's raw output (noise or velocity) to what samplers work with: a clean-latent estimate.

A *model function* is ``model_fn(x, t) -> output``: ``x`` the noisy latent ``[B, 4, T, h, w]``,
``t`` the timesteps ``[B]`` (long), ``output`` the UNet's prediction (guidance already applied),
shaped like ``x``. :class:`ModelDenoiser` turns it into a *denoiser*
``denoiser(x, t: int) -> Prediction``, the only thing the samplers in :mod:`.sampling` call.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..errors import UserError
from .schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PARAMETERIZATIONS = ("eps", "v")


class Prediction(NamedTuple):
    """One denoiser evaluation, both tensors shaped like its input ``x``.

    ``x0``: the clean latent, in the units of :class:`~.schedule.NoiseLevels` (divided by the
    dynamic rescale factor of the timestep, so comparable across timesteps). ``eps``: the noise,
    so that ``x = alpha_t * x0 + sigma_t * eps``.
    """

    x0: torch.Tensor
    eps: torch.Tensor


class ModelDenoiser:
    """Wraps a noise (``"eps"``) or velocity (``"v"``) predicting model function into a denoiser.

    Args:
        model_fn: ``(x [B, C, T, h, w], t [B] long) -> output`` like ``x``.
        schedule: the model's :class:`NoiseSchedule` (alphas and the dynamic rescale table).
        parameterization: what ``model_fn`` predicts.

    The conversions are computed in ``x``'s dtype with float64 coefficients, as the original's
    DDIM does them. ``calls`` counts the model evaluations.
    """

    def __init__(self, model_fn: ModelFn, schedule: NoiseSchedule, parameterization: str = "eps") -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise UserError(f"Unknown parameterization {parameterization!r}; expected 'eps' or 'v'.")
        self.model_fn = model_fn
        self.schedule = schedule
        self.parameterization = parameterization
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: int) -> Prediction:
        """Evaluate at the noisy latent ``x`` ``[B, ...]`` of training timestep ``t``."""
        t = int(t)
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = self.model_fn(x, timesteps).to(x.dtype)
        self.calls += 1
        a_t = float(self.schedule.alphas_cumprod[t])
        if self.parameterization == "v":
            x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * out
            eps = a_t ** 0.5 * out + (1 - a_t) ** 0.5 * x
        else:
            eps = out
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if self.schedule.scale_arr is not None:
            x0 = x0 / self.schedule.scale(t)
        return Prediction(x0, eps)
