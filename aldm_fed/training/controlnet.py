"""Stage 4: few-shot site adaptation of a ControlNet, with the backbone frozen.

The site's ControlNet starts from the source ControlNet (trained with the backbone) or from the
backbone UNet's encoder (`init` in `cfg.train.controlnet`), and is fine-tuned on the site's K target
latents + masks with the same loss as the backbone stage (`diffusion_step_fn`). The UNet is frozen:
`requires_grad_(False)`, eval mode, not in the optimizer and not checkpointed by this stage, so
its weights stay bit-identical (tested). Only the ControlNet (and its EMA) is saved, which is also
what a federated site keeps to itself.
"""

from __future__ import annotations

import dataclasses

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from aldm_fed.diffusion.conditioning import conditioning_config
from aldm_fed.diffusion.schedulers import build_scheduler
from aldm_fed.models import build_controlnet, controlnet_conditioning_scale, controlnet_from_unet
from aldm_fed.models._cfg import get_str
from aldm_fed.training.artifacts import StageResult, existing_result, remove_final, write_final
from aldm_fed.training.backbone import (
    check_latent_grid,
    diffusion_final_meta,
    diffusion_model_config,
    diffusion_step_fn,
    latent_downsample,
)
from aldm_fed.training.common import (
    OptimSettings,
    device_setup,
    init_from_state,
    loop_config,
    run_config,
    scheduler_identity,
    stage_section,
    warn_weight_copy,
)
from aldm_fed.training.device import make_grad_scaler, training_layout
from aldm_fed.training.latents import LatentSet
from aldm_fed.training.loop import run_loop

__all__ = ["CONTROLNET_DEFAULTS", "INIT_CHOICES", "controlnet_section", "train_controlnet"]

log = logging.getLogger(__name__)

INIT_CHOICES = ("source", "unet")
CONTROLNET_DEFAULTS: dict[str, Any] = {"init": "source", "backbone_weights": "ema"}


def controlnet_section(cfg: Any) -> dict[str, Any]:
    """`cfg.train.controlnet`, checked, with defaults filled in.

    Args:
        cfg: the composed config.
    """
    s = stage_section(cfg, "controlnet", CONTROLNET_DEFAULTS)
    get_str(s, "init", "train.controlnet", INIT_CHOICES)
    get_str(s, "backbone_weights", "train.controlnet", ("ema", "raw"))
    return s


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the module is used, never trained.

    Args:
        module: e.g. the backbone UNet.
    """
    module.eval()
    module.requires_grad_(False)
    return module


def train_controlnet(
    cfg: Any,
    latents: LatentSet,
    run_dir: str | os.PathLike[str],
    *,
    unet: DiffusionModelUNet,
    scale_factor: float,
    init_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    init_kind: str | None = None,
    sources: Mapping[str, Any] | None = None,
    site: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> StageResult:
    """Fine-tune a site's ControlNet on its K target latents against a frozen backbone.

    Args:
        cfg: the composed config (reads `model.{unet, controlnet, conditioning}`, `scheduler` --
            which must be those the backbone was trained with --, `train.controlnet`, `device`,
            `seed`).
        latents: the site's target latents and masks.
        run_dir: the stage directory (`runs/<name>/sites/<site>/controlnet`).
        unet: the trained backbone, weights loaded; it is frozen here (eval, no gradients) and
            moved to the run's device.
        scale_factor: the latent scale factor the backbone was trained with.
        init_state: the ControlNet's starting weights, ``{"controlnet": state}`` (the source
            ControlNet, or a federated round's global one); None = copy the UNet's encoder.
        init_kind: what `init_state` is, for the record (e.g. "source", "global"); default
            "given" (or "unet" without `init_state`).
        sources: provenance of the inputs (`{"vae": ..., "backbone": ...}`); part of the run's
            identity and stored in `final/`.
        site: the site name (recorded).
        progress: show the progress bar.
        overwrite: discard whatever `run_dir` holds and start at step 0.
    """
    run_dir = Path(run_dir)
    if len(latents) == 0:
        raise ValueError(f"train_controlnet: site {site} has no target latents")
    if overwrite:
        remove_final(run_dir)

    # 1. Settings, device, seed.
    section = controlnet_section(cfg)
    optim = OptimSettings.from_section(section)
    loop = loop_config(section, int(cfg.seed), progress)
    setup = device_setup(cfg)
    cond = conditioning_config(cfg.model.conditioning)
    scheduler = build_scheduler(cfg.scheduler)
    check_latent_grid(cfg.model.unet, latents)
    factor = latent_downsample(latents)
    torch.manual_seed(int(cfg.seed))

    # 2. The frozen backbone and the trainable ControlNet.
    training_layout(freeze(unet), setup)
    controlnet = build_controlnet(
        cfg.model.unet, cfg.model.controlnet, latents.latent_channels, factor,
        mask_channels=cond.mask_channels, unet_mask_channels=cond.unet_mask_channels,
    )
    init_kind = (init_kind or "given") if init_state else "unet"
    if not init_state:
        # the backbone's encoder, zero residual outputs
        warn_weight_copy(controlnet_from_unet(controlnet, unet), log, f"controlnet ({site})")
    init_hash = init_from_state({"controlnet": controlnet}, init_state)
    training_layout(controlnet, setup)
    modules: dict[str, nn.Module] = {"controlnet": controlnet}

    # 3. Only the ControlNet's parameters are optimised.
    params = list(controlnet.parameters())
    optimizer = optim.adamw(params)
    scaler = make_grad_scaler(setup)
    # No condition dropout here: a dropped sample reaches only the frozen backbone (the guidance
    # branch it already learned), so it would be a step with zero gradient.
    step_fn = diffusion_step_fn(
        unet=unet, controlnet=controlnet, scheduler=scheduler, latents=latents,
        scale_factor=scale_factor, cond=dataclasses.replace(cond, drop_prob=0.0),
        conditioning_scale=controlnet_conditioning_scale(cfg.model.controlnet),
        loop=loop, optim=optim, optimizer=optimizer, params=params, setup=setup, scaler=scaler,
        cache_masks=True,  # K cases, ~800 steps: encode each mask once (diffusion_step_fn)
    )
    optimizers: dict[str, Any] = {"adamw": optimizer}
    if setup.use_grad_scaler:
        optimizers["scaler"] = scaler

    # 4. Identity: settings, models, the backbone and starting weights, the exact latents.
    config = run_config(
        cfg, "controlnet", section,
        site=site, model=diffusion_model_config(cfg), scheduler=scheduler_identity(cfg.scheduler), data=latents.identity(),
        scale_factor=scale_factor, sources=dict(sources or {}),
        init={"kind": init_kind, "sha256": init_hash},
    )

    # 5. The loop.
    result = run_loop(
        run_dir, loop, modules=modules, step_fn=step_fn, optimizers=optimizers, config=config,
        meta={"stage": "controlnet", "site": site, "scale_factor": scale_factor},
        ema_modules=["controlnet"] if loop.ema_decay is not None else [],
        overwrite=overwrite, generator_device=setup.device, setup=setup,
    )
    done = existing_result("controlnet", run_dir, result, loop, site=site)
    if done is not None:
        return done

    # 6. final/: the site's ControlNet (raw + EMA) and what it was adapted to.
    groups: dict[str, Any] = {"controlnet": controlnet}
    if "controlnet" in result.ema:
        groups["ema.controlnet"] = result.ema["controlnet"]
    summary = dict(result.metrics)
    meta = diffusion_final_meta(
        "controlnet", cfg, result, config=config, latents=latents, factor=factor,
        scale_factor=scale_factor, sources=sources, summary=summary,
        site=site, init={"kind": init_kind, "sha256": init_hash},
    )
    path = write_final(run_dir, groups, meta,
                       {"stage": "controlnet", "site": site, "step": result.step, "summary": summary})
    return StageResult(stage="controlnet", run_dir=run_dir, checkpoint=path, metrics=summary,
                       step=result.step, site=site, resumed_from=result.resumed_from)
