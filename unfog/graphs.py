"""The whole denoising step as one CUDA graph, replayed once per sampler step.

A step of any linear sampler (see `unfog.samplers.run_linear`) is: batch the state for
classifier-free guidance, run the U-Net, blend the two halves, and update the state with that
step's coefficients, x' = a·x + b·x0 + c·x0_prev + d·n. With static shapes nothing in it changes
from step to step except values, so it is captured once into a CUDA graph that reads the step's
sigma and coefficients (and noise) from fixed device buffers, and each step is a few small
copies plus one replay: roughly a thousand kernel launches become one. The same object runs
the step eagerly, without capture, on a CPU (that is how the buffer logic is tested there).

Captured graphs are cached per shape by the pipeline (`Pipeline.step_graphs`); each records
how long its warm-up and capture took.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from .diffusion import classifier_free_guidance
from .samplers import Coefficients


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


class StepGraph:
    """One guided denoising step for fixed shapes, in static buffers.

    `StepGraph(denoiser, x_shape, context_shape, guided, concat_shape)` allocates the buffers on
    the denoiser's device and, on CUDA, captures the step. Per generation: `bind(context,
    uncond, scale, concat, sigmas, coefficients)` loads the conditioning and the step table;
    then calling it as `graph(i, x, noise) -> (x_next, x0)` is the step `run_linear` expects. The
    buffers make one StepGraph (and so one Pipeline with graphs on) single-threaded.
    """

    def __init__(self, denoiser: Callable, x_shape: tuple[int, ...], context_shape: tuple[int, ...], guided: bool,
                 concat_shape: tuple[int, ...] | None = None, *, context_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.device = device = torch.device(device)
        z = dict(device=device, dtype=torch.float32)
        self.denoiser = denoiser
        # `prev` is both this step's x0 output and the next step's x0_prev input.
        self.x, self.x_next, self.prev, self.noise = (torch.zeros(x_shape, **z) for _ in range(4))
        self.row = torch.zeros(5, **z)  # σ_i, a, b, c, d
        self.scale = torch.ones((), **z)
        self.context = torch.zeros(context_shape, device=device, dtype=context_dtype)
        self.uncond = torch.zeros(context_shape, device=device, dtype=context_dtype) if guided else None
        self.concat = torch.zeros(concat_shape, **z) if concat_shape is not None else None
        self.table = torch.zeros(0, 5, **z)
        self.coefficients: Coefficients = []
        self.replays = 0
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
        guided = classifier_free_guidance(self.denoiser, self.context, self.uncond, self.scale, **extra)
        x0 = guided(self.x, self.row[0].expand(self.x.shape[0]))
        a, b, c, d = self.row[1], self.row[2], self.row[3], self.row[4]
        self.x_next.copy_(a * self.x + b * x0 + c * self.prev + d * self.noise)
        self.prev.copy_(x0)

    def bind(self, context: torch.Tensor, uncond: torch.Tensor | None, scale: float, concat: torch.Tensor | None,
             sigmas: torch.Tensor, coefficients: Coefficients) -> "StepGraph":
        """Load one generation's conditioning, guidance scale and step table; reset the history."""
        self.context.copy_(context)
        if self.uncond is not None:
            self.uncond.copy_(uncond)
            self.scale.fill_(scale)
        if self.concat is not None:
            self.concat.copy_(concat)
        rows = [(s, *c) for s, c in zip(sigmas.tolist(), coefficients)]
        self.table = torch.tensor(rows, dtype=torch.float32).to(self.row.device)
        self.coefficients = coefficients
        self.prev.zero_()
        self.noise.zero_()
        return self

    def __call__(self, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i: load the state, the step's row and noise, replay (or run) the step."""
        self.x.copy_(x)
        self.row.copy_(self.table[i])
        if noise is not None:
            self.noise.copy_(noise)
        if self.graph is not None:
            with self._on_device():
                self.graph.replay()
        else:
            self._body()
        self.replays += 1
        # Copies, so that a callback may keep them while the buffers move on.
        return self.x_next.clone(), self.prev.clone()
