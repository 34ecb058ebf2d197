"""Sampling, independent of the model: schedules, denoiser wrapper, guidance, samplers.

``schedule`` (noise schedules, timestep spacings, :class:`NoiseLevels`), ``denoiser`` (a model's
eps/v output to a clean-latent prediction), ``guidance`` (one- and two-scale classifier-free
guidance), ``sampling`` (DDIM, DPM-Solver++(2M), UniPC, and :func:`sampling.sample` by name),
``ddim`` (the original's DDIM tables and a sampler object).
"""
