"""Diffusion math: guided-diffusion's GaussianDiffusion, respacing, losses and timestep samplers."""
from .gaussian import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    betas_for_alpha_bar,
    get_named_beta_schedule,
    mean_flat,
)
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from .respace import SpacedDiffusion, create_gaussian_diffusion, space_timesteps
from .samplers import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)

__all__ = [
    "GaussianDiffusion",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "ScheduleSampler",
    "SpacedDiffusion",
    "UniformSampler",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "create_gaussian_diffusion",
    "create_named_schedule_sampler",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
