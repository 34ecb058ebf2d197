"""Samplers: each a function of (denoiser, x, levels, ...), independent of any model.

* ``denoiser(x, t) -> Prediction(x0, eps)``: see :mod:`.denoiser` (the eps/v conversion and
  the dynamic rescale live there; guidance lives in the model function it wraps).
* ``x``: the starting noise ``[B, C, T, h, w]`` (any shape works), at level 0.
* ``levels``: the :class:`~.schedule.NoiseLevels` to walk through, computed outside
  (:meth:`NoiseSchedule.levels` over :func:`ddim_timesteps`).
* ``callback(info: StepInfo)`` after every step, with the step, the timestep, the new latent
  and the predicted clean latent; it may replace ``info.x`` or set ``info.stop``.

Each sampler evaluates the denoiser once per step and returns the latent at the last level
(``[B, C, T, h, w]`` like ``x``). :func:`sample` picks one by name and builds the levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from .denoiser import Prediction
from .schedule import NoiseLevels, NoiseSchedule, ddim_timesteps

Denoiser = Callable[[torch.Tensor, int], Prediction]
NoiseSampler = Callable[[int], torch.Tensor]


@dataclass
class StepInfo:
    """What a sampler tells its callback after each step.

    Attributes:
        step: index of the step just taken, 0-based.
        total: number of steps of the run.
        t: the training timestep the denoiser was evaluated at.
        x: the latent after the step, ``[B, C, T, h, w]``; assign a tensor to replace it.
        denoised: the predicted clean latent of this step (units of :class:`NoiseLevels`).
        stop: set it to True to end sampling now; the sampler then returns ``x``.
    """

    step: int
    total: int
    t: int
    x: torch.Tensor
    denoised: torch.Tensor
    stop: bool = False


Callback = Callable[[StepInfo], None]


def _after_step(callback: Callback | None, step: int, levels: NoiseLevels, x: torch.Tensor,
                denoised: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if callback is None:
        return x, False
    info = StepInfo(step, len(levels), int(levels.timesteps[step]), x, denoised)
    callback(info)
    return info.x, info.stop


def ddim_sigmas(alphas_cumprod: np.ndarray, alphas_cumprod_next: np.ndarray, eta: float) -> np.ndarray:
    """DDIM's noise std per step: ``eta`` times the DDPM posterior std between the two levels (float64)."""
    a, a_next = np.asarray(alphas_cumprod, np.float64), np.asarray(alphas_cumprod_next, np.float64)
    return eta * np.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))


def _decay(levels: NoiseLevels, i: int) -> float:
    """``exp(-h)`` of step ``i``, ``h`` the log-SNR step: 0 when level ``i`` is pure noise (zero SNR)."""
    a, s = levels.alphas[i], levels.sigmas[i]
    a_next, s_next = levels.alphas[i + 1], levels.sigmas[i + 1]
    return float(a * s_next / (s * a_next))


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, levels: NoiseLevels, eta: float = 0.0,
                noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) exactly as the original DynamiCrafter runs it.

    ``x_next = alpha_next * x0 + sqrt(1 - abar_next - sigma^2) * eps + sigma * noise`` with
    ``sigma = eta * sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))``. First order;
    ``eta = 0`` is deterministic, ``eta = 1`` ancestral (DDPM-like).

    Args:
        noise_sampler: ``step -> noise`` like ``x`` for ``eta > 0``; default ``randn_like(x)``.
    """
    ac = levels.alphas_cumprod
    sigmas = ddim_sigmas(ac[:-1], ac[1:], eta)
    alphas = levels.alphas
    for i in range(len(levels)):
        pred = denoiser(x, int(levels.timesteps[i]))
        a_next, sigma = float(ac[i + 1]), float(sigmas[i])
        # Clamped: with zero terminal SNR and eta = 1 this is 0 up to rounding, and a negative
        # rounding error would turn the whole video into NaN.
        x = float(alphas[i + 1]) * pred.x0 + max(1 - a_next - sigma ** 2, 0.0) ** 0.5 * pred.eps
        if sigma > 0:
            x = x + sigma * (noise_sampler(i) if noise_sampler is not None else torch.randn_like(x))
        x, stop = _after_step(callback, i, levels, x, pred.x0)
        if stop:
            break
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, levels: NoiseLevels,
                    callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in the log-SNR, deterministic.

    ``x_next = sigma_next / sigma * x + alpha_next * (1 - exp(-h)) * D`` with
    ``D = x0 + (x0 - x0_prev) / (2 r)``, ``r = h_prev / h``. The first step, and any step next
    to a zero-SNR level (infinite ``h``), is first order, which is DDIM with ``eta = 0``.
    """
    lam = levels.log_snrs
    sigmas = levels.sigmas
    alphas = levels.alphas
    old: torch.Tensor | None = None
    h_last = float("nan")
    for i in range(len(levels)):
        pred = denoiser(x, int(levels.timesteps[i]))
        h = float(lam[i + 1] - lam[i])
        d = pred.x0
        if old is not None and 0 < h < float("inf") and 0 < h_last < float("inf"):
            d = d + (d - old) * (h / (2 * h_last))
        x = float(sigmas[i + 1] / sigmas[i]) * x + float(alphas[i + 1] * (1 - _decay(levels, i))) * d
        old, h_last = pred.x0, h
        x, stop = _after_step(callback, i, levels, x, pred.x0)
        if stop:
            break
    return x


def _unipc_rhos(h: float, ratios: list[float]) -> np.ndarray:
    """UniPC (B(h) = expm1(-h)) weights of the divided differences at log-SNR ``ratios`` (of ``h``).

    Solves ``sum_k rho_k r_k^(j-1) = b_j`` for ``j = 1..len(ratios)``; exact when the clean
    latent is a polynomial of that degree in the log-SNR.
    """
    hh = -h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1.0
    b = []
    for j in range(1, len(ratios) + 1):
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r = np.asarray(ratios, dtype=np.float64)
    matrix = np.stack([r ** (j - 1) for j in range(1, len(ratios) + 1)])
    return np.linalg.solve(matrix, np.asarray(b))


@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: torch.Tensor, levels: NoiseLevels, order: int = 2,
                 callback: Callback | None = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), B(h) = expm1(-h) variant, data prediction, multistep.

    Each step is a predictor of order ``order`` (from the last ``order`` clean-latent
    predictions) followed, once the next prediction is available, by a corrector that uses it
    too: one denoiser evaluation per step. Points at zero SNR take part only in first-order
    updates. The last step is not corrected (that would cost an extra evaluation).
    """
    if order not in (1, 2, 3):
        raise UserError(f"UniPC order must be 1, 2 or 3, got {order}.")
    lam = levels.log_snrs
    sigmas = levels.sigmas
    alphas = levels.alphas
    history: list[tuple[int, torch.Tensor]] = []  # (level, x0 prediction), most recent last
    x_prev: torch.Tensor | None = None
    for i in range(len(levels)):
        pred = denoiser(x, int(levels.timesteps[i]))
        if x_prev is not None and np.isfinite(lam[i - 1]):  # correct x_i with the new prediction
            x = _unipc_update(x_prev, i - 1, history, pred.x0, order, lam, sigmas, alphas)
        history = (history + [(i, pred.x0)])[-order:]
        x_prev = x
        x = _unipc_update(x, i, history[:-1], None, order, lam, sigmas, alphas, current=pred.x0)
        x, stop = _after_step(callback, i, levels, x, pred.x0)
        if stop:
            break
    return x


def _unipc_update(x: torch.Tensor, i: int, history: list[tuple[int, torch.Tensor]], new: torch.Tensor | None,
                  order: int, lam: np.ndarray, sigmas: np.ndarray, alphas: np.ndarray,
                  current: torch.Tensor | None = None) -> torch.Tensor:
    """One UniPC update from level ``i`` (latent ``x``) to level ``i + 1``.

    Predictor (``new`` is None): ``current`` is the prediction at level ``i``, ``history`` the
    earlier ones. Corrector: ``history[-1]`` is the prediction at level ``i`` and ``new`` the
    one at level ``i + 1``.
    """
    if current is None:
        current, history = history[-1][1], history[:-1]
    h = float(lam[i + 1] - lam[i])
    e = float(alphas[i] * sigmas[i + 1] / (sigmas[i] * alphas[i + 1]))  # exp(-h)
    base = float(sigmas[i + 1] / sigmas[i]) * x + float(alphas[i + 1] * (1 - e)) * current
    usable = [(j, d) for j, d in history if np.isfinite(lam[j])][-(order - 1):] if order > 1 else []
    if not 0 < h < float("inf") or (new is None and not usable):
        return base
    ratios = [float((lam[j] - lam[i]) / h) for j, _ in usable]
    diffs = [(d - current) / r for (_, d), r in zip(usable, ratios)]
    if new is not None:
        ratios.append(1.0)
        diffs.append(new - current)
    rhos = _unipc_rhos(h, ratios)
    correction = sum(float(rho) * d for rho, d in zip(rhos, diffs))
    return base + float(alphas[i + 1] * (1 - e)) * correction


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name: its function and how the pipeline drives it.

    Attributes:
        uses_eta: takes DDIM's ``eta`` and a noise sampler (the others are deterministic).
        keep_last_scale: the ``keep_last_scale`` of its :meth:`NoiseSchedule.levels`.
    """

    name: str
    function: Callable[..., torch.Tensor]
    description: str
    uses_eta: bool = False
    keep_last_scale: bool = False


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec for spec in (
        SamplerSpec("ddim", sample_ddim, "DDIM as the original runs it (first order; eta for stochasticity)",
                    uses_eta=True, keep_last_scale=True),
        SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "DPM-Solver++(2M): second order, deterministic, for 10-25 steps"),
        SamplerSpec("unipc", sample_unipc, "UniPC-2 (bh2) predictor-corrector, deterministic, for 5-15 steps"),
    )
}


def get_sampler(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` called ``name``; a ``ValueError`` naming the choices otherwise."""
    if name not in SAMPLERS:
        raise UserError(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


def sample(name: str, denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, num_steps: int,
           spacing: str = "uniform", eta: float = 0.0, noise_sampler: NoiseSampler | None = None,
           callback: Callback | None = None, start_step: int | None = None) -> torch.Tensor:
    """Run the sampler ``name`` for ``num_steps`` steps of ``spacing`` from the noise ``x``.

    The timesteps are :func:`ddim_timesteps` (the same for every sampler); ``eta`` and
    ``noise_sampler`` only matter to samplers that use them (DDIM). ``start_step`` ``M`` (the
    leakage-free start, :mod:`.leakage`) spreads the steps over ``[0, M)`` instead of every
    training timestep: a shorter schedule, nothing else changes. Returns a latent like ``x``.
    """
    spec = get_sampler(name)
    start = schedule.num_timesteps if start_step is None else start_step
    levels = schedule.levels(ddim_timesteps(num_steps, spacing, start), spec.keep_last_scale)
    if spec.uses_eta:
        return spec.function(denoiser, x, levels, eta=eta, noise_sampler=noise_sampler, callback=callback)
    return spec.function(denoiser, x, levels, callback=callback)
