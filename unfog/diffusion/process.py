"""The forward process q(x_t | x_0) in closed form, prediction targets, SNR and loss weights.

Notation follows Ho et al. 2020: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 - ᾱ_t)·ε. The v target is
Salimans & Ho 2022, eq. 9: v = sqrt(ᾱ_t)·ε - sqrt(1 - ᾱ_t)·x_0.
"""

from __future__ import annotations

import torch

from ..errors import UnfogError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def _expand(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars shaped to broadcast over an image batch."""
    return a.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor):
    ac = alphas_cumprod.to(like.device)[t]
    return _expand(ac.sqrt(), like), _expand((1 - ac).sqrt(), like)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Draw x_t given x_0 in closed form (Ho et al. 2020, eq. 4)."""
    a, s = _coefficients(alphas_cumprod, t, x0)
    return a * x0 + s * noise


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t)."""
    ac = alphas_cumprod[t]
    return ac / (1 - ac)


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What a network with this prediction type is trained to output."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        a, s = _coefficients(alphas_cumprod, t, x0)
        return a * noise - s * x0
    raise UnfogError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def to_x0_and_eps(prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor):
    """Recover (x_0, ε) from a network output of any prediction type and the x_t it saw."""
    a, s = _coefficients(alphas_cumprod, t, x_t)
    if prediction_type == "epsilon":
        eps = output
        x0 = (x_t - s * eps) / a
    elif prediction_type == "sample":
        x0 = output
        eps = (x_t - a * x0) / s
    elif prediction_type == "v_prediction":
        # Invert v = a·ε - s·x_0 and x_t = a·x_0 + s·ε using a² + s² = 1.
        x0 = a * x_t - s * output
        eps = s * x_t + a * output
    else:
        raise UnfogError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    return x0, eps


def loss_weight(weighting: str, prediction_type: str, snr_t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample MSE weight. `min_snr` is Hang et al. 2023: min(SNR, γ) expressed as a weight
    on the x_0 loss, converted to the loss of the given prediction type."""
    if weighting == "uniform":
        return torch.ones_like(snr_t)
    if weighting != "min_snr":
        raise UnfogError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    clipped = snr_t.clamp(max=gamma)
    if prediction_type == "epsilon":
        # min(SNR, γ) / SNR → 1 as SNR → 0 (a zero-terminal-SNR step), not 0/0.
        return torch.where(snr_t > 0, clipped / snr_t.clamp(min=1e-20), torch.ones_like(snr_t))
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    if prediction_type == "sample":
        return clipped
    raise UnfogError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
