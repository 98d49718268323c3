"""Samplers: pure functions that walk sigma space from noise to data.

Each is `sample_NAME(denoiser, x, sigmas, *, generator=None, callback=None) -> x_0`, where
`denoiser(x, sigma) -> x0_hat` takes sigma of shape (batch,), `x` arrives as the state at σ_0
(noise of that scale, or an image plus noise for img2img), and
`sigmas` is 1-D, decreasing, ending in 0. `generator` is one torch.Generator or a list with
one per batch item, so each image's noise depends on its own seed only. `callback(i, x, x0)`
is called after each step with the step index, the new state and the x_0 estimate; if it
returns a tensor, that replaces the state (inpainting uses this to re-impose known pixels).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .errors import UnfogError

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like x. With a list of generators, item k of the batch
    draws from generator k, so it does not depend on the rest of the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x)
    if len(generator) != x.shape[0]:
        raise UnfogError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per image")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
    ).to(x)


def _after_step(callback: Callable | None, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    if callback is None:
        return x
    replaced = callback(i, x, x0)
    return x if replaced is None else replaced


def _sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.device, torch.float32).expand(x.shape[0])


def _to_d(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE (Karras et al. 2022, eq. 4 with σ(t) = t)."""
    return (x - x0) / sigma


def _ancestral_split(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split a step σ → σ_next into a deterministic part to σ_down plus fresh noise of σ_up,
    with σ_down² + σ_up² = σ_next² (the variance-exploding form of an ancestral step)."""
    if sigma_next == 0:
        return sigma_next, sigma_next
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    down = (sigma_next**2 - up**2) ** 0.5
    return down, up


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        x = x + _to_d(x, sigmas[i], x0) * (sigmas[i + 1] - sigmas[i])
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 1.0):
    """Ancestral Euler: an Euler step to σ_down, then fresh noise up to σ_next."""
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        down, up = _ancestral_split(sigmas[i].item(), sigmas[i + 1].item(), eta)
        x = x + _to_d(x, sigmas[i], x0) * (down - sigmas[i])
        if up > 0:
            x = x + randn_like(x, generator) * up
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """Heun's second-order method (Karras et al. 2022, Alg. 1); Euler on the last step to 0."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, _sigma_batch(s, x))
        d = _to_d(x, s, x0)
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = _to_d(x_euler, s_next, denoiser(x_euler, _sigma_batch(s_next, x)))
            x = x + (d + d_next) / 2 * (s_next - s)
        x = _after_step(callback, i, x, x0)
    return x


def _ddim_step(x, x0, sigma, sigma_next, eta, generator):
    """One DDIM update (Song et al. 2021, eq. 12) rewritten in sigma space, where
    ᾱ = 1 / (1 + σ²) and the state is x_t / sqrt(ᾱ)."""
    a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    eps = (x - x0) / sigma
    std = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
    x_next = a_next**0.5 * x0 + max(1 - a_next - std**2, 0.0) ** 0.5 * eps
    if std > 0:
        x_next = x_next + std * randn_like(x, generator)
    return x_next / a_next**0.5


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 0.0):
    """DDIM (Song et al. 2021); η = 0 is deterministic, η = 1 recovers DDPM's posterior."""
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        x = _ddim_step(x, x0, sigmas[i].item(), sigmas[i + 1].item(), eta, generator)
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        a, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        alpha = a / a_prev
        beta = 1 - alpha
        x_t = x * a**0.5
        mean = (a_prev**0.5 * beta / (1 - a)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a)) * x_t
        var = beta * (1 - a_prev) / (1 - a)
        if var > 0:
            mean = mean + var**0.5 * randn_like(x, generator)
        x = mean / a_prev**0.5
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """DPM-Solver++(2M), the multistep second-order solver in data prediction (Lu et al. 2022,
    Alg. 2), in λ = -log σ; first order on the first step and on the last step to 0."""
    x0_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 1.0):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, §4), the stochastic variant with the midpoint
    correction: each step shrinks the state by extra exp(-η·h) and re-injects that noise."""
    x0_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * x0
            if x0_prev is not None:
                r = h_prev / h
                x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (x0 - x0_prev)
            if eta > 0:
                x = x + randn_like(x, generator) * sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5
            h_prev = h
        x0_prev = x0
        x = _after_step(callback, i, x, x0)
    return x


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}


def get_sampler(name: str) -> Callable:
    """The sampler registered under `name`; an unknown name lists the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnfogError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None
