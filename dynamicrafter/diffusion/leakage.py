"""Leakage-free start: sampling from a start step M below the last, from Analytic-Init's noise.

Zhao et al., "Identifying and Solving Conditional Image Leakage in Image-to-Video Diffusion
Model" (NeurIPS 2024; code ``thu-ml/cond-image-leakage``) observe that an image-to-video model
leans on the conditioning image at the noisiest timesteps and moves little. Their inference
strategy starts the reverse process at a timestep ``M`` below the last one, from

    x_M = sqrt(abar) * E[x_0] + sqrt(1 - abar + abar * Tr(Cov[x_0]) / d) * eps,   abar = alphas_cumprod[M - 1]

(*Analytic-Init*), where ``E[x_0]`` (a mean latent video ``[1, C, T, h, w]``) and the scalar
``Tr(Cov[x_0]) / d`` are statistics of the training videos' latents that the authors publish
per resolution (``initial_noise_512.pt``, ``initial_noise_1024.pt``, keys ``Expectation_X0`` and
``Tr_Cov_d``). As in their code:

- the statistics do not depend on the conditioning image (the image enters only through the
  model's conditioning, as always);
- ``eps`` is standard normal, independent per element (every frame its own draw);
- ``M`` counts the model's 1000 training timesteps: the sampler spreads its
  ``num_inference_steps`` over ``[0, M)`` with the usual spacing, as if the model had ``M``
  timesteps (``ddim_timesteps(steps, spacing, M)``, which ``sampling.sample(..., start_step=M)`` uses;
  ``uniform_trailing`` starts at ``M - 1``).
  ``M`` equal to the model's number of timesteps is the usual sampler.

Without Analytic-Init, starting at ``M`` starts from plain standard-normal noise there, as the
authors' code does with ``whether_analytic_init=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

__all__ = ["MEAN_KEY", "TRACE_KEY", "AnalyticInit", "analytic_initial_latents"]

#: The keys of the authors' statistics files.
MEAN_KEY, TRACE_KEY = "Expectation_X0", "Tr_Cov_d"


def analytic_initial_latents(mean: torch.Tensor, trace: float | torch.Tensor, alpha_cumprod: float,
                             noise: torch.Tensor) -> torch.Tensor:
    """Analytic-Init's starting latent ``x_M = sqrt(abar) * mean + sqrt(1 - abar + abar * trace) * noise``.

    Args:
        mean: ``E[x_0]``, ``[1, C, T, h, w]`` (or ``[B, ...]``), broadcast over the batch.
        trace: ``Tr(Cov[x_0]) / d``, a scalar.
        alpha_cumprod: ``abar``, the schedule's ``alphas_cumprod[M - 1]``.
        noise: standard-normal ``eps``, ``[B, C, T, h, w]``.

    Returns ``[B, C, T, h, w]`` in ``noise``'s dtype.
    """
    abar = float(alpha_cumprod)
    trace = float(trace)
    std = (1.0 - abar + abar * trace) ** 0.5
    return (abar ** 0.5 * mean.to(noise) + std * noise).to(noise.dtype)


@dataclass(frozen=True)
class AnalyticInit:
    """Analytic-Init's statistics: ``mean`` ``[1, C, T, h, w]`` (float32) and the scalar ``trace``."""

    mean: torch.Tensor
    trace: float
    path: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> "AnalyticInit":
        """Read a statistics file (the authors' ``.pt`` or a ``.safetensors`` copy), without running code.

        Raises one :class:`UserError` sentence when the file is unreadable or lacks the two keys.
        """
        from ..checkpoints import CheckpointMismatchError, read_release_state_dict

        try:
            state, _ = read_release_state_dict(path)
        except CheckpointMismatchError as exc:
            raise UserError(f"analytic_init: {exc}") from None
        missing = [k for k in (MEAN_KEY, TRACE_KEY) if k not in state]
        if missing:
            raise UserError(f"analytic_init file {path} lacks {' and '.join(missing)}; give an Analytic-Init "
                            f"statistics file such as initial_noise_512.pt.")
        mean, trace = state[MEAN_KEY], state[TRACE_KEY]
        if mean.dim() == 4:
            mean = mean[None]
        if mean.dim() != 5 or mean.shape[0] != 1 or trace.numel() != 1:
            raise UserError(f"analytic_init file {path} holds {MEAN_KEY} of shape {list(state[MEAN_KEY].shape)} "
                            f"and {TRACE_KEY} of {trace.numel()} values; expected [1, C, T, h, w] and one value.")
        trace_value = float(trace.reshape(()))
        if not torch.isfinite(mean).all() or not np.isfinite(trace_value) or trace_value < 0:
            raise UserError(f"analytic_init file {path} holds NaN, infinite or negative statistics.")
        return cls(mean.detach().to(torch.float32).clone(), trace_value, str(path))

    def check_shape(self, latent_shape: tuple[int, ...], height: int, width: int) -> None:
        """Refuse a video whose latent ``[B, C, T, h, w]`` differs from the statistics' ``[C, T, h, w]``."""
        if tuple(self.mean.shape[1:]) != tuple(latent_shape[1:]):
            c, t, h, w = self.mean.shape[1:]
            scale_h, scale_w = height // latent_shape[3], width // latent_shape[4]
            raise UserError(f"The Analytic-Init statistics in {self.path} are for {t} frames of "
                            f"{h * scale_h}x{w * scale_w} pixels ({c} latent channels), but this video has "
                            f"{latent_shape[2]} frames of {height}x{width}; use the statistics of this "
                            "model's resolution with its default size and frame count.")

    def initial_latents(self, noise: torch.Tensor, alphas_cumprod: np.ndarray, start_step: int) -> torch.Tensor:
        """``x_M`` for standard-normal ``noise`` ``[B, C, T, h, w]``, starting at ``start_step`` (``M``)."""
        return analytic_initial_latents(self.mean, self.trace, float(alphas_cumprod[start_step - 1]), noise)
