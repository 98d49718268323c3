"""DPM-Solver++ samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models"): exponential integrators in λ = -log σ over the data
prediction D(x, σ), multistep (2M, 3M), single-step (2S, SDE) and their stochastic forms."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import UnfogError
from .common import SOLVER_TYPES, Generator, NoiseSampler, after_step, ancestral_split, noise_sampler as make_noise, randn_like, sigma_batch, to_d


def sample_dpmpp_2m(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), the multistep second-order solver in data
    prediction, in λ = -log σ; first order on the first step and on the last step to 0. It is the
    SDE variant below with η = 0 (no shrink, no noise), bit for bit."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, generator=generator, callback=callback, eta=0.0)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint", noise: str = "gaussian", noise_sampler: NoiseSampler | None = None):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, §4): each step shrinks the state by an extra
    exp(-η·h) and re-injects that much fresh noise; the second-order correction is the
    midpoint one or, with solver_type="heun", the trapezoidal one."""
    if solver_type not in SOLVER_TYPES:
        raise UnfogError(f"solver_type must be one of {', '.join(SOLVER_TYPES)}, got {solver_type!r}", "sampler_options")
    s = sigmas.tolist()
    fresh = noise_sampler or make_noise(x, sigmas, generator, noise)
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        if s[i + 1] == 0:
            x = x0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (1 + eta)
            e = -math.expm1(-h_eta)
            if h_prev is None:
                corr = 0.0
            elif solver_type == "midpoint":
                corr = 0.5 * e * h / h_prev
            else:
                corr = (1 - e / h_eta) * h / h_prev
            x = x * (s[i + 1] / s[i] * math.exp(-eta * h)) + x0 * (e + corr)
            if corr != 0:
                x = x + x0_prev * (-corr)
            if eta > 0 and s_noise != 0:
                x = x + fresh(s[i], s[i + 1]) * (s_noise * s[i + 1] * (-math.expm1(-2 * eta * h)) ** 0.5)
            h_prev = h
        x0_prev = x0
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise: str = "gaussian", noise_sampler: NoiseSampler | None = None):
    """DPM-Solver++(3M) SDE: the third-order multistep exponential integrator (Lu et al. 2022,
    App. B, with φ₂ and φ₃ of h·(1 + η)) over the last three x_0 estimates, second and first
    order while fewer exist, with the SDE's shrink-and-renoise as in (2M) SDE."""
    s = sigmas.tolist()
    fresh = noise_sampler or make_noise(x, sigmas, generator, noise)
    past: list[torch.Tensor] = []  # the last two x_0 estimates, most recent first
    steps: list[float] = []  # and the λ-steps that followed them
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        if s[i + 1] == 0:
            x = x0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (1 + eta)
            x = x * math.exp(-h_eta) + x0 * (-math.expm1(-h_eta))
            phi_2 = math.expm1(-h_eta) / h_eta + 1  # φ₂ and φ₃ of the exponential integrator at h·(1 + η)
            phi_3 = phi_2 / h_eta - 0.5
            if len(past) >= 1:
                r0 = steps[0] / h
                d1_0 = (x0 - past[0]) / r0  # first divided difference, scaled to this step
                if len(past) >= 2:
                    r1 = steps[1] / h
                    d1_1 = (past[0] - past[1]) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    x = x + d1 * phi_2 - d2 * phi_3
                else:
                    x = x + d1_0 * phi_2
            if eta > 0 and s_noise != 0:
                x = x + fresh(s[i], s[i + 1]) * (s_noise * s[i + 1] * (-math.expm1(-2 * eta * h)) ** 0.5)
            past, steps = [x0, *past][:2], [h, *steps][:2]
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None,
                              eta: float = 1.0, s_noise: float = 1.0, noise: str = "gaussian", noise_sampler: NoiseSampler | None = None):
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, single-step, midpoint r = 1/2): a
    second-order step to σ_down through the x_0 estimate at the λ-midpoint, then fresh noise up to σ_next."""
    s = sigmas.tolist()
    fresh = noise_sampler or make_noise(x, sigmas, generator, noise)
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        down, up = ancestral_split(s[i], s[i + 1], eta)
        if down == 0:
            x = x + to_d(x, s[i], x0) * (down - s[i])
        else:
            h = math.log(s[i]) - math.log(down)
            s_mid = math.exp(math.log(s[i]) - h / 2)
            x_mid = x * (s_mid / s[i]) + x0 * (-math.expm1(-h / 2))
            x0_mid = denoiser(x_mid, sigma_batch(s_mid, x))
            x = x * (down / s[i]) + x0_mid * (-math.expm1(-h))
        if up != 0:
            x = x + fresh(s[i], s[i + 1]) * (s_noise * up)
        x = after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 0.5, noise: str = "gaussian", noise_sampler: NoiseSampler | None = None):
    """DPM-Solver++ SDE, single-step (k-diffusion's `sample_dpmpp_sde`; Lu et al. 2022 with the
    ancestral noise of each sub-step): an ancestral first-order step to the intermediate
    λ + r·h, a second x_0 estimate there, then an ancestral step to σ_next with the estimates
    blended 1 - 1/(2r) : 1/(2r). Two network calls per step. The noise of the two sub-steps are
    increments of one Brownian path over [σ_mid, σ] and [σ_next, σ]; with "gaussian" noise they are
    built from two independent draws per step so that they are correlated as such increments are."""
    s = sigmas.tolist()
    fresh = noise_sampler or (None if noise == "gaussian" else make_noise(x, sigmas, generator, noise))
    for i in range(len(s) - 1):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        if s[i + 1] == 0:
            x = x + to_d(x, s[i], x0) * (s[i + 1] - s[i])
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            s_mid = math.exp(math.log(s[i]) - r * h)
            if fresh is None:
                z_mid, z_rest = randn_like(x, generator), randn_like(x, generator)
                noise_mid = z_mid
                # (at r = 1, s_mid rounds to a hair below s[i + 1]: a negative root would make the latents complex)
                noise_next = (z_mid * max(0.0, s[i] - s_mid) ** 0.5 + z_rest * max(0.0, s_mid - s[i + 1]) ** 0.5) / (s[i] - s[i + 1]) ** 0.5
            else:
                noise_mid, noise_next = fresh(s[i], s_mid), fresh(s[i], s[i + 1])
            down, up = ancestral_split(s[i], s_mid, eta)
            x_mid = x * (down / s[i]) + x0 * (1 - down / s[i])
            if up != 0:
                x_mid = x_mid + noise_mid * (s_noise * up)
            x0_mid = denoiser(x_mid, sigma_batch(s_mid, x))
            down, up = ancestral_split(s[i], s[i + 1], eta)
            blend = x0 * (1 - 1 / (2 * r)) + x0_mid * (1 / (2 * r))
            x = x * (down / s[i]) + blend * (1 - down / s[i])
            if up != 0:
                x = x + noise_next * (s_noise * up)
        x = after_step(callback, i, x, x0)
    return x
