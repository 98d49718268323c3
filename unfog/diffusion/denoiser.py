"""The denoiser wrapper: any discrete-time ε / v / x_0 network as D(x, σ) ≈ x_0.

Sampler state lives in sigma space, x = x_0 + σ·n (Karras et al. 2022). The network was
trained on x_t = sqrt(ᾱ)·x_0 + sqrt(1-ᾱ)·ε = sqrt(ᾱ)·x, so it sees c_in·x with
c_in = sqrt(ᾱ) = 1 / sqrt(σ² + 1), at the timestep whose σ_t matches σ.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnfogError
from .process import PREDICTION_TYPES, loss_weight, q_sample, snr, target
from .schedules import sigmas_from_alphas_cumprod


class DiscreteDenoiser(nn.Module):
    """Wraps `network(x_t, t, context)` trained on a discrete schedule into D(x, σ, **cond)."""

    def __init__(self, network: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise UnfogError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        self.network = network
        self.prediction_type = prediction_type
        # Call the network at the nearest integer timestep instead of the interpolated one, as
        # diffusers' DPM-Solver does with Karras sigmas (for parity with it; off by default).
        self.round_timesteps = False
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.register_buffer("log_sigmas", sigmas_from_alphas_cumprod(alphas_cumprod).log().float(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return self.log_sigmas[0].exp().item()

    @property
    def sigma_max(self) -> float:
        return self.log_sigmas[-1].exp().item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose σ equals `sigma`, interpolating in log σ."""
        log_sigma = sigma.float().log().to(self.log_sigmas.device)
        idx = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + w).to(sigma.device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, concat: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """x_0 estimate; `concat` channels (an inpainting model's mask and masked image) are
        appended to the scaled input unscaled, as such models were trained."""
        s = sigma.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s**2 + 1).sqrt()
        net_dtype = next(self.network.parameters()).dtype
        x_in = x * c_in if concat is None else torch.cat([x * c_in, concat.to(x.dtype)], dim=1)
        t = self.sigma_to_t(sigma)
        out = self.network(x_in.to(net_dtype), t.round() if self.round_timesteps else t, **cond).to(torch.float32)
        xf = x.to(torch.float32)
        if self.prediction_type == "epsilon":
            x0 = xf - s * out
        elif self.prediction_type == "v_prediction":
            # x_0 = sqrt(ᾱ)·x_t - sqrt(1-ᾱ)·v, rewritten with x_t = c_in·x.
            x0 = c_in**2 * xf - s * c_in * out
        else:
            x0 = out
        return x0.to(x.dtype)

    def loss(
        self,
        x0: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        weighting: str = "uniform",
        snr_gamma: float = 5.0,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        **cond,
    ) -> torch.Tensor:
        """Training loss: draw t and ε, noise x_0 by the forward process, and return the
        (SNR-weighted) mean squared error between the network output and its target."""
        n = len(self.alphas_cumprod)
        if t is None:
            t = torch.randint(0, n, (x0.shape[0],), generator=generator, device="cpu").to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
        ac = self.alphas_cumprod.to(x0.device)
        x_t = q_sample(x0, t, noise, ac.to(x0.dtype))
        out = self.network(x_t, t, **cond)
        tgt = target(self.prediction_type, x0, noise, t, ac.to(x0.dtype))
        per_sample = ((out.float() - tgt.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        w = loss_weight(weighting, self.prediction_type, snr(ac, t).float(), snr_gamma)
        return (w * per_sample).mean()
