"""Stage 3: the latent diffusion backbone (UNet) and the source-domain ControlNet, trained jointly
on the cached source latents.

Per step (settings: `cfg.train.backbone`, configs/train/backbone.yaml):

1. Draw a batch of cached latents (x the scale factor) and their tumour masks.
2. `aldm_fed.diffusion.ldm.diffusion_loss`: noise at random timesteps, UNet (+ concatenated mask)
   + ControlNet residuals, regress the scheduler's target (epsilon or v from `cfg.scheduler`;
   velocity for rflow) with the tumour-weighted MSE; each sample's condition is dropped with
   `model.conditioning.drop_prob` (classifier-free guidance training).
3. AdamW step on UNet + ControlNet together; EMA of both (`ema_decay`; the sampler uses the EMA).

The ControlNet starts as a copy of the (fresh) UNet's encoder (`controlnet_from_unet`) with
zero-initialised residual outputs, so the pair starts as the UNet alone. Forward passes run under
the device's autocast (bf16 on CPUs with native bf16); the loss is computed in float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.schedulers import Scheduler
from torch import nn

from aldm_fed.checkpoints import plain_config
from aldm_fed.diffusion.conditioning import ConditioningConfig, conditioning_config, encode_mask
from aldm_fed.diffusion.ldm import diffusion_loss
from aldm_fed.diffusion.schedulers import build_scheduler
from aldm_fed.models import (
    build_controlnet,
    build_unet,
    controlnet_conditioning_scale,
    controlnet_from_unet,
    unet_downsample_factor,
)
from aldm_fed.training.artifacts import (
    StageResult,
    existing_result,
    remove_final,
    write_final,
)
from aldm_fed.training.common import (
    OptimSettings,
    device_setup,
    init_from_state,
    loop_config,
    optimizer_step,
    run_config,
    scheduler_identity,
    stage_section,
    warn_weight_copy,
)
from aldm_fed.training.device import DeviceSetup, autocast_context, make_grad_scaler, training_layout
from aldm_fed.training.latents import LatentSet
from aldm_fed.training.loop import LoopConfig, batch_indices, run_loop

__all__ = [
    "BACKBONE_DEFAULTS",
    "build_diffusion_networks",
    "diffusion_step_fn",
    "existing_result",
    "latent_downsample",
    "train_backbone",
]

log = logging.getLogger(__name__)

BACKBONE_DEFAULTS: dict[str, Any] = {}


def latent_downsample(latents: LatentSet) -> int:
    """Image side / latent side of a latent set (the VAE factor).

    Args:
        latents: latents with their image-resolution label maps.
    """
    image, latent = int(latents.segs[0].shape[-1]), int(latents.latents.shape[-1])
    if image % latent:
        raise ValueError(f"latents: image side {image} is not a multiple of the latent side {latent}")
    return image // latent


def check_latent_grid(unet_cfg: Any, latents: LatentSet) -> None:
    """The UNet halves the latent grid len(channels) - 1 times: every side must allow it.

    Args:
        unet_cfg: the `model.unet` group.
        latents: the latents to train on.
    """
    factor = unet_downsample_factor(unet_cfg)
    sides = tuple(int(s) for s in latents.latents.shape[2:])
    if any(s % factor for s in sides):
        raise ValueError(
            f"latent grid {sides} is not divisible by {factor} = 2^(len(model.unet.channels) - 1); "
            f"pick data.size / model presets that fit (e.g. experiment=tiny|demo|paper)"
        )


def diffusion_model_config(cfg: Any) -> dict[str, Any]:
    """The model settings of a diffusion run (UNet, ControlNet, conditioning), as plain dicts:
    part of the run's identity and stored with its checkpoints to rebuild the networks."""
    return {
        "unet": plain_config(cfg.model.unet),
        "controlnet": plain_config(cfg.model.controlnet),
        "conditioning": plain_config(cfg.model.conditioning),
    }


def build_diffusion_networks(
    cfg: Any, latent_channels: int, factor: int
) -> tuple[DiffusionModelUNet, ControlNet]:
    """The backbone's fresh networks: the UNet, and a ControlNet that copies its encoder.

    Seed the global torch RNG first for reproducible weights (the training stage and the
    federation server, which makes the first global weights, both do).

    Args:
        cfg: the composed config (reads `model.{unet, controlnet, conditioning}`).
        latent_channels: channels of the VAE's latents.
        factor: the VAE's per-axis downsampling (the ControlNet's mask encoder undoes it).
    """
    cond = conditioning_config(cfg.model.conditioning)
    unet = build_unet(cfg.model.unet, latent_channels, cond.unet_mask_channels)
    controlnet = build_controlnet(
        cfg.model.unet, cfg.model.controlnet, latent_channels, factor,
        mask_channels=cond.mask_channels, unet_mask_channels=cond.unet_mask_channels,
    )
    warn_weight_copy(controlnet_from_unet(controlnet, unet), log, "backbone")
    return unet, controlnet


def diffusion_final_meta(
    stage: str,
    cfg: Any,
    result: Any,
    *,
    config: Mapping[str, Any],
    latents: LatentSet,
    factor: int,
    scale_factor: float,
    sources: Mapping[str, Any] | None,
    summary: Mapping[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The metadata of a diffusion stage's `final/` checkpoint (backbone and site ControlNet):
    what `load_generative_models` needs to rebuild the networks, and what they were trained on."""
    return {
        "stage": stage,
        **extra,
        "step": result.step,
        "loop_checkpoint": result.checkpoint.name,
        "config": dict(config),
        "scale_factor": scale_factor,
        "sources": dict(sources or {}),
        "model": diffusion_model_config(cfg),
        "scheduler": plain_config(cfg.scheduler),
        "latent_channels": latents.latent_channels,
        "vae_downsample": factor,
        "data": latents.identity(),
        "train_cases": list(latents.case_ids),
        "metrics": dict(summary),
    }


def encode_masks(latents: LatentSet, encoding: str, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Each case's encoded mask: (1, C, S, S, S) uint8 0/1 on `device`, in case order, with
    exactly `encode_mask`'s values (uint8: 4x smaller than float32; a step casts only its batch).

    Args:
        latents: the cases' latents and label maps.
        encoding: `model.conditioning.encoding`.
        device: where the masks live (the training device).
    """
    # np.array copies: cached label maps may be read-only arrays, which torch warns about
    return [encode_mask(torch.from_numpy(np.array(seg))[None].to(device), encoding, dtype=torch.uint8)
            for seg in latents.segs]


def diffusion_step_fn(
    *,
    unet: DiffusionModelUNet,
    controlnet: ControlNet,
    scheduler: Scheduler,
    latents: LatentSet,
    scale_factor: float,
    cond: ConditioningConfig,
    conditioning_scale: float,
    loop: LoopConfig,
    optim: OptimSettings,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    setup: DeviceSetup,
    scaler: torch.amp.GradScaler,
    cache_masks: bool = False,
    residual_drop_prob: float = 0.0,
) -> Callable[[int, torch.Generator], dict[str, float]]:
    """The training step shared by the backbone and the ControlNet stages.

    Which networks learn is decided by `params` / `requires_grad` (the ControlNet stage freezes
    the UNet).

    Args:
        unet, controlnet: the networks.
        scheduler: a fresh scheduler (`build_scheduler`) for this run.
        latents: the cached latents and masks.
        scale_factor: multiplies the latents.
        cond: the conditioning settings (encoding, dropout, tumour weight).
        conditioning_scale: multiplier on the ControlNet residuals.
        loop: the loop settings (seed, for the batches).
        optim: batch size and gradient clipping.
        optimizer: the optimizer over `params`.
        params: the trained parameters.
        setup: device and autocast.
        scaler: from `make_grad_scaler(setup)` (active only for fp16 on CUDA).
        cache_masks: encode every case's mask once (`encode_masks`, uint8 on the device) instead
            of the batch's masks every step. Why: encoding a 64^3 label map cost ~5 ms of a
            150-180 ms CPU step (3-4 %, torch.profiler); the ControlNet stage's few cases cache
            cheaply, while a backbone's many source cases would hold C x their label maps.
        residual_drop_prob: the backbone stage's `cond.residual_drop_prob` (mask without ControlNet
            residuals); 0 for the ControlNet stage, whose only trained network is the ControlNet.
    """
    masks = encode_masks(latents, cond.encoding, setup.device) if cache_masks else None

    def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
        idx = batch_indices(loop.seed, step, len(latents), optim.batch_size)
        z0, labels = latents.batch(idx, scale_factor, setup.device)
        if masks is not None:
            mask = torch.cat([masks[i] for i in idx]).to(torch.float32)
        else:
            mask = encode_mask(labels, cond.encoding)
        with autocast_context(setup):
            loss = diffusion_loss(
                unet, controlnet, scheduler, z0, mask,
                cond_drop_prob=cond.drop_prob,
                tumour_weight=cond.tumour_weight,
                weight_pool=cond.weight_pool,
                conditioning_scale=conditioning_scale,
                generator=generator,
                residual_drop_prob=residual_drop_prob,
            )
        norm = optimizer_step(loss, optimizer, params, scaler, optim.grad_clip)
        out = {"loss": float(loss.detach())}
        if norm is not None:
            out["grad_norm"] = norm
        return out

    return step_fn


def train_backbone(
    cfg: Any,
    latents: LatentSet,
    run_dir: str | os.PathLike[str],
    *,
    scale_factor: float,
    sources: Mapping[str, Any] | None = None,
    init_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> StageResult:
    """Train (or resume, or just report) the backbone UNet + source ControlNet on `latents`.

    Args:
        cfg: the composed config (reads `model.{unet, controlnet, conditioning}`, `scheduler`,
            `train.backbone`, `device`, `seed`).
        latents: unscaled source latents and their masks (`encode_volumes`).
        run_dir: the stage directory.
        scale_factor: the latent scale factor (scale stage).
        sources: the inputs (`{"vae": ..., "scale": ...}`, `checkpoint_identity`: sha256 only);
            part of the run's identity and stored in `final/`.
        init_state: starting weights for a fresh run, ``{"unet": ..., "controlnet": ...}``
            (either may be left out; federated rounds pass the global weights).
        progress: show the progress bar.
        overwrite: discard whatever `run_dir` holds and start at step 0.
    """
    run_dir = Path(run_dir)
    if len(latents) == 0:
        raise ValueError("train_backbone: no latents to train on")
    if overwrite:
        remove_final(run_dir)

    # 1. Settings, device, seed.
    section = stage_section(cfg, "backbone", BACKBONE_DEFAULTS)
    optim = OptimSettings.from_section(section)
    loop = loop_config(section, int(cfg.seed), progress)
    setup = device_setup(cfg)
    cond = conditioning_config(cfg.model.conditioning)
    scheduler = build_scheduler(cfg.scheduler)  # fresh per run: schedulers keep step state
    check_latent_grid(cfg.model.unet, latents)
    factor = latent_downsample(latents)
    torch.manual_seed(int(cfg.seed))

    # 2. Networks: UNet, and a ControlNet copying its encoder.
    unet, controlnet = build_diffusion_networks(cfg, latents.latent_channels, factor)
    training_layout(unet, setup)
    training_layout(controlnet, setup)
    modules: dict[str, nn.Module] = {"unet": unet, "controlnet": controlnet}
    init_hash = init_from_state(modules, init_state)

    # 3. One optimizer over both networks.
    params = [*unet.parameters(), *controlnet.parameters()]
    optimizer = optim.adamw(params)
    scaler = make_grad_scaler(setup)
    step_fn = diffusion_step_fn(
        unet=unet, controlnet=controlnet, scheduler=scheduler, latents=latents,
        scale_factor=scale_factor, cond=cond,
        conditioning_scale=controlnet_conditioning_scale(cfg.model.controlnet),
        loop=loop, optim=optim, optimizer=optimizer, params=params, setup=setup, scaler=scaler,
        residual_drop_prob=cond.residual_drop_prob,
    )
    optimizers: dict[str, Any] = {"adamw": optimizer}
    if setup.use_grad_scaler:
        optimizers["scaler"] = scaler

    # 4. What identifies this run: its settings, models, and the exact latents it learns.
    config = run_config(
        cfg, "backbone", section,
        model=diffusion_model_config(cfg), scheduler=scheduler_identity(cfg.scheduler), data=latents.identity(),
        scale_factor=scale_factor, sources=dict(sources or {}), init_sha256=init_hash,
    )

    # 5. The loop.
    ema_names = ["unet", "controlnet"] if loop.ema_decay is not None else []
    result = run_loop(
        run_dir, loop, modules=modules, step_fn=step_fn, optimizers=optimizers, config=config,
        meta={"stage": "backbone", "scale_factor": scale_factor}, ema_modules=ema_names,
        overwrite=overwrite, generator_device=setup.device, setup=setup,
    )
    done = existing_result("backbone", run_dir, result, loop)
    if done is not None:
        return done

    # 6. final/: raw and EMA weights, and everything needed to rebuild and sample them.
    groups: dict[str, Any] = dict(modules)
    groups.update({f"ema.{n}": m for n, m in result.ema.items()})
    summary = dict(result.metrics)
    meta = diffusion_final_meta(
        "backbone", cfg, result, config=config, latents=latents, factor=factor,
        scale_factor=scale_factor, sources=sources, summary=summary,
    )
    path = write_final(run_dir, groups, meta,
                       {"stage": "backbone", "step": result.step, "summary": summary,
                        "scale_factor": scale_factor})
    return StageResult(stage="backbone", run_dir=run_dir, checkpoint=path, metrics=summary,
                       step=result.step, resumed_from=result.resumed_from)
