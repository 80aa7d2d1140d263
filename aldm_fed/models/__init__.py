"""Networks: thin, validating factories over MONAI (`AutoencoderKL`, `DiffusionModelUNet`,
`ControlNet`; the evaluation's classifier and segmenter in `classifier.py`, `segmenter.py`).
Each factory takes one Hydra config group (a mapping) and raises a `ValueError` naming the
offending key."""

from __future__ import annotations

from aldm_fed.models.controlnet import (
    WeightCopyReport,
    bypass_mask_embedding,
    build_controlnet,
    controlnet_conditioning_scale,
    controlnet_downsample_factor,
    controlnet_from_unet,
    mask_embedding,
)
from aldm_fed.models.unet import build_unet, unet_arch_kwargs, unet_downsample_factor
from aldm_fed.models.vae import build_vae, vae_downsample_factor

__all__ = [
    "WeightCopyReport",
    "build_controlnet",
    "build_unet",
    "build_vae",
    "bypass_mask_embedding",
    "controlnet_conditioning_scale",
    "controlnet_downsample_factor",
    "controlnet_from_unet",
    "mask_embedding",
    "unet_arch_kwargs",
    "unet_downsample_factor",
    "vae_downsample_factor",
]
