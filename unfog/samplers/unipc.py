"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models"), in data prediction over λ = -log σ, as diffusers' UniPCMultistepScheduler
runs it: a multistep predictor (UniP) of order p, and after each network call a corrector (UniC)
of the previous step that reuses that call, so the corrector costs no extra evaluation."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import UnfogError
from .common import Generator, after_step, sigma_batch

VARIANTS = ("bh1", "bh2")


def _weights(h: float, ratios: list[float], order: int, variant: str, corrector: bool) -> tuple[float, float, list[float]]:
    """(h·φ₁, B(h), ρ) for one UniP or UniC step: the paper's eq. 8 system R·ρ = b over the
    ratios r_k = (λ_k - λ_s)/h of the earlier estimates (and r = 1 for this step), with
    B(h) = h (bh1) or e^h - 1 (bh2), in data prediction where h enters as -h."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = ratios + [1.0]
    rows, rhs = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:
        rho = [0.5] if order == 1 else np.linalg.solve(np.array(rows), np.array(rhs)).tolist()
    else:  # the predictor solves the system without this step's own column; order 2 has a closed form
        rho = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(np.array(rows)[:-1, :-1], np.array(rhs)[:-1]).tolist()
    return h_phi_1, b_h, rho


def _update(x: torch.Tensor, s_from: float, s_to: float, lam: list[float], est: list[torch.Tensor], order: int, variant: str,
            x0_to: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP step from σ_from to σ_to (or, given the new estimate x0_to, the UniC correction of
    that step) over the estimates `est` at log-σ `lam`, most recent last."""
    h = -math.log(s_to) - lam[-1]
    m0 = est[-1]
    ratios = [(lam[-1 - k] - lam[-1]) / h for k in range(1, order)]
    diffs = [(est[-1 - k] - m0) / r for k, r in zip(range(1, order), ratios)]
    h_phi_1, b_h, rho = _weights(h, ratios, order, variant, corrector=x0_to is not None)
    out = x * (s_to / s_from) + m0 * (-h_phi_1)
    terms = [d * w for d, w in zip(diffs, rho)]
    if x0_to is not None:
        terms.append((x0_to - m0) * rho[-1])
    if terms:
        out = out - sum(terms) * b_h
    return out


@torch.no_grad()
def sample_uni_pc(denoiser, x, sigmas, *, generator: Generator = None, callback: Callable | None = None, order: int = 2,
                  variant: str = "bh2"):
    """UniPC, multistep predictor-corrector of `order` (1-3) with the B(h) `variant` bh1 or bh2
    (Zhao et al. 2023, Alg. 1-3); lower orders while fewer estimates exist and on the final
    steps, and the last step to σ = 0 lands on the x_0 estimate."""
    if variant not in VARIANTS:
        raise UnfogError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}", "sampler_options")
    s = sigmas.tolist()
    n = len(s) - 1
    lam: list[float] = []
    est: list[torch.Tensor] = []
    x_last, last_order = None, 0
    for i in range(n):
        x0 = denoiser(x, sigma_batch(sigmas[i], x))
        if x_last is not None:  # UniC: redo the previous step with this step's estimate
            x = _update(x_last, s[i - 1], s[i], lam, est, last_order, variant, x0_to=x0)
        lam, est = (lam + [-math.log(s[i])])[-order:], (est + [x0])[-order:]
        this_order = min(order, n - i, len(est))
        x_last = x
        x = x0 if s[i + 1] == 0 else _update(x, s[i], s[i + 1], lam, est, this_order, variant)
        last_order = this_order
        x = after_step(callback, i, x, x0)
    return x
