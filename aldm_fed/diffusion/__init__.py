"""Diffusion in the VAE latent: schedulers, the tumour-mask condition, and the composition of
networks + scheduler for the training loss and for sampling (`ldm`)."""

from __future__ import annotations

from aldm_fed.diffusion.conditioning import (
    NULL_MASK_VALUE,
    ConditioningConfig,
    conditioning_config,
    decode_mask,
    encode_mask,
    keep_condition,
    mask_channels,
    mask_to_latent_grid,
    tumour_weight_map,
)
from aldm_fed.diffusion.ldm import (
    PreparedMask,
    compute_scale_factor,
    decode,
    denoise,
    diffusion_loss,
    encode,
    guided_denoise,
    prepare_mask,
    sample,
)
from aldm_fed.diffusion.schedulers import (
    ConsistentDDIMScheduler,
    SamplingPlan,
    build_scheduler,
    default_num_steps,
    predicted_clean,
    sample_training_timesteps,
    sampling_plan,
    scheduler_step,
    training_target,
)

__all__ = [
    "NULL_MASK_VALUE",
    "ConditioningConfig",
    "ConsistentDDIMScheduler",
    "PreparedMask",
    "SamplingPlan",
    "build_scheduler",
    "compute_scale_factor",
    "conditioning_config",
    "decode",
    "decode_mask",
    "default_num_steps",
    "denoise",
    "diffusion_loss",
    "encode",
    "encode_mask",
    "guided_denoise",
    "keep_condition",
    "mask_channels",
    "mask_to_latent_grid",
    "predicted_clean",
    "prepare_mask",
    "sample",
    "sample_training_timesteps",
    "sampling_plan",
    "scheduler_step",
    "training_target",
    "tumour_weight_map",
]
