"""The noise-process settings a model was trained with, saved beside its weights."""

from __future__ import annotations

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

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UnfogError(f"unknown prediction type {self.prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise UnfogError(f"unknown sigma schedule {self.sigma_schedule!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")

    def alphas_cumprod(self) -> torch.Tensor:
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end, zero_terminal_snr=self.zero_terminal_snr)
        return alphas_cumprod_from_betas(betas)
