"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

Conditioning = torch.Tensor | Mapping[str, torch.Tensor]


def as_conditioning(cond: Conditioning) -> dict[str, torch.Tensor]:
    """Conditioning as the denoiser's keyword arguments: a tensor is the text context; a mapping
    may add more (SDXL: `pooled` and `time_ids`)."""
    return {"context": cond} if isinstance(cond, torch.Tensor) else dict(cond)


def classifier_free_guidance(
    denoiser: Callable[..., torch.Tensor],
    cond: Conditioning,
    uncond: Conditioning | None,
    scale: float | torch.Tensor,
    **extra: torch.Tensor,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return D_cfg(x, σ) = D_u + scale·(D_c - D_u), computed in one batched network call.

    `cond` and `uncond` are the prompt's and the empty or negative prompt's conditioning (a text
    context tensor, or a dict of the denoiser's conditioning keywords). Without `uncond` only the
    conditional half runs, at any scale. `scale` may be a 0-d tensor (a CUDA graph reads it from a
    buffer). `extra` conditioning tensors (e.g. an inpainting model's mask channels) go to both
    halves. Blending x_0 estimates equals blending ε or v, since each is an affine function of the
    network output with the same coefficients for both halves.
    """
    cond = as_conditioning(cond)
    if uncond is None:
        return lambda x, sigma: denoiser(x, sigma, **cond, **extra)
    uncond = as_conditioning(uncond)
    if set(uncond) != set(cond):
        raise ValueError(f"conditional and unconditional halves carry different conditioning: {sorted(cond)} and {sorted(uncond)}")
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    both.update({k: torch.cat([v, v]) for k, v in extra.items()})

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0_u, x0_c = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return x0_u + scale * (x0_c - x0_u)

    return guided
