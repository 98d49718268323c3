"""Noise schedules: beta schedules for training and sigma schedules for sampling.

A discrete-time process (Ho et al. 2020) is defined by betas; its cumulative product
alphas_cumprod (ᾱ_t) fixes q(x_t | x_0) = N(sqrt(ᾱ_t)·x_0, (1 - ᾱ_t)·I). Samplers work in sigma
space (Karras et al. 2022), x = x_0 + σ·n, with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t).
"""

from __future__ import annotations

import math

import torch

from ..errors import UnfogError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SIGMA_SCHEDULES = ("leading", "trailing", "linspace", "karras", "exponential")

# A zero-terminal-SNR schedule has ᾱ_T = 0, i.e. σ_T = ∞. Samplers need a finite start, so
# sampling clamps ᾱ to this floor (σ_max ≈ 4096), far beyond any data scale.
ALPHA_CUMPROD_FLOOR = 2.0**-24


def make_betas(
    schedule: str,
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    *,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Beta schedule as float64: `linear` (Ho et al.), `scaled_linear` (Stable Diffusion),
    `cosine` (Nichol & Dhariwal 2021, eq. 17); optionally rescaled to zero terminal SNR."""
    if num_timesteps < 2:
        raise UnfogError(f"num_timesteps must be at least 2, got {num_timesteps}")
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise UnfogError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ_t) so that ᾱ_T = 0 while ᾱ_1 is kept (Lin et al. 2023, Alg. 1)."""
    sqrt_ac = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = prod_{s <= t} (1 - β_s)."""
    return torch.cumprod(1 - betas, 0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), with ᾱ floored so that a zero-SNR end stays finite."""
    ac = alphas_cumprod.clamp(min=ALPHA_CUMPROD_FLOOR)
    return ((1 - ac) / ac).sqrt()


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str, steps_offset: int = 0) -> torch.Tensor:
    """Evenly spaced integer timesteps, decreasing, in the three spacings Stable Diffusion uses
    (Lin et al. 2023, Table 2): `leading` (SD 1.x), `trailing`, `linspace`."""
    if not 1 <= steps <= num_timesteps:
        raise UnfogError(f"number of steps must be between 1 and {num_timesteps}, got {steps}")
    if spacing == "leading":
        ratio = num_timesteps // steps
        t = torch.arange(steps, dtype=torch.float64) * ratio + steps_offset
    elif spacing == "trailing":
        ratio = num_timesteps / steps
        t = (num_timesteps - torch.arange(steps, dtype=torch.float64) * ratio).round().flip(0) - 1
    elif spacing == "linspace":
        t = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round()
    else:
        raise UnfogError(f"unknown timestep spacing {spacing!r}; choose leading, trailing or linspace")
    return t.clamp(0, num_timesteps - 1).flip(0)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log σ from σ_max down to σ_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def timestep_to_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """σ at (possibly fractional) timesteps, interpolating log σ between integer steps."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    t = t.to(torch.float64).clamp(0, len(log_sigmas) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(log_sigmas) - 1)
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def make_sigmas(
    schedule: str,
    steps: int,
    alphas_cumprod: torch.Tensor,
    *,
    steps_offset: int = 0,
    rho: float = 7.0,
) -> torch.Tensor:
    """The sigmas a sampler walks: `steps` decreasing values followed by a final 0.

    `leading`/`trailing`/`linspace` take σ at evenly spaced training timesteps; `karras` and
    `exponential` span the model's own [σ_min, σ_max].
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UnfogError(f"number of inference steps must be a positive integer, got {steps!r}")
    n = len(alphas_cumprod)
    if schedule in ("leading", "trailing", "linspace"):
        t = spaced_timesteps(n, steps, schedule, steps_offset)
        sigmas = timestep_to_sigma(alphas_cumprod, t)
    elif schedule in ("karras", "exponential"):
        all_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        lo, hi = all_sigmas.min().item(), all_sigmas.max().item()
        sigmas = karras_sigmas(steps, lo, hi, rho) if schedule == "karras" else exponential_sigmas(steps, lo, hi)
    else:
        raise UnfogError(f"unknown sigma schedule {schedule!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
