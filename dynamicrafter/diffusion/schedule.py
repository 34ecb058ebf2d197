"""Noise schedules and DDIM timestep spacings of the DynamiCrafter models.

Everything is computed in float64 from the config; the sampler casts to the latents' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..configs import DiffusionConfig

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


def ddim_timesteps(num_steps: int, spacing: str, num_train_timesteps: int = 1000) -> np.ndarray:
    """The ``num_steps`` training timesteps DDIM visits, ascending.

    ``uniform`` is ``1 + floor(i * T / N)``: exactly the original's timesteps whenever ``T`` is a
    multiple of ``N`` (10, 25, 50, ... steps). For other counts the original runs ``N + 1``
    steps (30 -> 31) or fails (3 asks for timestep 1000); this always runs exactly ``N``.
    ``uniform_trailing`` is ``round(T - i * T / N) - 1``, computed as the original does; for the
    62 counts where the original's float arithmetic yields an extra ``-1`` step, it is dropped.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}.")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"The number of steps must be between 1 and {num_train_timesteps}, got {num_steps}.")
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
