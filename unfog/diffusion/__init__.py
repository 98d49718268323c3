"""The math of the diffusion process: schedules, forward process, targets, denoiser, guidance."""

from .config import SamplingDefaults, SchedulerConfig
from .denoiser import DiscreteDenoiser, preconditioning
from .guidance import classifier_free_guidance
from .process import LOSS_WEIGHTINGS, PREDICTION_TYPES, loss_weight, q_sample, snr, target, to_x0_and_eps
from .schedules import (
    BETA_SCHEDULES,
    SIGMA_SCHEDULES,
    alphas_cumprod_from_betas,
    exponential_sigmas,
    karras_sigmas,
    make_betas,
    make_sigmas,
    rescale_zero_terminal_snr,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    timestep_to_sigma,
)

__all__ = [
    "BETA_SCHEDULES", "SIGMA_SCHEDULES", "PREDICTION_TYPES", "LOSS_WEIGHTINGS",
    "SchedulerConfig", "SamplingDefaults", "DiscreteDenoiser", "preconditioning", "classifier_free_guidance",
    "make_betas", "rescale_zero_terminal_snr", "alphas_cumprod_from_betas", "sigmas_from_alphas_cumprod",
    "spaced_timesteps", "karras_sigmas", "exponential_sigmas", "timestep_to_sigma", "make_sigmas",
    "q_sample", "snr", "target", "to_x0_and_eps", "loss_weight",
]
