"""Noise schedules and DDIM timestep spacings of the DynamiCrafter models.

Everything is computed in float64 from the config; the sampler casts to the latents' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..configs import DiffusionConfig
from ..errors import UserError

SPACINGS = ("uniform", "uniform_trailing")


def linear_betas(timesteps: int, linear_start: float, linear_end: float) -> np.ndarray:
    """The latent-diffusion "linear" schedule: linear in sqrt(beta)."""
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2


def zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero signal (Lin et al. 2024, algorithm 1)."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac ** 2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """``betas`` and ``alphas_cumprod`` (float64, one per training timestep) and the dynamic rescale table."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    scale_arr: np.ndarray | None

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "NoiseSchedule":
        betas = linear_betas(config.timesteps, config.linear_start, config.linear_end)
        if config.rescale_betas_zero_snr:
            betas = zero_terminal_snr(betas)
        scale_arr = None
        if config.use_dynamic_rescale:
            scale_arr = np.concatenate([np.linspace(1.0, config.base_scale, config.turning_step),
                                        np.full(config.timesteps, config.base_scale)])
        return cls(betas, np.cumprod(1.0 - betas), scale_arr)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def scale(self, t: int) -> float:
        """The dynamic rescale factor of timestep ``t`` (1 for models without dynamic rescale)."""
        return 1.0 if self.scale_arr is None else float(self.scale_arr[t])

    def levels(self, timesteps: np.ndarray, keep_last_scale: bool = False) -> "NoiseLevels":
        """The noise levels a sampler walks through when it evaluates the model at ``timesteps``.

        Args:
            timesteps: ``[N]`` training timesteps (any order; visited from the noisiest down).
            keep_last_scale: end at the dynamic rescale factor of the last timestep visited
                instead of that of timestep 0. The original's DDIM does this (its last step
                does not rescale); it only matters for models with dynamic rescale.

        Returns the ``N`` timesteps descending and ``N + 1`` levels: one per timestep and the
        level sampling ends at, ``alphas_cumprod[0]`` (timestep 0), as in the original's DDIM.
        """
        steps = np.sort(np.asarray(timesteps, dtype=np.int64))[::-1].copy()
        if steps.ndim != 1 or len(steps) == 0:
            raise UserError("A sampler needs at least one timestep.")
        if steps[0] >= self.num_timesteps or steps[-1] < 0:
            raise UserError(f"Timesteps must lie in [0, {self.num_timesteps - 1}], got {steps[-1]}..{steps[0]}.")
        ac = np.append(self.alphas_cumprod[steps], self.alphas_cumprod[0])
        if self.scale_arr is None:
            scales = np.ones(len(steps) + 1)
        else:
            last = self.scale_arr[steps[-1]] if keep_last_scale else self.scale_arr[0]
            scales = np.append(self.scale_arr[steps], last).astype(np.float64)
        return NoiseLevels(steps, ac, scales)


@dataclass(frozen=True)
class NoiseLevels:
    """The noise levels of one sampling run, noisiest first (computed outside the samplers).

    Level ``i`` is ``x_i = alphas[i] * x0 + sigmas[i] * noise``: ``alphas`` carries the dynamic
    rescale factor (the 512/1024 models are trained on ``scale_arr[t] * x0``), so a denoiser's
    ``x0`` is comparable across levels. The model is evaluated at ``timesteps[i]`` to step
    from level ``i`` to level ``i + 1``; level ``N`` is where sampling ends.

    Attributes:
        timesteps: ``[N]`` int64 training timesteps, descending.
        alphas_cumprod: ``[N + 1]`` float64, the schedule's cumulative alpha at each level.
        scales: ``[N + 1]`` float64, the dynamic rescale factor at each level (ones without).
    """

    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    scales: np.ndarray

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def alphas(self) -> np.ndarray:
        """``[N + 1]`` signal coefficients ``sqrt(alphas_cumprod) * scales``."""
        return np.sqrt(self.alphas_cumprod) * self.scales

    @property
    def sigmas(self) -> np.ndarray:
        """``[N + 1]`` noise coefficients ``sqrt(1 - alphas_cumprod)``."""
        return np.sqrt(1.0 - self.alphas_cumprod)

    @property
    def log_snrs(self) -> np.ndarray:
        """``[N + 1]`` half log signal-to-noise ratios ``log(alphas / sigmas)`` (-inf at zero SNR)."""
        with np.errstate(divide="ignore"):
            return np.log(self.alphas) - np.log(self.sigmas)


def ddim_timesteps(num_steps: int, spacing: str, num_train_timesteps: int = 1000) -> np.ndarray:
    """The ``num_steps`` training timesteps DDIM visits, ascending.

    ``uniform`` is ``1 + floor(i * T / N)``: exactly the original's timesteps whenever ``T`` is a
    multiple of ``N`` (10, 25, 50, ... steps). For other counts the original runs ``N + 1``
    steps (30 -> 31) or fails (3 asks for timestep 1000); this always runs exactly ``N``.
    ``uniform_trailing`` is ``round(T - i * T / N) - 1``, computed as the original does; for the
    62 counts where the original's float arithmetic yields an extra ``-1`` step, it is dropped.
    """
    if spacing not in SPACINGS:
        raise UserError(f"Unknown timestep spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}.")
    if not 1 <= num_steps <= num_train_timesteps:
        raise UserError(f"The number of steps must be between 1 and {num_train_timesteps}, got {num_steps}.")
    if spacing == "uniform":
        first = 1 if num_steps < num_train_timesteps else 0  # T steps: every timestep, 0 included
        return np.arange(num_steps) * num_train_timesteps // num_steps + first
    # The original's arithmetic (float arange, round half to even), cut to exactly N values.
    steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps))[:num_steps]
    return steps[::-1].astype(np.int64) - 1


def checkpoint_buffers(config: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The schedule buffers the original stores in its checkpoints (float32), computed from the config.

    The loader checks a checkpoint's copies against these instead of trusting them.
    """
    s = NoiseSchedule.from_config(config)
    b, ac = s.betas, s.alphas_cumprod
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
    with np.errstate(divide="ignore"):
        recip = np.zeros_like(ac) if config.parameterization == "v" else np.sqrt(1.0 / ac)
        recipm1 = np.zeros_like(ac) if config.parameterization == "v" else np.sqrt(1.0 / ac - 1)
        buffers = {
            "betas": b,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": recip,
            "sqrt_recipm1_alphas_cumprod": recipm1,
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        }
    if s.scale_arr is not None:
        buffers["scale_arr"] = s.scale_arr
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}
