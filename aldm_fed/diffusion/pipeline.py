"""A site's generative models as one bundle, and mask -> image generation.

The training stages build a `GenerativeModels` from their checkpoints (the shared VAE and backbone,
the site's own ControlNet); synthesis, evaluation and benchmarks take the bundle and never need to
know which checkpoint each network came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet

from aldm_fed.diffusion.conditioning import ConditioningConfig, encode_mask
from aldm_fed.diffusion.ldm import decode, sample
from aldm_fed.diffusion.schedulers import build_scheduler, default_num_steps

__all__ = ["GenerativeModels", "generate"]


@dataclass
class GenerativeModels:
    """Everything needed to turn a tumour mask into an MRI volume.

    Args:
        vae: the (shared) autoencoder.
        unet: the (shared) diffusion backbone; EMA weights when trained with EMA.
        controlnet: the site's ControlNet (or the source one); None for the backbone alone.
        scale_factor: the latent scale factor fixed once for the shared VAE (stored with it).
        scheduler_cfg: the scheduler config the backbone was trained with (plain dict).
        conditioning: how masks are encoded and guided.
        modalities: channel names of the image, in order (e.g. ["t1", "t1c", "t2", "flair"]).
        vae_downsample: spatial factor between the image and the latent grid.
        conditioning_scale: multiplier on the ControlNet residuals (`model.controlnet`'s
            `conditioning_scale`, as in training).
        provenance: where each network came from (checkpoint paths, steps, hashes), for manifests.
    """

    vae: AutoencoderKL
    unet: DiffusionModelUNet
    controlnet: ControlNet | None
    scale_factor: float
    scheduler_cfg: dict[str, Any]
    conditioning: ConditioningConfig
    modalities: list[str]
    vae_downsample: int
    conditioning_scale: float = 1.0
    provenance: dict[str, Any] = field(default_factory=dict)

    def eval(self) -> GenerativeModels:
        for net in (self.vae, self.unet, self.controlnet):
            if net is not None:
                net.eval()
        return self

    def to(self, device: torch.device | str) -> GenerativeModels:
        for net in (self.vae, self.unet, self.controlnet):
            if net is not None:
                net.to(device)
        return self


@torch.no_grad()
def generate(
    models: GenerativeModels,
    labels: torch.Tensor,
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample images for canonical label maps.

    Args:
        models: the bundle (put in eval mode by this call).
        labels: (B, D, H, W) or (B, 1, D, H, W) canonical labels 0..3 on the image grid.
        num_steps: sampling steps; None takes the scheduler config's `num_inference_steps`.
        guidance_scale: classifier-free guidance; None takes the conditioning config's.
        generator: random generator on the labels' device.
        noise: initial latent noise (B, latent_channels, D/f, H/f, W/f); drawn from `generator`
            when None. Passing it makes each sample independent of how samples are batched.
        progress: show a per-step bar.

    To sample with another scheduler of the same family (a DDPM-trained backbone with DDIM), pass
    ``dataclasses.replace(models, scheduler_cfg=...)`` with that scheduler's full config.

    Returns:
        (B, len(modalities), D, H, W) float images (the VAE's output range).
    """
    models.eval()
    scheduler = build_scheduler(models.scheduler_cfg)  # fresh per call: schedulers keep step state
    steps = int(num_steps if num_steps is not None else default_num_steps(models.scheduler_cfg))
    scale = models.conditioning.guidance_scale if guidance_scale is None else guidance_scale
    param = next(models.unet.parameters())
    mask = encode_mask(labels.to(param.device), models.conditioning.encoding, dtype=param.dtype)
    z = sample(
        models.unet,
        models.controlnet,
        scheduler,
        mask,
        num_steps=steps,
        guidance_scale=scale,
        generator=generator,
        progress=progress,
        vae_downsample=models.vae_downsample,
        conditioning_scale=models.conditioning_scale,
        noise=noise,
    )
    return decode(models.vae, z, models.scale_factor)
