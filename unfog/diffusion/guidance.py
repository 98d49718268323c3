"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper."""

from __future__ import annotations

from typing import Callable

import torch


def classifier_free_guidance(
    denoiser: Callable[..., torch.Tensor],
    context: torch.Tensor,
    uncond_context: torch.Tensor | None,
    scale: float | torch.Tensor,
    **extra: torch.Tensor,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return D_cfg(x, σ) = D_u + scale·(D_c - D_u), computed in one batched network call.

    `uncond_context` is the empty or negative prompt. With scale 1 the unconditional half is
    skipped entirely. `scale` may be a 0-d tensor (a CUDA graph reads it from a buffer); then
    both halves always run. `extra` conditioning tensors (e.g. an inpainting model's mask channels)
    go to both halves. Blending x_0 estimates equals blending ε or v, since each is an affine
    function of the network output with the same coefficients for both halves.
    """
    if uncond_context is None or (not isinstance(scale, torch.Tensor) and scale == 1):
        return lambda x, sigma: denoiser(x, sigma, context=context, **extra)
    both = torch.cat([uncond_context, context])
    extra2 = {k: torch.cat([v, v]) for k, v in extra.items()}

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0_u, x0_c = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=both, **extra2).chunk(2)
        return x0_u + scale * (x0_c - x0_u)

    return guided
