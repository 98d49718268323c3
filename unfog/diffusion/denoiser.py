"""The denoiser wrapper: any discrete-time ε / v / x_0 network as D(x, σ) ≈ x_0.

Sampler state lives in sigma space, x = x_0 + σ·n (Karras et al. 2022). The network was
trained on x_t = sqrt(ᾱ)·x_0 + sqrt(1-ᾱ)·ε = sqrt(ᾱ)·x, so it sees c_in·x with
c_in = sqrt(ᾱ) = 1 / sqrt(σ² + 1), at the timestep whose σ_t matches σ, and its output F
becomes D = c_skip·x + c_out·F (Karras et al. 2022, Table 1, "VP" column, per prediction type).
Training calls the network through the same `network_output` (input scaling, timestep, dtype);
its target is that relation solved for F, in the closed form of `process.target`, which stays
finite at a zero-terminal-SNR step where σ = ∞.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnfogError
from .process import PREDICTION_TYPES, loss_weight, q_sample, snr, target
from .schedules import sigmas_from_alphas_cumprod


def preconditioning(prediction_type: str, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) for a network of this prediction type at noise level σ, so that
    D(x, σ) = c_skip·x + c_out·F(c_in·x, t(σ))."""
    c_in = 1 / (sigma**2 + 1).sqrt()
    if prediction_type == "epsilon":  # x_0 = x - σ·ε
        return torch.ones_like(sigma), -sigma, c_in
    if prediction_type == "v_prediction":  # x_0 = sqrt(ᾱ)·x_t - sqrt(1-ᾱ)·v with x_t = c_in·x
        return c_in**2, -(sigma * c_in), c_in
    if prediction_type == "sample":
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
    raise UnfogError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


class DiscreteDenoiser(nn.Module):
    """Wraps `network(x_t, t, context)` trained on a discrete schedule into D(x, σ, **cond)."""

    def __init__(self, network: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise UnfogError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        self.network = network
        self.prediction_type = prediction_type
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

    def network_output(self, x_t: torch.Tensor, t: torch.Tensor, concat: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """F(x_t, t) in float32. The input is cast to the network's dtype; `concat` channels (an
        inpainting model's mask and masked image) are appended unscaled, as such models were trained."""
        if concat is not None:
            x_t = torch.cat([x_t, concat.to(x_t.dtype)], dim=1)
        net_dtype = next(self.network.parameters()).dtype
        return self.network(x_t.to(net_dtype), t, **cond).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *, round_timesteps: bool = False, **cond) -> torch.Tensor:
        """The x_0 estimate D(x, σ). `round_timesteps` calls the network at the nearest integer
        timestep instead of the interpolated one, as diffusers' DPM-Solver does with Karras
        sigmas (for parity with it)."""
        s = sigma.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in = preconditioning(self.prediction_type, s)
        t = self.sigma_to_t(sigma)
        out = self.network_output(x * c_in, t.round() if round_timesteps else t, **cond)
        return (c_skip * x.to(torch.float32) + c_out * out).to(x.dtype)

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
        # x_t = c_in·(x_0 + σ·ε), formed from ᾱ directly so that a zero-terminal-SNR step (σ = ∞) stays finite.
        x_t = q_sample(x0, t, noise, ac.to(x0.dtype))
        out = self.network_output(x_t, t, **cond)
        tgt = target(self.prediction_type, x0, noise, t, ac.to(x0.dtype))
        per_sample = ((out - tgt.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        w = loss_weight(weighting, self.prediction_type, snr(ac, t).float(), snr_gamma)
        return (w * per_sample).mean()
