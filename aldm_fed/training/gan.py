"""The GAN baseline: a pix2pix-style 3D GAN trained on a site's K target cases.

The comparison ALDM makes ("better than a GAN trained on the same cases") needs a GAN trained on
exactly the few-shot cases the site's ControlNet sees. Per step (settings `cfg.train.gan`,
configs/train/gan.yaml; networks `cfg.model.gan`, aldm_fed/models/gan.py):

1. Draw the batch (`batch_indices`, a function of (seed, step)); the condition is the encoded
   tumour mask (+ the brain mask with `model.gan.brain_channel`), the noise channels come from the
   step's generator.
2. Generator: `fake = G(condition, noise) * brain`. Voxels outside the brain are zeroed because
   synthesis zeroes them too (outside the HOST's brain, as ALDM's volumes): the GAN is never asked
   to draw the outline it will not be judged on. The brain is where any modality is nonzero (the
   cache is 0 outside the brain).
   Loss: `l1_weight * L1(fake, x) + adv_weight * adversarial(D(condition, fake))` (pix2pix: L1
   weight 100), one Adam step.
3. Discriminator on (condition, x) as real and (condition, fake.detach()) as fake, halved
   (pix2pix), with MONAI's `PatchAdversarialLoss` (`adv_criterion`: least squares, hinge or BCE);
   its own Adam step.

Resumable through `run_loop` (both networks, both optimizers, RNG); `final/` holds the generator
(group `generator`) and the discriminator (`disc`), with the model config, modalities and the
training cases, which is all synthesis needs (`aldm_fed.synthesis.gan`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn

from aldm_fed.checkpoints import Checkpoint
from aldm_fed.data.volumes import VolumeSet
from aldm_fed.models._cfg import get_float, get_str
from aldm_fed.models.gan import GanGenerator, build_gan, gan_config
from aldm_fed.training.artifacts import StageResult, existing_result, remove_final, write_final
from aldm_fed.training.common import (
    device_setup,
    init_from_state,
    loop_config,
    optimizer_step,
    run_config,
    stage_section,
)
from aldm_fed.training.device import autocast_context, make_grad_scaler
from aldm_fed.training.loop import batch_indices, run_loop
from aldm_fed.training.numerics import after_an_update
from aldm_fed.training.optim import adam_optimizer

__all__ = ["ADV_CRITERIA", "GAN_DEFAULTS", "gan_section", "load_gan_generator", "train_gan"]

log = logging.getLogger(__name__)

GROUP = "train.gan"
ADV_CRITERIA = ("least_squares", "hinge", "bce")
# Keys of cfg.train.gan beyond the shared loop/optimizer keys (configs/train/gan.yaml documents them).
GAN_DEFAULTS: dict[str, Any] = {
    "betas": [0.5, 0.999],
    "l1_weight": 100.0,
    "adv_weight": 1.0,
    "adv_criterion": "least_squares",
    "disc_lr": None,
}


def gan_section(cfg: Any) -> dict[str, Any]:
    """`cfg.train.gan`, checked.

    Args:
        cfg: the composed config.

    Raises:
        ValueError: the section is missing, incomplete or has a bad value (named).
    """
    s = stage_section(cfg, "gan", GAN_DEFAULTS)
    betas = s["betas"]
    if (
        isinstance(betas, (str, bytes))
        or not hasattr(betas, "__len__")
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"{GROUP}.betas: expected [beta1, beta2] in [0, 1), got {betas!r}")
    s["betas"] = [float(b) for b in betas]
    get_float(s, "l1_weight", GROUP, minimum=0.0)
    get_float(s, "adv_weight", GROUP, minimum=0.0)
    get_str(s, "adv_criterion", GROUP, ADV_CRITERIA)
    if s["disc_lr"] is not None:
        get_float(s, "disc_lr", GROUP, minimum=0.0, inclusive_min=False)
    if float(s["l1_weight"]) == 0.0 and float(s["adv_weight"]) == 0.0:
        raise ValueError(f"{GROUP}: l1_weight and adv_weight are both 0; the generator would learn nothing")
    return s


def _model_group(cfg: Any) -> Any:
    model = cfg.get("model") if hasattr(cfg, "get") else None
    group = model.get("gan") if model is not None and hasattr(model, "get") else None
    if group is None:
        raise ValueError("config has no `model.gan` group: configs/config.yaml needs `- model/gan: <preset>` "
                         "in its defaults (configs/model/gan/{tiny,demo,paper}.yaml)")
    return group


def load_gan_generator(ckpt: Checkpoint) -> GanGenerator:
    """The generator of a `sites/<site>/gan/final` checkpoint, rebuilt from the model config
    stored in it (never the current config), in eval mode.

    Args:
        ckpt: the GAN stage's final checkpoint.
    """
    meta = ckpt.meta
    generator, _ = build_gan(meta["model"]["gan"], len(meta["modalities"]))
    generator.load_state_dict(ckpt.tensors["generator"])
    return generator.eval()


def train_gan(
    cfg: Any,
    volumes: VolumeSet,
    run_dir: str | os.PathLike[str],
    *,
    site: str | None = None,
    init_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> StageResult:
    """Train (or resume, or just report) the pix2pix GAN on a site's cases.

    Args:
        cfg: the composed config (reads `model.gan`, `train.gan`, `device`, `seed`).
        volumes: the training cases (the site's K `target` cases), with their tumour masks.
        run_dir: the stage directory (`runs/<name>/sites/<site>/gan`): run_loop files, `final/`,
            `metrics.json`.
        site: the site name (recorded).
        init_state: starting weights for a fresh run (`{"generator": ..., "disc": ...}`).
        progress: show the progress bar.
        overwrite: discard whatever `run_dir` holds and start at step 0.

    Returns:
        The stage result; `skipped=True` when the run was already complete. Its metrics are the
        last step's: `loss` (generator total), `l1`, `adv_g`, `adv_d`.

    Raises:
        ValueError: no volumes, bad settings, or a volume edge the networks cannot down-sample.
    """
    run_dir = Path(run_dir)
    if len(volumes) == 0:
        raise ValueError(f"train_gan: site {site} has no training volumes")
    if overwrite:
        remove_final(run_dir)

    # 1. Settings, device, seed.
    section = gan_section(cfg)
    model_cfg = gan_config(_model_group(cfg))
    loop = loop_config(section, int(cfg.seed), progress)
    setup = device_setup(cfg)
    size = int(volumes.images[0].shape[-1])
    if size % model_cfg.downsample:
        raise ValueError(f"model.gan: volumes of edge {size} cannot be down-sampled by {model_cfg.downsample} "
                         f"(channels levels / disc_layers); use fewer levels or another data.size")
    torch.manual_seed(int(cfg.seed))  # the initial weights are part of the run

    # 2. Networks and losses.
    generator, disc = build_gan(model_cfg, volumes.channels)
    generator.to(setup.device)
    disc.to(setup.device)
    modules: dict[str, nn.Module] = {"generator": generator, "disc": disc}
    init_hash = init_from_state(modules, init_state)
    adv_loss = PatchAdversarialLoss(criterion=str(section["adv_criterion"]))
    l1_weight, adv_weight = float(section["l1_weight"]), float(section["adv_weight"])

    # 3. Adam for both (pix2pix), the discriminator with its own lr.
    betas = tuple(section["betas"])
    lr = float(section["lr"])
    disc_lr = lr if section["disc_lr"] is None else float(section["disc_lr"])
    wd = float(section["weight_decay"])
    opt_g = adam_optimizer(generator.parameters(), lr=lr, betas=betas, weight_decay=wd, decoupled=False)
    opt_d = adam_optimizer(disc.parameters(), lr=disc_lr, betas=betas, weight_decay=wd, decoupled=False)
    scaler = make_grad_scaler(setup)
    optimizers: dict[str, Any] = {"generator": opt_g, "disc": opt_d}
    if setup.use_grad_scaler:
        optimizers["scaler"] = scaler
    g_params, d_params = list(generator.parameters()), list(disc.parameters())
    clip = None if section["grad_clip"] is None else float(section["grad_clip"])
    batch = int(section["batch_size"])

    # 4. What identifies this run.
    config = run_config(cfg, "gan", section, site=site, model={"gan": model_cfg.to_dict()},
                        data=volumes.identity(), init_sha256=init_hash)
    meta = {"stage": "gan", "site": site, "modalities": list(volumes.modalities)}

    # 5. One step: the generator, then the discriminator on the same batch.
    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        idx = batch_indices(loop.seed, step, len(volumes), batch)
        x = volumes.images_batch(idx, setup.device)
        seg = volumes.segs_batch(idx, setup.device)
        brain = (x.amax(dim=1, keepdim=True) > 0).to(x.dtype)
        cond = generator.condition(seg, brain).to(setup.device)
        noise = None
        if model_cfg.noise_channels:
            noise = torch.randn((x.shape[0], model_cfg.noise_channels, *x.shape[2:]), generator=gen,
                                device=setup.device)
        with autocast_context(setup):
            fake = generator(cond, noise)
        fake = fake.float() * brain
        l1 = F.l1_loss(fake, x)
        loss = l1_weight * l1
        metrics = {"l1": float(l1.detach())}
        if adv_weight > 0:
            with autocast_context(setup):
                logits = disc(torch.cat([cond, fake], dim=1))[-1]
            g_adv = adv_loss(logits.float(), target_is_real=True, for_discriminator=False)
            loss = loss + adv_weight * g_adv
            metrics["adv_g"] = float(g_adv.detach())
        optimizer_step(loss, opt_g, g_params, scaler, clip, update=adv_weight == 0)
        if adv_weight > 0:
            with autocast_context(setup):
                d_fake = disc(torch.cat([cond, fake.detach()], dim=1))[-1]
                d_real = disc(torch.cat([cond, x], dim=1))[-1]
            d_loss = 0.5 * (
                adv_loss(d_fake.float(), target_is_real=False, for_discriminator=True)
                + adv_loss(d_real.float(), target_is_real=True, for_discriminator=True)
            )
            with after_an_update():
                optimizer_step(d_loss, opt_d, d_params, scaler, clip)
            metrics["adv_d"] = float(d_loss.detach())
        return {"loss": float(loss.detach()), **metrics}

    # 6. The loop (resume, checkpoints, metrics.jsonl).
    result = run_loop(run_dir, loop, modules=modules, step_fn=step_fn, optimizers=optimizers, config=config,
                      meta=meta, overwrite=overwrite, generator_device=setup.device, setup=setup)
    done = existing_result("gan", run_dir, result, loop, site=site)
    if done is not None:
        return done

    # 7. final/: the generator synthesis reads (and the discriminator, to continue from).
    summary = dict(result.metrics)
    final_meta = {
        "stage": "gan",
        "site": site,
        "step": result.step,
        "loop_checkpoint": result.checkpoint.name,
        "config": config,
        "model": {"gan": model_cfg.to_dict()},
        "modalities": list(volumes.modalities),
        "size": size,
        "data": volumes.identity(),
        "train_cases": list(volumes.case_ids),
        "metrics": summary,
    }
    path = write_final(run_dir, {"generator": generator, "disc": disc}, final_meta,
                       {"stage": "gan", "site": site, "step": result.step, "summary": summary})
    return StageResult(stage="gan", run_dir=run_dir, checkpoint=path, metrics=summary, step=result.step,
                       site=site, resumed_from=result.resumed_from)
