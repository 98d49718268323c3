"""Samplers on the probability-flow ODE dx/dσ = (x - D(x, σ))/σ in the form of Karras et al.
2022 (and k-diffusion): Euler, Heun, DPM-Solver-2 and linear multistep, with their ancestral
variants. Churn (S_churn, S_tmin, S_tmax, S_noise) is Karras et al.'s Alg. 2 stochasticity."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .common import Generator, NoiseSampler, after_step, ancestral_split, churn, noise_sampler as make_noise, sigma_batch, to_d

INF = float("inf")


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = INF, s_noise: float = 1.0):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2; with churn > 0
    the stochastic sampler of that algorithm, first order)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, s_hat = churn(x, s[i], len(s) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoiser(x, sigma_batch(sigmas[i] if s_hat == s[i] else s_hat, x))
        # x + (x - x0)/σ̂·(σ' - σ̂), as a blend of x and x0; the step to σ' = 0 lands on x0.
        r = s[i + 1] / s_hat
        x = x0 if r == 0 else x * r + x0 * (1 - r)
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None,
                           eta: float = 1.0, s_noise: float = 1.0, noise: str = "gaussian", noise_sampler: NoiseSampler | None = None):
    """Ancestral Euler (k-diffusion's `sample_euler_ancestral`): an Euler step to σ_down,
    then fresh noise up to σ_next; η scales the fresh noise (0 is plain Euler)."""
    s = sigmas.tolist()
    fresh = noise_sampler or make_noise(x, sigmas, generator, noise)
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        down, up = ancestral_split(s[i], s[i + 1], eta)
        r = down / s[i]
        x = x0 if r == 0 else x * r + x0 * (1 - r)
        if up != 0:
            x = x + fresh(s[i], s[i + 1]) * (s_noise * up)
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = INF, s_noise: float = 1.0):
    """Heun's second-order method (Karras et al. 2022, Alg. 1, and Alg. 2 with churn); Euler
    on the last step to 0."""
    n = len(sigmas) - 1
    for i in range(n):
        x, s = churn(x, sigmas[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        s_next = sigmas[i + 1]
        x0 = denoiser(x, sigma_batch(s, x))
        d = to_d(x, s, x0)
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, s_next, denoiser(x_euler, sigma_batch(s_next, x)))
            x = x + (d + d_next) / 2 * (s_next - s)
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = INF, s_noise: float = 1.0):
    """DPM-Solver-2 as k-diffusion's `sample_dpm_2` (Lu et al. 2022, Alg. 1 in Karras et al.'s
    σ form): the derivative at the geometric midpoint of σ̂ and σ' carries the whole step."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, s_hat = churn(x, s[i], len(s) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoiser(x, sigma_batch(s_hat, x))
        d = to_d(x, s_hat, x0)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s_hat)
        else:
            s_mid = math.exp((math.log(s_hat) + math.log(s[i + 1])) / 2)
            x_mid = x + d * (s_mid - s_hat)
            x = x + to_d(x_mid, s_mid, denoiser(x_mid, sigma_batch(s_mid, x))) * (s[i + 1] - s_hat)
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None,
                           eta: float = 1.0, s_noise: float = 1.0, noise: str = "gaussian", noise_sampler: NoiseSampler | None = None):
    """Ancestral DPM-Solver-2 (k-diffusion's `sample_dpm_2_ancestral`): a DPM-2 step to
    σ_down, then fresh noise up to σ_next."""
    s = sigmas.tolist()
    fresh = noise_sampler or make_noise(x, sigmas, generator, noise)
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        down, up = ancestral_split(s[i], s[i + 1], eta)
        d = to_d(x, s[i], x0)
        if down == 0:
            x = x + d * (down - s[i])
        else:
            s_mid = math.exp((math.log(s[i]) + math.log(down)) / 2)
            x_mid = x + d * (s_mid - s[i])
            x = x + to_d(x_mid, s_mid, denoiser(x_mid, sigma_batch(s_mid, x))) * (down - s[i])
        if up != 0:
            x = x + fresh(s[i], s[i + 1]) * (s_noise * up)
        x = after_step(callback, i, x, x0)
    return x


def lms_coefficient(s: list[float], i: int, j: int, order: int) -> float:
    """Weight of the derivative from step i - j in a linear multistep step σ_i → σ_{i+1}: the
    integral over that step of the Lagrange basis polynomial through σ_i, …, σ_{i-order+1}
    that is 1 at σ_{i-j} (integrated exactly, as polynomials)."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis *= np.polynomial.Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(s[i + 1]) - antiderivative(s[i]))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, order: int = 4):
    """Linear multistep (Adams–Bashforth in σ, as k-diffusion's `sample_lms`, Karras et al.
    2022 §3): the ODE's derivative at the last `order` steps, extrapolated by the polynomial
    through them and integrated over the step."""
    s = sigmas.tolist()
    order = int(order)
    history: list[torch.Tensor] = []  # most recent first
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        history = [to_d(x, s[i], x0), *history][:order]
        for j, d in enumerate(history):
            x = x + d * lms_coefficient(s, i, j, len(history))
        x = after_step(callback, i, x, x0)
    return x
