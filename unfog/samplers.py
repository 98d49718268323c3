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


def _ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step σ → σ_next into a deterministic part to σ_down plus fresh noise of σ_up,
    with σ_down² + σ_up² = σ_next² (the variance-exploding form of an ancestral step)."""
    if sigma_next == 0:
        return sigma_next, sigma_next
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    down = (sigma_next**2 - up**2) ** 0.5
    return down, up


# ---- samplers whose step is linear in (x, x0, x0_prev, noise) ----------------------------
#
# All but Heun update the state as x' = a·x + b·D(x, σ_i) + c·D_prev + d·n with per-step
# scalars (a, b, c, d) that depend on the sigmas only. Each is written below as its table of
# coefficients, and one loop (`run_linear`) executes any of them, step by step either op by op
# (`EagerStep`) or as one captured CUDA graph per step (`unfog.graphs.StepGraph`), so the two
# cannot drift apart.

Coefficients = list[tuple[float, float, float, float]]


def euler_coefficients(sigmas: torch.Tensor) -> Coefficients:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn):
    x' = x + (x - x0)/σ·(σ' - σ)."""
    s = sigmas.tolist()
    return [(s1 / s0, 1 - s1 / s0, 0.0, 0.0) for s0, s1 in zip(s, s[1:])]


def euler_ancestral_coefficients(sigmas: torch.Tensor, eta: float = 1.0) -> Coefficients:
    """Ancestral Euler: an Euler step to σ_down, then fresh noise up to σ_next."""
    s, out = sigmas.tolist(), []
    for s0, s1 in zip(s, s[1:]):
        down, up = _ancestral_split(s0, s1, eta)
        out.append((down / s0, 1 - down / s0, 0.0, up))
    return out


def ddim_coefficients(sigmas: torch.Tensor, eta: float = 0.0) -> Coefficients:
    """DDIM (Song et al. 2021, eq. 12) in sigma space, where ᾱ = 1 / (1 + σ²) and the state is
    x_t / sqrt(ᾱ): x' = x0 + sqrt(1 - ᾱ' - std²)/sqrt(ᾱ')·ε + std/sqrt(ᾱ')·n, ε = (x - x0)/σ."""
    s, out = sigmas.tolist(), []
    for s0, s1 in zip(s, s[1:]):
        a, a_next = 1 / (1 + s0**2), 1 / (1 + s1**2)
        std = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
        k = max(1 - a_next - std**2, 0.0) ** 0.5 / a_next**0.5 / s0
        out.append((k, 1 - k, 0.0, std / a_next**0.5))
    return out


def ddpm_coefficients(sigmas: torch.Tensor) -> Coefficients:
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).
    With ᾱ = 1/(1+σ²) the posterior mean and variance, moved into sigma space, reduce to
    x' = (σ'/σ)²·x + (1 - (σ'/σ)²)·x0 + σ'·sqrt(σ² - σ'²)/σ·n: ancestral Euler with η = 1."""
    s = sigmas.tolist()
    return [((s1 / s0) ** 2, 1 - (s1 / s0) ** 2, 0.0, s1 * (s0**2 - s1**2) ** 0.5 / s0) for s0, s1 in zip(s, s[1:])]


def dpmpp_2m_coefficients(sigmas: torch.Tensor) -> Coefficients:
    """DPM-Solver++(2M), the multistep second-order solver in data prediction (Lu et al. 2022,
    Alg. 2), in λ = -log σ; first order on the first step and on the last step to 0. It is the
    SDE variant below with η = 0."""
    return dpmpp_2m_sde_coefficients(sigmas, eta=0.0)


def dpmpp_2m_sde_coefficients(sigmas: torch.Tensor, eta: float = 1.0) -> Coefficients:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, §4), the stochastic variant with the midpoint
    correction: each step shrinks the state by extra exp(-η·h) and re-injects that noise."""
    s, out, h_prev = sigmas.tolist(), [], None
    for s0, s1 in zip(s, s[1:]):
        if s1 == 0:
            out.append((0.0, 1.0, 0.0, 0.0))
            continue
        h = math.log(s0) - math.log(s1)
        eta_h = eta * h
        e = -math.expm1(-h - eta_h)
        corr = 0.0 if h_prev is None else 0.5 * e * h / h_prev
        noise = s1 * (-math.expm1(-2 * eta_h)) ** 0.5 if eta > 0 else 0.0
        out.append((s1 / s0 * math.exp(-eta_h), e + corr, -corr, noise))
        h_prev = h
    return out


class EagerStep:
    """One linear step, op by op: x' = a·x + b·D(x, σ_i) + c·D_prev + d·n (zero terms skipped)."""

    def __init__(self, denoiser: Callable, sigmas: torch.Tensor, coefficients: Coefficients):
        self.denoiser, self.sigmas, self.coefficients = denoiser, sigmas, coefficients
        self.prev: torch.Tensor | None = None

    def __call__(self, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, c, d = self.coefficients[i]
        x0 = self.denoiser(x, _sigma_batch(self.sigmas[i], x))
        out = x0 * b if a == 0 else x * a + x0 * b
        if c != 0:
            out = out + self.prev * c
        if d != 0:
            out = out + noise * d
        self.prev = x0
        return out, x0


def run_linear(step, x: torch.Tensor, *, generator: Generator = None, callback: Callable | None = None) -> torch.Tensor:
    """Run a linear sampler: `step(i, x, noise) -> (x_next, x0)` for each row of
    `step.coefficients`, drawing noise from `generator` only for the steps that inject some."""
    for i, coef in enumerate(step.coefficients):
        noise = randn_like(x, generator) if coef[3] != 0 else None
        x, x0 = step(i, x, noise)
        x = _after_step(callback, i, x, x0)
    return x


LINEAR_SAMPLERS: dict[str, Callable[..., Coefficients]] = {
    "ddpm": ddpm_coefficients,
    "ddim": ddim_coefficients,
    "euler": euler_coefficients,
    "euler_ancestral": euler_ancestral_coefficients,
    "dpmpp_2m": dpmpp_2m_coefficients,
    "dpmpp_2m_sde": dpmpp_2m_sde_coefficients,
}


def _linear_sampler(name: str) -> Callable:
    coefficients = LINEAR_SAMPLERS[name]

    @torch.no_grad()
    def sample(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, **options):
        step = EagerStep(denoiser, sigmas, coefficients(sigmas, **options))
        return run_linear(step, x, generator=generator, callback=callback)

    sample.__name__ = f"sample_{name}"
    sample.__doc__ = coefficients.__doc__
    return sample


sample_ddpm = _linear_sampler("ddpm")
sample_ddim = _linear_sampler("ddim")
sample_euler = _linear_sampler("euler")
sample_euler_ancestral = _linear_sampler("euler_ancestral")
sample_dpmpp_2m = _linear_sampler("dpmpp_2m")
sample_dpmpp_2m_sde = _linear_sampler("dpmpp_2m_sde")


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """Heun's second-order method (Karras et al. 2022, Alg. 1); Euler on the last step to 0.
    Two network calls per step, so it has no linear form and always runs eagerly."""
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
