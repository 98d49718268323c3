"""What a model folder says about sampling: the noise process it was trained with
(SchedulerConfig) and the settings a generation uses when the caller gives none (SamplingDefaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UnfogError
from .process import PREDICTION_TYPES
from .schedules import SIGMA_SCHEDULES, alphas_cumprod_from_betas, make_betas


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    prediction_type: str = "epsilon"
    # How sampling spaces its sigmas by default, and SD's offset for `leading` spacing.
    sigma_schedule: str = "karras"
    steps_offset: int = 0
    # Walk the sigmas diffusers' scheduler of the same name walks on this config where they differ
    # from the common definition (on for Stable Diffusion weights; see schedules.make_sigmas), and
    # diffusers' DDIM setting of where its last step ends.
    match_diffusers: bool = False
    set_alpha_to_one: bool = True
    # False when a diffusers config names no timestep spacing: diffusers then uses the default of
    # whichever scheduler class is chosen (leading for DDIM, linspace for Euler and DPM-Solver).
    spacing_given: bool = True

    def __post_init__(self):
        n = self.num_train_timesteps
        if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= 100_000:
            raise UnfogError(f"num_train_timesteps must be an integer from 2 to 100000, got {n!r}")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
                raise UnfogError(f"{name} must be a number between 0 and 1 (exclusive), got {v!r}")
        if not isinstance(self.steps_offset, int) or isinstance(self.steps_offset, bool) or not 0 <= self.steps_offset < n:
            raise UnfogError(f"steps_offset must be an integer from 0 to num_train_timesteps - 1, got {self.steps_offset!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise UnfogError(f"unknown prediction type {self.prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise UnfogError(f"unknown sigma schedule {self.sigma_schedule!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")

    def alphas_cumprod(self) -> torch.Tensor:
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end, zero_terminal_snr=self.zero_terminal_snr)
        return alphas_cumprod_from_betas(betas)


@dataclass
class SamplingDefaults:
    """The generation settings a model ships with (model_index.json's "defaults"); every field
    of a request that the caller leaves out comes from here."""

    sampler: str = "dpmpp_2m"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int = 64
    width: int = 64

    def __post_init__(self):
        if not isinstance(self.sampler, str) or not self.sampler:
            raise UnfogError(f"default sampler must be a sampler name, got {self.sampler!r}")
        for name in ("num_inference_steps", "height", "width"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UnfogError(f"default {name} must be a positive integer, got {v!r}")
        g = self.guidance_scale
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g):
            raise UnfogError(f"default guidance_scale must be a finite number, got {g!r}")
        self.guidance_scale = float(g)

    @classmethod
    def from_dict(cls, data, source: str = "sampling defaults") -> "SamplingDefaults":
        """Defaults from a JSON object; unknown fields and wrong types name `source`."""
        if not isinstance(data, dict):
            raise UnfogError(f"{source} must be a JSON object of {', '.join(cls.__dataclass_fields__)}, got {data!r}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise UnfogError(f"{source} has unknown fields {unknown}; expected some of {list(cls.__dataclass_fields__)}")
        try:
            return cls(**data)
        except UnfogError as e:
            raise UnfogError(f"{source}: {e}") from None
