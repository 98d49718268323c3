"""Samplers: plain functions that walk sigma space from noise to data.

Each is `sample_NAME(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x_0`,
one readable loop per algorithm, named as k-diffusion and ComfyUI name them.
`denoiser(x, sigma) -> x0_hat` takes sigma of shape (batch,); `x` arrives as the state at σ_0
(noise of that scale, or an image plus noise for img2img); `sigmas` is 1-D, decreasing, ending
in 0. `generator` is one torch.Generator or a list with one per batch item, so each image's
noise depends on its own seed only. `callback(i, x, x0)` is called after each step with the
step index, the new state and the x_0 estimate; if it returns a tensor, that replaces the state
(inpainting uses this to re-impose known pixels). Stochastic samplers also take `noise`
("gaussian": independent normals from the generators; "brownian": a seeded Brownian tree, as
k-diffusion-based tools draw) or a `noise_sampler(sigma, sigma_next) -> tensor`.

Per-step scalars are computed in Python floats (double precision) from `sigmas.tolist()`; the
state is only ever touched by a few tensor operations per step, so a captured CUDA graph of the
denoiser (`unfog.graphs`) is all a sampler needs to run fast.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from greenlet import error as GreenletError
from greenlet import getcurrent, greenlet

from ..errors import UnfogError
from .common import NOISE_KINDS, OPTION_CHOICES, OPTION_RANGES, BrownianNoise, noise_sampler, randn_like
from .discrete import sample_ddim, sample_ddpm, sample_lcm
from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde
from .unipc import sample_uni_pc
from .karras import sample_dpm_2, sample_dpm_2_ancestral, sample_euler, sample_euler_ancestral, sample_heun, sample_lms

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "uni_pc": sample_uni_pc,
    "lcm": sample_lcm,
}
# Network calls per step (the last step to σ = 0 may take fewer): what a step costs.
CALLS_PER_STEP = {name: 2 if name in ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde") else 1 for name in SAMPLERS}


def get_sampler(name: str) -> Callable:
    """The sampler registered under `name`; an unknown name lists the valid ones."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise UnfogError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}", "sampler")
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
    (progress bar, server previews, cancel) sees each step; closing the generator stops the
    sampler where it is, with no further network call. `callback` runs before each yield and may
    replace the state, as in the samplers' own contract.

    The sampler runs in a greenlet on the consumer's own thread, not on a second thread: on a
    CPU a second thread doing torch work gets its own OpenMP team, and libgomp then throttles the
    spin-waiting of both (more threads than cores): on 2 cores a fresh thread per image made the
    bundled model's image about 15 % slower (`python bench/sampler_thread.py`). So the generator must be resumed on the thread that started it. Each side keeps
    its own grad mode across the switches, and the sampler sees the caller's context variables."""
    thread = threading.get_ident()

    def switch_to(target, value):
        grad = torch.is_grad_enabled()  # thread-local: each side gets its own back
        try:
            return target.switch(value)
        finally:
            torch.set_grad_enabled(grad)

    def on_step(i, x_i, x0_i):
        replaced = callback(i, x_i, x0_i) if callback is not None else None
        if not switch_to(worker.parent, Step(i, x_i if replaced is None else replaced, x0_i)):
            raise _Stopped
        return replaced

    def run(_=None):
        try:
            return sampler(denoiser, x, sigmas, callback=on_step, **kwargs)
        except _Stopped:
            return None

    def resume(value):
        if threading.get_ident() != thread:
            raise UnfogError("a denoising generator must be resumed on the thread that started it (its sampler runs in a greenlet there)")
        worker.parent = getcurrent()  # whoever resumed the generator gets the next step
        return switch_to(worker, value)

    worker = greenlet(run)
    worker.gr_context = contextvars.copy_context()
    value = resume(None)
    try:
        while not worker.dead:
            yield value
            value = resume(True)
        return value
    finally:
        if not worker.dead and threading.get_ident() == thread:
            try:
                resume(False)
            except (RuntimeError, GreenletError):  # the greenlet is already being collected with the generator
                pass


__all__ = ["SAMPLERS", "CALLS_PER_STEP", "NOISE_KINDS", "OPTION_CHOICES", "OPTION_RANGES", "BrownianNoise", "Step", "get_sampler", "iterate", "noise_sampler", "randn_like",
           *(f.__name__ for f in SAMPLERS.values())]
