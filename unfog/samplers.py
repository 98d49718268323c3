"""Samplers: plain functions that walk sigma space from noise to data.

Each is `sample_NAME(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x_0`,
one readable loop per algorithm, in the style of k-diffusion's `sampling.py`.
`denoiser(x, sigma) -> x0_hat` takes sigma of shape (batch,); `x` arrives as the state at σ_0
(noise of that scale, or an image plus noise for img2img); `sigmas` is 1-D, decreasing, ending
in 0. `generator` is one torch.Generator or a list with one per batch item, so each image's
noise depends on its own seed only. `callback(i, x, x0)` is called after each step with the
step index, the new state and the x_0 estimate; if it returns a tensor, that replaces the state
(inpainting uses this to re-impose known pixels).

Per-step scalars are computed in Python floats (double precision) from `sigmas.tolist()`; the
state is only ever touched by a few tensor operations per step, so a captured CUDA graph of the
denoiser (`unfog.graphs`) is all a sampler needs to run fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from greenlet import getcurrent, greenlet

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


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        # x + (x - x0)/σ·(σ' - σ), as a blend of x and x0; the step to σ' = 0 lands on x0.
        r = s[i + 1] / s[i]
        x = x0 if r == 0 else x * r + x0 * (1 - r)
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 1.0):
    """Ancestral Euler (k-diffusion's `sample_euler_ancestral`): an Euler step to σ_down,
    then fresh noise up to σ_next; η scales the fresh noise (0 is plain Euler)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        down, up = _ancestral_split(s[i], s[i + 1], eta)
        r = down / s[i]
        x = x0 if r == 0 else x * r + x0 * (1 - r)
        if up != 0:
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


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12) in sigma space, where ᾱ = 1/(1 + σ²) and the state is
    x_t/sqrt(ᾱ): x' = x0 + sqrt(1 - ᾱ' - std²)/sqrt(ᾱ')·ε + std/sqrt(ᾱ')·n with ε = (x - x0)/σ."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        a, a_next = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        std = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
        k = max(1 - a_next - std**2, 0.0) ** 0.5 / a_next**0.5 / s[i]  # the weight of ε·σ, i.e. of x - x0
        x = x0 if k == 0 else x * k + x0 * (1 - k)
        if std != 0:
            x = x + randn_like(x, generator) * (std / a_next**0.5)
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).
    With ᾱ = 1/(1+σ²), its mean and variance moved into sigma space reduce to
    x' = (σ'/σ)²·x + (1 - (σ'/σ)²)·x0 + σ'·sqrt(σ² - σ'²)/σ·n."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        r2 = (s[i + 1] / s[i]) ** 2
        x = x0 if r2 == 0 else x * r2 + x0 * (1 - r2)
        std = s[i + 1] * (s[i] ** 2 - s[i + 1] ** 2) ** 0.5 / s[i]
        if std != 0:
            x = x + randn_like(x, generator) * std
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), the multistep second-order solver in data
    prediction, in λ = -log σ; first order on the first step and on the last step to 0."""
    s = sigmas.tolist()
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        if s[i + 1] == 0:
            x = x0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            e = -math.expm1(-h)
            # D = (1 + r/2)·x0 - r/2·x0_prev with r = h/h_prev, folded into the coefficients.
            corr = 0.0 if h_prev is None else 0.5 * e * h / h_prev
            x = x * (s[i + 1] / s[i]) + x0 * (e + corr)
            if corr != 0:
                x = x + x0_prev * (-corr)
            h_prev = h
        x0_prev = x0
        x = _after_step(callback, i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, eta: float = 1.0):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, §4), with the midpoint correction: each step
    shrinks the state by an extra exp(-η·h) and re-injects that much fresh noise."""
    s = sigmas.tolist()
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(sigmas[i], x))
        if s[i + 1] == 0:
            x = x0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            e = -math.expm1(-h - eta_h)
            corr = 0.0 if h_prev is None else 0.5 * e * h / h_prev
            x = x * (s[i + 1] / s[i] * math.exp(-eta_h)) + x0 * (e + corr)
            if corr != 0:
                x = x + x0_prev * (-corr)
            if eta > 0:
                x = x + randn_like(x, generator) * (s[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5)
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
    if not isinstance(name, str) or name not in SAMPLERS:
        raise UnfogError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@dataclass
class Step:
    """One finished sampler step: its index, the new state and the x_0 estimate it came from."""

    index: int
    x: torch.Tensor
    x0: torch.Tensor


class _Stopped(Exception):
    """Raised inside a sampler's callback when the consumer of `iterate` has gone away."""


def iterate(sampler: Callable, denoiser, x, sigmas, *, callback: Callable | None = None, **kwargs) -> Iterator[Step]:
    """Run `sampler` as a generator: yield a `Step` after each of its steps and return its
    result (`final = yield from iterate(...)`), so that samplers stay plain loops and a consumer
    (progress bar, server previews, cancel) sees each step and can stop the sampler by closing
    the generator; the sampler then stops at its next step. `callback` runs before each yield
    and may replace the state, as in the samplers' own contract.

    The sampler runs in a greenlet on the consumer's own thread, not on a second thread: on a
    CPU a second thread doing torch work gets its own OpenMP team, and libgomp then throttles the
    spin-waiting of both (more threads than cores), which made a 30-step image 20 % slower on
    2 cores. Iterate it on the thread that started it."""

    def on_step(i, x_i, x0_i):
        replaced = callback(i, x_i, x0_i) if callback is not None else None
        if not worker.parent.switch(Step(i, x_i if replaced is None else replaced, x0_i)):
            raise _Stopped
        return replaced

    def run():
        try:
            return sampler(denoiser, x, sigmas, callback=on_step, **kwargs)
        except _Stopped:
            return None

    worker = greenlet(run)
    value = worker.switch()
    try:
        while not worker.dead:
            yield value
            worker.parent = getcurrent()  # whoever resumed the generator gets the next step
            value = worker.switch(True)
        return value
    finally:
        if not worker.dead:
            worker.parent = getcurrent()
            worker.switch(False)
