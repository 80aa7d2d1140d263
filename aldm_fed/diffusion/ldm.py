"""The one place that composes VAE, UNet, ControlNet and scheduler: latent encode/decode, the
training loss, and the guided sampler.

Plain functions over MONAI modules (what MONAI's `ControlNetLatentDiffusionInferer` does, minus
its isinstance branches and its mask resizing):

    z0   = encode(vae, x, scale_factor)                       # posterior mean x s
    loss = diffusion_loss(unet, controlnet, scheduler, z0, mask)
    z    = sample(unet, controlnet, scheduler, mask, num_steps=20, guidance_scale=3.0)
    x    = decode(vae, z, scale_factor)                        # vae.decode(z / s)

`mask` is always the encoded mask at IMAGE resolution ((B, C, D, H, W), `conditioning.encode_mask`).
The model can be conditioned two ways, used together in ALDM:
- concatenation: the UNet was built with `mask_channels > 0`; the mask, average-pooled to the
  latent grid, is concatenated to the noisy latent (the ControlNet, if it was built with
  `unet_mask_channels`, sees the same input);
- ControlNet: its residuals are added to the UNet's skips and middle block.
Dropping the condition (training dropout, and the unconditional half of classifier-free guidance)
means: no ControlNet residuals and `NULL_MASK_VALUE` in place of the concatenated mask.

Not implemented from ALDM: the FiLM modulation from a global mask statistic (MONAI's UNet has no
hook for it short of a class embedding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet
from monai.networks.schedulers import Scheduler

from aldm_fed.diffusion.conditioning import (
    keep_condition,
    mask_to_latent_grid,
    null_condition,
    tumour_weight_map,
)
from aldm_fed.diffusion.schedulers import (
    sample_training_timesteps,
    sampling_plan,
    scheduler_step,
    training_target,
)
from aldm_fed.models.controlnet import (
    bypass_mask_embedding,
    controlnet_downsample_factor,
    mask_embedding,
)

__all__ = [
    "PreparedMask",
    "compute_scale_factor",
    "decode",
    "denoise",
    "diffusion_loss",
    "encode",
    "guided_denoise",
    "prepare_mask",
    "sample",
]


# --- first stage -------------------------------------------------------------------------------


def encode(
    vae: AutoencoderKL,
    x: torch.Tensor,
    scale_factor: float,
    *,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Image -> scaled latent `z * scale_factor` (the inverse of `decode`).

    Args:
        vae: the first stage.
        x: (B, C, D, H, W) images.
        scale_factor: latent scale (`compute_scale_factor`), stored with the diffusion checkpoint.
        sample: draw z from the posterior instead of taking its mean (MONAI's
            `encode_stage_2_inputs` always samples; the mean is the deterministic default here).
        generator: random generator for `sample=True`.
    """
    z_mu, z_sigma = vae.encode(x)
    z = z_mu
    if sample:
        eps = torch.randn(z_mu.shape, generator=generator, device=z_mu.device, dtype=z_mu.dtype)
        z = z_mu + z_sigma * eps
    return z * scale_factor


def decode(vae: AutoencoderKL, z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Scaled latent -> image: `vae.decode(z / scale_factor)` (the inverse of `encode`).

    MONAI GenerativeModels #212 divided on one side and multiplied on the other; here the scale
    is applied the same way on both, and a test checks the round trip.

    Args:
        vae: the first stage.
        z: (B, latent_channels, d, h, w) scaled latents.
        scale_factor: the factor `encode` used.
    """
    return vae.decode(z / scale_factor)


def compute_scale_factor(latents: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """1 / std of unscaled latents, so the diffusion model sees unit-variance latents.

    Args:
        latents: unscaled latents (`encode(vae, x, 1.0)`), one tensor or several batches.

    Raises:
        ValueError: no values, or a zero / non-finite std.
    """
    flat = (
        latents.detach().flatten()
        if isinstance(latents, torch.Tensor)
        else torch.cat([t.detach().flatten() for t in latents])
    )
    if flat.numel() < 2:
        raise ValueError("latents: need at least 2 values to estimate a std")
    std = float(flat.float().std())
    if not torch.isfinite(torch.tensor(std)) or std <= 0:
        raise ValueError(f"latents: std must be finite and > 0, got {std}")
    return 1.0 / std


# --- conditioning plumbing ---------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedMask:
    """The mask condition of one batch, prepared once for many denoiser calls.

    Args:
        latent_mask: (B, C, d, h, w) mask average-pooled to the latent grid, for concatenation;
            None when the UNet does not concatenate.
        controlnet_cond: the full-resolution mask, or (if `embedded`) the ControlNet's mask
            embedding of it; None without a ControlNet.
        embedded: `controlnet_cond` is a precomputed embedding (used under
            `bypass_mask_embedding`).
        controlnet_sees_mask: the ControlNet's input is the UNet's input (latent + concatenated
            mask) rather than the latent alone.
    """

    latent_mask: torch.Tensor | None
    controlnet_cond: torch.Tensor | None
    embedded: bool = False
    controlnet_sees_mask: bool = False

    @property
    def conditioned(self) -> bool:
        """Whether anything conditions the model (otherwise guidance is a no-op)."""
        return self.latent_mask is not None or self.controlnet_cond is not None


def _concat_channels(unet: DiffusionModelUNet) -> int:
    # build_unet makes in = latent + mask channels and out = latent channels.
    return int(unet.in_channels) - int(unet.out_channels)


def prepare_mask(
    unet: DiffusionModelUNet,
    controlnet: ControlNet | None,
    mask: torch.Tensor | None,
    factor: int,
    *,
    precompute_embedding: bool = False,
) -> PreparedMask:
    """Check `mask` against the networks and prepare what each of them consumes.

    Args:
        unet: the backbone (concatenates `in_channels - out_channels` mask channels).
        controlnet: the ControlNet, or None.
        mask: (B, C, D, H, W) encoded mask at image resolution; None for an unconditional model.
        factor: VAE downsampling factor per axis.
        precompute_embedding: run the ControlNet's mask encoder now (sampling: once per batch
            instead of once per step). Not for training, where the encoder learns.

    Raises:
        ValueError: the mask is missing or its shape does not fit the networks.
    """
    n_concat = _concat_channels(unet)
    if mask is None:
        if n_concat or controlnet is not None:
            raise ValueError("mask: required, the UNet concatenates a mask or a ControlNet is given")
        return PreparedMask(None, None)
    if mask.ndim != 5:
        raise ValueError(f"mask: expected (B, C, D, H, W), got shape {tuple(mask.shape)}")
    latent_mask = None
    if n_concat:
        if mask.shape[1] != n_concat:
            raise ValueError(
                f"mask: the UNet concatenates {n_concat} mask channels, got {mask.shape[1]}"
            )
        latent_mask = mask_to_latent_grid(mask, factor)
    cond = None
    sees_mask = False
    if controlnet is not None:
        cn_factor = controlnet_downsample_factor(controlnet)
        if cn_factor != factor:
            raise ValueError(
                f"controlnet: its mask encoder downsamples by {cn_factor}, the latent grid is "
                f"image / {factor}"
            )
        emb_in = controlnet.controlnet_cond_embedding.conv_in.conv.in_channels
        if mask.shape[1] != emb_in:
            raise ValueError(f"mask: the ControlNet takes {emb_in} mask channels, got {mask.shape[1]}")
        if controlnet.in_channels == unet.in_channels:
            sees_mask = n_concat > 0
        elif controlnet.in_channels != unet.out_channels:
            raise ValueError(
                f"controlnet: in_channels={controlnet.in_channels} matches neither the UNet input "
                f"({unet.in_channels}) nor the latent ({unet.out_channels})"
            )
        cond = mask_embedding(controlnet, mask) if precompute_embedding else mask
    return PreparedMask(latent_mask, cond, precompute_embedding and cond is not None, sees_mask)


def _latent_factor(mask: torch.Tensor | None, z: torch.Tensor) -> int:
    if mask is None:
        return 1
    if mask.shape[0] != z.shape[0] or mask.ndim != z.ndim:
        raise ValueError(
            f"mask {tuple(mask.shape)} and latent {tuple(z.shape)}: batch and rank must match"
        )
    ratios = {m / s for m, s in zip(mask.shape[2:], z.shape[2:])}
    if len(ratios) != 1 or not float(next(iter(ratios))).is_integer():
        raise ValueError(
            f"mask {tuple(mask.shape[2:])} is not an integer multiple of the latent grid "
            f"{tuple(z.shape[2:])} on every axis"
        )
    return int(next(iter(ratios)))


def _timesteps(t: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.reshape(1).expand(batch) if t.ndim == 0 else t


def _controlnet_residuals(
    controlnet: ControlNet,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    embedded: bool,
    scale: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    if embedded:
        with bypass_mask_embedding(controlnet):
            down, mid = controlnet(x, t, controlnet_cond=cond, conditioning_scale=scale)
    else:
        down, mid = controlnet(x, t, controlnet_cond=cond, conditioning_scale=scale)
    return list(down), mid


def denoise(
    unet: DiffusionModelUNet,
    controlnet: ControlNet | None,
    z_t: torch.Tensor,
    timesteps: torch.Tensor | int,
    prepared: PreparedMask,
    *,
    keep: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    keep_residuals: torch.Tensor | None = None,
) -> torch.Tensor:
    """One network prediction (epsilon, v or velocity), with per-sample condition dropping.

    Args:
        unet: the backbone.
        controlnet: the ControlNet or None.
        z_t: (B, latent_channels, d, h, w) noisy latents.
        timesteps: (B,) or scalar timestep.
        prepared: from `prepare_mask` for this batch.
        keep: (B,) bool, False = this sample is unconditional; None = all conditioned.
        conditioning_scale: multiplier on the ControlNet residuals.
        keep_residuals: (B,) bool, False = no ControlNet residuals for this sample (its
            concatenated mask follows `keep`); None = as `keep`.
    """
    B = z_t.shape[0]
    t = _timesteps(timesteps, B, z_t.device)
    x_in = z_t
    if prepared.latent_mask is not None:
        lm = prepared.latent_mask.to(z_t.dtype)
        if keep is not None:
            lm = torch.where(keep.view(-1, 1, 1, 1, 1), lm, null_condition(lm))
        x_in = torch.cat([z_t, lm], dim=1)
    if controlnet is None or prepared.controlnet_cond is None:
        return unet(x_in, t)
    x_cn = x_in if prepared.controlnet_sees_mask else z_t
    down, mid = _controlnet_residuals(
        controlnet, x_cn, t, prepared.controlnet_cond, prepared.embedded, conditioning_scale
    )
    keep_res = keep_residuals if keep_residuals is not None else keep
    if keep_res is not None:
        k = keep_res.view(-1, 1, 1, 1, 1).to(mid.dtype)
        down = [d * k for d in down]
        mid = mid * k
    return unet(x_in, t, down_block_additional_residuals=down, mid_block_additional_residual=mid)


def guided_denoise(
    unet: DiffusionModelUNet,
    controlnet: ControlNet | None,
    z_t: torch.Tensor,
    timesteps: torch.Tensor | int,
    prepared: PreparedMask,
    *,
    guidance_scale: float | None,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """Classifier-free guided prediction: uncond + s (cond - uncond).

    The conditional and unconditional passes run as one batch of 2B through the UNet; the
    ControlNet runs only on the conditional half (the unconditional half gets zero residuals and
    the null concatenated mask).

    Args:
        unet, controlnet, z_t, timesteps, prepared, conditioning_scale: as `denoise`.
        guidance_scale: s; None = conditional prediction only (one pass, no guidance).
            s = 1 equals the conditional prediction, s = 0 the unconditional one.
    """
    if guidance_scale is None or not prepared.conditioned:
        return denoise(unet, controlnet, z_t, timesteps, prepared, conditioning_scale=conditioning_scale)
    B = z_t.shape[0]
    t = _timesteps(timesteps, B, z_t.device)
    x_cond = x_uncond = z_t
    if prepared.latent_mask is not None:
        lm = prepared.latent_mask.to(z_t.dtype)
        x_cond = torch.cat([z_t, lm], dim=1)
        x_uncond = torch.cat([z_t, null_condition(lm)], dim=1)
    down2: list[torch.Tensor] | None = None
    mid2: torch.Tensor | None = None
    if controlnet is not None and prepared.controlnet_cond is not None:
        x_cn = x_cond if prepared.controlnet_sees_mask else z_t
        down, mid = _controlnet_residuals(
            controlnet, x_cn, t, prepared.controlnet_cond, prepared.embedded, conditioning_scale
        )
        down2 = [torch.cat([d, torch.zeros_like(d)]) for d in down]
        mid2 = torch.cat([mid, torch.zeros_like(mid)])
    out = unet(
        torch.cat([x_cond, x_uncond]),
        torch.cat([t, t]),
        down_block_additional_residuals=down2,
        mid_block_additional_residual=mid2,
    )
    # In fp32: under bf16 autocast the two predictions carry ~0.4 % rounding error, which the
    # difference (cond - uncond) times the guidance scale would amplify.
    cond, uncond = out.to(torch.promote_types(out.dtype, torch.float32)).chunk(2)
    return uncond + guidance_scale * (cond - uncond)


# --- training ----------------------------------------------------------------------------------


def diffusion_loss(
    unet: DiffusionModelUNet,
    controlnet: ControlNet | None,
    scheduler: Scheduler,
    z0: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    cond_drop_prob: float = 0.1,
    tumour_weight: float = 2.0,
    weight_pool: str = "max",
    conditioning_scale: float = 1.0,
    generator: torch.Generator | None = None,
    residual_drop_prob: float = 0.0,
) -> torch.Tensor:
    """The diffusion training loss of one batch (a scalar to `.backward()`).

    Noise z0 at random timesteps, predict with the UNet (+ ControlNet residuals, + concatenated
    mask), and regress the scheduler's target (DDPM/DDIM: epsilon or v; RFlow: velocity z0 -
    noise) with a tumour-weighted MSE: mean(w * (pred - target)^2), w = `tumour_weight` on latent
    voxels covering tumour, else 1. Which networks learn is the caller's choice (freeze the UNet
    for ControlNet training).

    Args:
        unet: the backbone.
        controlnet: the ControlNet or None.
        scheduler: from `build_scheduler`.
        z0: (B, latent_channels, d, h, w) scaled clean latents (`encode`).
        mask: (B, C, D, H, W) encoded mask at image resolution; None for an unconditional model.
        cond_drop_prob: probability of training a sample unconditionally (ALDM 0.1).
        tumour_weight: loss weight of tumour latent voxels (ALDM 2.0).
        weight_pool: `max` or `avg` pooling of the tumour to the latent grid.
        conditioning_scale: multiplier on the ControlNet residuals.
        generator: random generator on z0's device for noise, timesteps and dropout.
        residual_drop_prob: probability that a conditioned sample keeps its concatenated mask but
            loses the ControlNet residuals (`ConditioningConfig.residual_drop_prob`).
    """
    factor = _latent_factor(mask, z0)
    prepared = prepare_mask(unet, controlnet, mask, factor)
    B = z0.shape[0]
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    t = sample_training_timesteps(scheduler, z0, generator)
    z_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
    keep = keep_condition(B, cond_drop_prob, device=z0.device, generator=generator)
    keep_res = None
    if residual_drop_prob > 0.0:  # drawn only then: a run without it keeps its random stream
        keep_res = keep & keep_condition(B, residual_drop_prob, device=z0.device, generator=generator)
    pred = denoise(unet, controlnet, z_t, t, prepared, keep=keep, conditioning_scale=conditioning_scale,
                   keep_residuals=keep_res)
    target = training_target(scheduler, z0, noise, t)
    # float32 loss also under bf16 autocast
    err = (pred.float() - target.float()) ** 2
    if mask is not None and tumour_weight != 1.0:
        err = err * tumour_weight_map(mask, factor, tumour_weight, weight_pool)
    return err.mean()


# --- sampling ----------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    unet: DiffusionModelUNet,
    controlnet: ControlNet | None,
    scheduler: Scheduler,
    mask: torch.Tensor | None,
    *,
    num_steps: int,
    guidance_scale: float | None = 3.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    vae_downsample: int | None = None,
    conditioning_scale: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate scaled latents for the masks in `mask` (decode them with `decode`).

    DDPM uses all T steps; DDIM (`ConsistentDDIMScheduler`) and RFlow (Euler) take 10-50. The
    ControlNet's mask encoder runs once per call, not once per step (`bypass_mask_embedding`).
    Put the networks in eval mode first.

    Args:
        unet: the backbone.
        controlnet: the ControlNet or None.
        scheduler: from `build_scheduler` (its timesteps are reset).
        mask: (B, C, D, H, W) encoded mask at image resolution; None for an unconditional model
            (then `noise` gives the latent shape).
        num_steps: sampling steps.
        guidance_scale: classifier-free guidance scale (ALDM 3.0); None = conditional only.
        generator: random generator on the mask's device (initial noise, DDPM noise).
        progress: show a tqdm bar.
        vae_downsample: VAE factor; optional with a ControlNet (read from its mask encoder).
        conditioning_scale: multiplier on the ControlNet residuals.
        noise: initial latent noise (B, latent_channels, d, h, w); drawn from `generator` if None.

    Returns:
        (B, latent_channels, D / f, H / f, W / f) scaled latents.
    """
    factor = vae_downsample
    if controlnet is not None:
        cn_factor = controlnet_downsample_factor(controlnet)
        if factor is not None and factor != cn_factor:
            raise ValueError(
                f"vae_downsample={factor} but the ControlNet's mask encoder downsamples by {cn_factor}"
            )
        factor = cn_factor
    if noise is None:
        if mask is None:
            raise ValueError("mask or noise is required to know the latent shape")
        if factor is None:
            raise ValueError("vae_downsample is required without a ControlNet")
        if any(s % factor for s in mask.shape[2:]):
            raise ValueError(f"mask sides {tuple(mask.shape[2:])} are not divisible by {factor}")
        shape = (mask.shape[0], int(unet.out_channels), *(s // factor for s in mask.shape[2:]))
        noise = torch.randn(shape, generator=generator, device=mask.device, dtype=mask.dtype)
    elif mask is not None:
        inferred = _latent_factor(mask, noise)
        if factor is not None and inferred != factor:
            raise ValueError(f"noise grid {tuple(noise.shape[2:])} is not the mask grid / {factor}")
        factor = inferred
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    prepared = prepare_mask(unet, controlnet, mask, factor or 1, precompute_embedding=True)
    plan = sampling_plan(scheduler, num_steps, tuple(x.shape[2:]))
    steps = zip(plan.timesteps.tolist(), plan.next_timesteps.tolist())
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=len(plan), desc="sampling", leave=False)
    for t, t_next in steps:
        out = guided_denoise(
            unet,
            controlnet,
            x,
            torch.tensor(t, device=x.device),
            prepared,
            guidance_scale=guidance_scale,
            conditioning_scale=conditioning_scale,
        )
        x = scheduler_step(scheduler, out.to(x.dtype), t, t_next, x, generator=generator)
    return x
