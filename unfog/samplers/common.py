"""What every sampler shares: noise, the ODE's derivative, ancestral splits, Karras churn."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch

from ..errors import UnfogError

Generator = torch.Generator | Sequence[torch.Generator] | None
NoiseSampler = Callable[[float, float], torch.Tensor]
NOISE_KINDS = ("gaussian", "brownian")
SOLVER_TYPES = ("midpoint", "heun")
# Sampler options that take a name, and the names each accepts.
OPTION_CHOICES = {"noise": NOISE_KINDS, "solver_type": SOLVER_TYPES, "variant": ("bh1", "bh2")}
# Sampler options that take a number, and the closed range each accepts (a negative eta or
# s_churn, or r = 0, divides by zero or takes the root of a negative number; 1e308 overflows).
OPTION_RANGES = {"eta": (0.0, 10.0), "s_noise": (0.0, 10.0), "s_churn": (0.0, 1e4), "s_tmin": (0.0, float("inf")),
                 "s_tmax": (0.0, float("inf")), "r": (1e-3, 1.0), "order": (1, 4),
                 "uni_pc.order": (1, 3)}  # "sampler.option" where one sampler's range is narrower


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


class BrownianNoise:
    """Noise for the step σ → σ' as the normalised increment of a Brownian motion in σ, one
    seeded Brownian tree per image (torchsde.BrownianTree, as k-diffusion builds it): the noise of
    a step depends only on the seed and the two sigmas, so the same seed gives the same noise in
    every tool that draws it this way, whatever the step order or count."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int]):
        try:
            import torchsde
        except ImportError:
            raise UnfogError("noise='brownian' needs torchsde: pip install 'unfog[brownian]' (or pip install torchsde)") from None
        positive = sigmas[sigmas > 0]
        self.lo, self.hi = positive.min().item(), sigmas.max().item()
        self.device, self.dtype = x.device, x.dtype
        w0 = torch.zeros(x.shape[1:], dtype=torch.float32)  # on the CPU, so a seed gives the same noise on every device
        self.trees = [torchsde.BrownianTree(torch.tensor(self.lo), w0, torch.tensor(self.hi), entropy=int(s)) for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = sorted((float(sigma), float(sigma_next)))
        sign = 1.0 if float(sigma) < float(sigma_next) else -1.0
        with warnings.catch_warnings():  # torchsde warns that σ_min or σ_max lies past its interval in float32; they are its ends
            warnings.filterwarnings("ignore", message="Should have t[ab]")
            w = torch.stack([tree(torch.tensor(a), torch.tensor(b)) for tree in self.trees])
        return (w * (sign / math.sqrt(b - a))).to(self.device, self.dtype)


def noise_sampler(x: torch.Tensor, sigmas: torch.Tensor, generator: Generator, noise: str) -> NoiseSampler:
    """The noise source of a stochastic sampler: independent normals from each image's
    generator ("gaussian", the default), or increments of a Brownian tree seeded from each
    image's seed ("brownian", what k-diffusion-based tools draw for their SDE samplers)."""
    if noise == "gaussian":
        return lambda sigma, sigma_next: randn_like(x, generator)
    if noise == "brownian":
        gens = [generator] * x.shape[0] if generator is None or isinstance(generator, torch.Generator) else list(generator)
        seeds = [g.initial_seed() if g is not None else torch.seed() for g in gens]
        return BrownianNoise(x, sigmas.cpu(), seeds)
    raise UnfogError(f"unknown noise {noise!r}; choose one of: {', '.join(NOISE_KINDS)}", "sampler_options")


def after_step(callback: Callable | None, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    if callback is None:
        return x
    replaced = callback(i, x, x0)
    return x if replaced is None else replaced


def sigma_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma).to(x.device, torch.float32).expand(x.shape[0])


def to_d(x: torch.Tensor, sigma, x0: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE (Karras et al. 2022, eq. 4 with σ(t) = t)."""
    return (x - x0) / sigma


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step σ → σ_next into a deterministic part to σ_down plus fresh noise of σ_up,
    with σ_down² + σ_up² = σ_next² (the variance-exploding form of an ancestral step)."""
    if sigma_next == 0:
        return sigma_next, sigma_next
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    down = (sigma_next**2 - up**2) ** 0.5
    return down, up


def churn(x: torch.Tensor, sigma: float, steps: int, generator: Generator, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al. 2022, Alg. 2, lines 5-7: raise the noise level from σ to σ̂ = σ·(1 + γ)
    by adding fresh noise, with γ = min(S_churn/steps, √2 - 1) inside [S_tmin, S_tmax], else 0."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + randn_like(x, generator) * (s_noise * (sigma_hat**2 - sigma**2) ** 0.5), sigma_hat
