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
SIGMA_SCHEDULES = ("leading", "trailing", "linspace", "karras", "exponential", "polyexponential", "simple", "normal", "sgm_uniform", "beta", "lcm")

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


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's polyexponential spacing: log σ follows (1 - i/(n-1))^ρ from log σ_max to
    log σ_min (ρ = 1, its default, is the exponential schedule)."""
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return (ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp()


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the regularised incomplete beta function, by the modified
    Lentz method (Press et al., Numerical Recipes, §6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return f


def beta_cdf(x: float, a: float, b: float) -> float:
    """The Beta(a, b) distribution function, the regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_continued_fraction(x, a, b) / a
    return 1.0 - front * _beta_continued_fraction(1 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile function, by bisection on `beta_cdf` to double precision."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def comfy_sigmas(schedule: str, steps: int, alphas_cumprod: torch.Tensor, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI's schedules over the model's own training sigmas (N of them, σ at timestep t):
    `simple` takes every N/steps-th one from the top; `normal` is evenly spaced timesteps from
    N-1 to 0 (σ interpolated in log σ), `sgm_uniform` the same without the last (SGM's spacing);
    `beta` spaces timesteps by the Beta(α, β) quantiles (more steps at both ends; Lee et al.
    2024), dropping repeats."""
    all_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    n = len(all_sigmas)
    if schedule == "simple":
        return all_sigmas[[n - 1 - int(k * n / steps) for k in range(steps)]]
    if schedule in ("normal", "sgm_uniform"):
        t = torch.linspace(n - 1, 0, steps + 1, dtype=torch.float64)[:-1] if schedule == "sgm_uniform" else torch.linspace(n - 1, 0, steps, dtype=torch.float64)
        return timestep_to_sigma(alphas_cumprod, t)
    ts = [round(beta_ppf(1 - k / steps, alpha, beta) * (n - 1)) for k in range(steps)]
    return all_sigmas[[t for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]]


def timestep_to_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """σ at (possibly fractional) timesteps, interpolating log σ between integer steps."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    t = t.to(torch.float64).clamp(0, len(log_sigmas) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(log_sigmas) - 1)
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


# diffusers' DPMSolverMultistepScheduler, behind these samplers, divides `leading` and
# `linspace` into steps + 1 and drops the last timestep; its DDIMScheduler, behind `ddim`, ends
# at ᾱ_0 rather than 1 unless set_alpha_to_one (the original CompVis DDIM does the same).
DIFFUSERS_N_PLUS_ONE = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "uni_pc")
# Its Euler, Heun, LMS and KDPM2 schedulers take `linspace` timesteps unrounded and interpolate σ
# linearly between training steps.
DIFFUSERS_FRACTIONAL = ("euler", "euler_ancestral", "heun", "lms", "dpm_2", "dpm_2_ancestral")
# The spacing each of those schedulers uses when a config names none (SD 1.5's does not), and the
# schedule a scheduler always uses whatever its config says (LCMScheduler's own timesteps).
DIFFUSERS_DEFAULT_SPACING = {"ddim": "leading", "ddpm": "leading", **{name: "linspace" for name in DIFFUSERS_N_PLUS_ONE + DIFFUSERS_FRACTIONAL}}
DIFFUSERS_FIXED_SCHEDULE = {"lcm": "lcm"}


def lcm_timesteps(num_timesteps: int, steps: int, original_steps: int = 50) -> torch.Tensor:
    """Latent-consistency timesteps (Luo et al. 2023, as diffusers' LCMScheduler takes them): the
    `original_steps` evenly spaced timesteps the model was distilled on, k·j - 1 for k = N/original,
    of which `steps` are picked at evenly spaced positions from the top."""
    if not 1 <= steps <= original_steps:
        raise UnfogError(f"the lcm schedule takes 1 to {original_steps} steps (the distillation's), got {steps}")
    k = num_timesteps // original_steps
    origin = torch.arange(original_steps, 0, -1, dtype=torch.float64) * k - 1
    picks = torch.floor(torch.linspace(0, original_steps, steps + 1, dtype=torch.float64)[:-1]).long()
    return origin[picks]


def make_sigmas(
    schedule: str,
    steps: int,
    alphas_cumprod: torch.Tensor,
    *,
    steps_offset: int = 0,
    rho: float = 7.0,
    diffusers_sampler: str | None = None,
    set_alpha_to_one: bool = True,
) -> torch.Tensor:
    """The sigmas a sampler walks: `steps` decreasing values followed by a final 0.

    `leading`/`trailing`/`linspace` take σ at evenly spaced training timesteps; `karras`,
    `exponential` and `polyexponential` span the model's own [σ_min, σ_max]; `simple`, `normal`,
    `sgm_uniform` and `beta` are ComfyUI's (see `comfy_sigmas`), `lcm` the latent-consistency
    timesteps (`lcm_timesteps`). With `diffusers_sampler` (a
    sampler name), the sigmas are those diffusers' scheduler for that sampler walks on this
    config where it differs: DPM-Solver's n + 1 divisions of `leading` and `linspace`, Euler's
    (and Heun's, LMS's, KDPM2's) unrounded `linspace` with σ interpolated linearly, and for
    `ddim` without `set_alpha_to_one` a last step that ends at σ(t = 0) instead of 0.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UnfogError(f"number of inference steps must be a positive integer, got {steps!r}")
    n = len(alphas_cumprod)
    if schedule in ("leading", "linspace") and diffusers_sampler in DIFFUSERS_N_PLUS_ONE:
        t = spaced_timesteps(n, steps + 1, schedule, steps_offset if schedule == "leading" else 0)[:-1]
        sigmas = timestep_to_sigma(alphas_cumprod, t)
    elif schedule == "linspace" and diffusers_sampler in DIFFUSERS_FRACTIONAL:
        t = torch.linspace(n - 1, 0, steps, dtype=torch.float64)
        table = sigmas_from_alphas_cumprod(alphas_cumprod)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        sigmas = table[lo] + (t - lo) * (table[hi] - table[lo])
    elif schedule in ("leading", "trailing", "linspace"):
        t = spaced_timesteps(n, steps, schedule, steps_offset)
        sigmas = timestep_to_sigma(alphas_cumprod, t)
    elif schedule in ("karras", "exponential"):
        all_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        lo, hi = all_sigmas.min().item(), all_sigmas.max().item()
        sigmas = karras_sigmas(steps, lo, hi, rho) if schedule == "karras" else exponential_sigmas(steps, lo, hi)
    elif schedule == "polyexponential":
        all_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        sigmas = polyexponential_sigmas(steps, all_sigmas.min().item(), all_sigmas.max().item())
    elif schedule in ("simple", "normal", "sgm_uniform", "beta"):
        sigmas = comfy_sigmas(schedule, steps, alphas_cumprod)
    elif schedule == "lcm":
        sigmas = timestep_to_sigma(alphas_cumprod, lcm_timesteps(n, steps))
    else:
        raise UnfogError(f"unknown sigma schedule {schedule!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")
    end = sigmas.new_zeros(1)
    if diffusers_sampler == "ddim" and not set_alpha_to_one:
        end = sigmas_from_alphas_cumprod(alphas_cumprod[:1]).to(sigmas)
    return torch.cat([sigmas, end]).float()
