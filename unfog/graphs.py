"""The guided denoiser as one CUDA graph, replayed by any sampler.

A guided denoiser call is: batch the state for classifier-free guidance, run the U-Net, blend
the two halves. With static shapes nothing in it changes from call to call except values, so it
is captured once into a CUDA graph that reads x, σ, the conditioning and the guidance scale from
fixed device buffers; each call is then two small copies plus one replay (roughly a thousand
kernel launches become one). `DenoiserGraph` is itself a `denoiser(x, sigma) -> x0_hat`, so
every sampler, Heun and all future ones included, replays it without knowing; the sampler's few
elementwise operations run eagerly between replays. The same object runs its body eagerly,
without capture, on a CPU (that is how the buffer logic is tested there).

The pipeline caches one graph per shape (`Pipeline.denoiser_graphs`); each records how long its
warm-up and capture took and how many times it ran.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from .diffusion import classifier_free_guidance


def capture(fn: Callable[[], object], warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """Capture fn() into a CUDA graph on the current CUDA device, after `warmup` calls on a side
    stream (which also triggers any lazy initialisation and torch.compile's compilation outside
    the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class DenoiserGraph:
    """D_cfg(x, σ) for fixed shapes, from static buffers.

    `DenoiserGraph(denoiser, x_shape, cond_like, guided, concat_shape)` allocates the buffers on
    `device` (one per conditioning tensor, shaped like those of `cond_like`, a dict such as
    {"context": ..., "pooled": ..., "time_ids": ...}) and, on CUDA, captures the guided call. Per
    generation, `bind(cond, uncond, scale, concat)` returns that generation's denoiser
    `(x, sigma) -> x0` over the graph. `denoiser` is called as
    `denoiser(x, sigma, **cond, concat=...)`; bind any other
    argument (such as `round_timesteps`) before, and key the cache on it. The buffers make one
    DenoiserGraph (and so one Pipeline with graphs on) single-threaded.
    """

    def __init__(self, denoiser: Callable, x_shape: tuple[int, ...], cond_like: dict[str, torch.Tensor], guided: bool,
                 concat_shape: tuple[int, ...] | None = None, *, device: torch.device | str = "cpu"):
        self.device = device = torch.device(device)
        z = dict(device=device, dtype=torch.float32)
        self.denoiser = denoiser
        self.x, self.out = torch.zeros(x_shape, **z), torch.zeros(x_shape, **z)
        self.sigma = torch.ones(x_shape[0], **z)
        self.scale = torch.ones((), **z)
        self.cond = {k: torch.zeros(v.shape, device=device, dtype=v.dtype) for k, v in cond_like.items()}
        self.uncond = {k: torch.zeros(v.shape, device=device, dtype=v.dtype) for k, v in cond_like.items()} if guided else None
        self.concat = torch.zeros(concat_shape, **z) if concat_shape is not None else None
        self.calls = 0
        self.bound: object | None = None  # which generation's conditioning the buffers hold
        t0 = time.perf_counter()
        self.graph = None
        if device.type == "cuda":
            with self._on_device(), torch.inference_mode():
                self.graph = capture(self._body)
                torch.cuda.synchronize(device)
        self.warmup_s = time.perf_counter() - t0

    def _on_device(self):
        """Streams and graphs belong to the current CUDA device: make it this one (cuda:1 too)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _body(self) -> None:
        extra = {} if self.concat is None else {"concat": self.concat}
        guided = classifier_free_guidance(self.denoiser, self.cond, self.uncond, self.scale, **extra)
        self.out.copy_(guided(self.x, self.sigma))

    def bind(self, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None, scale: float, concat: torch.Tensor | None) -> Callable:
        """One generation's guided denoiser on this graph: loads its conditioning and guidance
        scale into the buffers, and loads them again before a call if another generation has
        bound the graph since (two generators of the same shape may be interleaved)."""
        token = object()

        def load() -> None:
            for k, v in cond.items():
                self.cond[k].copy_(v)
            if self.uncond is not None:
                for k, v in uncond.items():
                    self.uncond[k].copy_(v)
                self.scale.fill_(scale)
            if self.concat is not None:
                self.concat.copy_(concat)
            self.bound = token

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if self.bound is not token:
                load()
            return self(x, sigma)

        load()
        return denoise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided x_0 estimate: load x and σ, replay (or run) the call."""
        self.x.copy_(x)
        self.sigma.copy_(sigma)
        if self.graph is not None:
            with self._on_device():
                self.graph.replay()
        else:
            self._body()
        self.calls += 1
        return self.out.clone()  # a copy: the sampler (and callbacks) keep it while the buffer moves on
