"""Samplers from the discrete-time view (Ho et al. 2020, Song et al. 2021, Luo et al. 2023),
written in sigma space where ᾱ = 1/(1 + σ²) and the state is x_t/sqrt(ᾱ)."""

from __future__ import annotations

from typing import Callable

import torch

from .common import Generator, NoiseSampler, after_step, noise_sampler as make_noise, randn_like, sigma_batch


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12) in sigma space, where ᾱ = 1/(1 + σ²) and the state is
    x_t/sqrt(ᾱ): x' = x0 + sqrt(1 - ᾱ' - std²)/sqrt(ᾱ')·ε + std/sqrt(ᾱ')·n with ε = (x - x0)/σ."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        a, a_next = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        std = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
        k = max(1 - a_next - std**2, 0.0) ** 0.5 / a_next**0.5 / s[i]  # the weight of ε·σ, i.e. of x - x0
        x = x0 if k == 0 else x * k + x0 * (1 - k)
        if std != 0:
            x = x + randn_like(x, generator) * (std / a_next**0.5)
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).
    With ᾱ = 1/(1+σ²), its mean and variance moved into sigma space reduce to
    x' = (σ'/σ)²·x + (1 - (σ'/σ)²)·x0 + σ'·sqrt(σ² - σ'²)/σ·n."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        r2 = (s[i + 1] / s[i]) ** 2
        x = x0 if r2 == 0 else x * r2 + x0 * (1 - r2)
        std = s[i + 1] * (s[i] ** 2 - s[i + 1] ** 2) ** 0.5 / s[i]
        if std != 0:
            x = x + randn_like(x, generator) * std
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None,
               noise: str = "gaussian", noise_sampler: NoiseSampler | None = None):
    """Latent-consistency sampling (Luo et al. 2023, Alg. 1; ComfyUI's `sample_lcm`): jump to
    the model's x_0 estimate, then noise it afresh to the next σ. For LCM models and LCM-LoRAs,
    in 2-8 steps at guidance 1-2."""
    s = sigmas.tolist()
    fresh = noise_sampler or make_noise(x, sigmas, generator, noise)
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        x = x0 if s[i + 1] == 0 else x0 + fresh(s[i], s[i + 1]) * s[i + 1]
        x = after_step(callback, i, x, x0)
    return x
