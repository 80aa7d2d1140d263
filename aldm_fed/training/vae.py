"""Stage 1: the 3D VAE on source-domain volumes.

Loss per step (settings: `cfg.train.vae`, configs/train/vae.yaml):

    loss = L1(recon, x)
         + kl_weight * warmup(step) * KL
         + adv_weight * adversarial(recon)           from adv_start_step on, when adv_weight > 0
         + perceptual_weight * perceptual(recon, x)  only with user-given weights

- KL normalisation: the mean over latent elements (batch, channels, voxels) of
  0.5 (mu^2 + sigma^2 - log sigma^2 - 1), as ALDM's code does (`kl.mean()`, weight 1e-4). A mean
  keeps the weight independent of the latent size (the same 1e-4 at 32^3 and at 112^3). MONAI's
  3D tutorial instead sums over latent elements per sample with weight 1e-7; that equals a
  mean-KL weight of 1e-7 x (elements per sample), e.g. 1.6e-3 for 4 x 16^3 latents.
- Warm-up: the KL weight grows linearly from 0 to `kl_weight` over `kl_warmup_steps` steps
  (ALDM: the first 35 % of training).
- Adversarial: MONAI `PatchDiscriminator` (instance norm, batch-size-1 friendly) with
  least-squares `PatchAdversarialLoss`; the discriminator has its own AdamW (`disc_lr`) and steps
  after the VAE on the same batch.
- Perceptual: MONAI's `PerceptualLoss` downloads its networks at run time, which an offline site
  cannot do, so it is OFF unless `perceptual_weights` names a local file (a torchvision ResNet-50
  state dict, e.g. RadImageNet's, used slice-wise "fake 3D" and per channel). Off is logged; a
  path that cannot be used is an error, never a silent fallback.

After the last step the VAE can be evaluated on held-out cases (posterior-mean reconstruction,
clamped to [0, 1]): PSNR and SSIM (MONAI metrics, data range 1) per case and their means go into
the `final/` checkpoint's metadata and `metrics.json`. Off by default (`eval.split: none`): the
cohort has no validation split, and reporting on `test` by default invites tuning on the test
cases; `eval.split=test` turns it on for a final report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL
from torch import nn

from aldm_fed.checkpoints import plain_config
from aldm_fed.data.volumes import VolumeSet
from aldm_fed.models import build_vae, vae_downsample_factor
from aldm_fed.models._cfg import as_plain_dict, check_keys, get_float, get_int, get_str
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
    stage_section,
)
from aldm_fed.training.device import DeviceSetup, autocast_context, make_grad_scaler, training_layout
from aldm_fed.training.loop import batch_indices, run_loop
from aldm_fed.training.numerics import after_an_update

__all__ = [
    "VAE_DEFAULTS",
    "build_perceptual_loss",
    "kl_divergence",
    "kl_weight_at",
    "reconstruction_metrics",
    "train_vae",
]

log = logging.getLogger(__name__)

# Keys of cfg.train.vae beyond the shared loop/optimizer keys (configs/train/vae.yaml documents them).
VAE_DEFAULTS: dict[str, Any] = {
    "kl_weight": 1e-4,
    "kl_warmup_steps": 0,
    "adv_weight": 0.0,
    "adv_start_step": 0,
    "disc_lr": None,
    "disc_channels": 32,
    "disc_layers": 3,
    "perceptual_weight": 1e-3,
    "perceptual_weights": None,
    "perceptual_network": "resnet50",
    "eval": {"split": "none", "max_cases": 8},
}
EVAL_DEFAULTS: dict[str, Any] = {"split": "none", "max_cases": 8}
GROUP = "train.vae"


def vae_section(cfg: Any) -> dict[str, Any]:
    """`cfg.train.vae`, checked, with defaults filled in (`eval` included).

    Args:
        cfg: the composed config.
    """
    s = stage_section(cfg, "vae", VAE_DEFAULTS)
    get_float(s, "kl_weight", GROUP, minimum=0.0)
    get_int(s, "kl_warmup_steps", GROUP, minimum=0)
    get_float(s, "adv_weight", GROUP, minimum=0.0)
    get_int(s, "adv_start_step", GROUP, minimum=0)
    get_int(s, "disc_channels", GROUP)
    get_int(s, "disc_layers", GROUP)
    get_float(s, "perceptual_weight", GROUP, minimum=0.0)
    if s["disc_lr"] is not None:
        get_float(s, "disc_lr", GROUP, minimum=0.0, inclusive_min=False)
    ev = {**EVAL_DEFAULTS, **as_plain_dict(s["eval"] or {}, f"{GROUP}.eval")}
    check_keys(ev, f"{GROUP}.eval", (), EVAL_DEFAULTS)
    get_str(ev, "split", f"{GROUP}.eval", ("test", "target", "source", "none"))
    get_int(ev, "max_cases", f"{GROUP}.eval", minimum=0)
    s["eval"] = ev
    return s


# ------------------------------------------------------------------------------------ losses


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)), averaged over every latent element (see module docstring).

    Args:
        z_mu: posterior means (B, C, d, h, w).
        z_sigma: posterior standard deviations, same shape.
    """
    mu, sigma = z_mu.float(), z_sigma.float()
    var = sigma * sigma
    return 0.5 * (mu * mu + var - torch.log(var.clamp_min(1e-12)) - 1.0).mean()


def kl_weight_at(step: int, kl_weight: float, warmup_steps: int) -> float:
    """The KL weight of 0-based `step`: linear warm-up from 0 over `warmup_steps` steps.

    Args:
        step: the step index.
        kl_weight: the final weight.
        warmup_steps: length of the ramp; 0 = full weight from the start.
    """
    if warmup_steps <= 0:
        return kl_weight
    return kl_weight * min(1.0, step / warmup_steps)


class _PerChannelPerceptual(nn.Module):
    """MONAI's PerceptualLoss on each image channel separately (its networks take one channel)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = [self.loss(recon[:, c : c + 1].float(), x[:, c : c + 1].float()) for c in range(x.shape[1])]
        return torch.stack(parts).mean()


def build_perceptual_loss(section: Mapping[str, Any]) -> tuple[nn.Module | None, str]:
    """The perceptual loss, or None with the reason it is off.

    Args:
        section: `cfg.train.vae` (reads `perceptual_weight`, `perceptual_weights`,
            `perceptual_network`).

    Returns:
        (loss module or None, one line saying what is used).

    Raises:
        ValueError: `perceptual_weights` is set but the file is missing or cannot be loaded.
    """
    weight = float(section.get("perceptual_weight", 0.0))
    path = section.get("perceptual_weights")
    if weight == 0.0:
        return None, "perceptual loss: off (train.vae.perceptual_weight = 0)"
    if path is None:
        return None, (
            "perceptual loss: off -- MONAI's PerceptualLoss downloads its network at run time, "
            "and no local weights were given (set train.vae.perceptual_weights=PATH to a "
            "torchvision ResNet-50 state dict to use it); training with L1 + KL"
            + (" + adversarial" if float(section.get("adv_weight", 0.0)) > 0 else "")
        )
    file = Path(str(path)).expanduser()
    key = "train.vae.perceptual_weights"
    if not file.is_file():
        raise ValueError(f"{key}={path}: no such file; give a local weights file or null (off)")
    network = str(section.get("perceptual_network", "resnet50"))
    if network != "resnet50":
        raise ValueError(
            f"train.vae.perceptual_network={network!r}: only 'resnet50' loads weights from a local "
            f"path in MONAI (the others download from a hub at run time)"
        )
    try:
        from monai.losses import PerceptualLoss

        loss = PerceptualLoss(
            spatial_dims=3,
            network_type=network,
            is_fake_3d=True,
            pretrained=True,
            pretrained_path=str(file),
        )
    except Exception as exc:  # ImportError (torchvision), a bad state dict, a pickle refusal...
        raise ValueError(
            f"{key}={path}: cannot build MONAI's PerceptualLoss({network}) from it: "
            f"{type(exc).__name__}: {exc}. Fix the file (torchvision must be installed, and the "
            f"file must hold a ResNet-50 state dict), or set it to null to train without it"
        ) from exc
    loss.eval().requires_grad_(False)
    return _PerChannelPerceptual(loss), f"perceptual loss: on ({network}, weights {file})"


# ----------------------------------------------------------------------------------- metrics


@torch.no_grad()
def reconstruction_metrics(
    vae: AutoencoderKL, volumes: VolumeSet, setup: DeviceSetup | None = None
) -> dict[str, Any]:
    """PSNR and SSIM of posterior-mean reconstructions (clamped to [0, 1]; data range 1).

    Args:
        vae: the VAE (put in eval mode and left there).
        volumes: the held-out cases.
        setup: device and autocast (default CPU fp32).

    Returns:
        {"psnr": mean, "ssim": mean, "n_cases": N, "cases": {case_id: {"psnr", "ssim"}}}.
    """
    from monai.metrics import PSNRMetric

    from aldm_fed.evaluation.metrics import ssim_per_pair  # evaluation imports no training module

    device = setup.device if setup is not None else torch.device("cpu")
    vae.eval()
    size = volumes.size or int(volumes.images[0].shape[-1])
    win = 11 if size >= 32 else max(3, (size // 4) | 1)  # SSIM window must fit the volume
    psnr_fn = PSNRMetric(max_val=1.0)
    cases: dict[str, dict[str, float]] = {}
    for i, case_id in enumerate(volumes.case_ids):
        x = volumes.images_batch([i], device)
        with autocast_context(setup):
            z_mu, _ = vae.encode(x)
            recon = vae.decode(z_mu)
        recon = recon.float().clamp(0.0, 1.0)
        cases[case_id] = {
            "psnr": float(psnr_fn(recon, x).mean()),
            "ssim": float(ssim_per_pair(x.cpu(), recon.cpu(), data_range=1.0, win_size=win).mean()),
        }
    n = len(cases)
    return {
        "psnr": sum(c["psnr"] for c in cases.values()) / n if n else float("nan"),
        "ssim": sum(c["ssim"] for c in cases.values()) / n if n else float("nan"),
        "n_cases": n,
        "cases": cases,
    }


# ---------------------------------------------------------------------------------- training


def train_vae(
    cfg: Any,
    volumes: VolumeSet,
    run_dir: str | os.PathLike[str],
    *,
    eval_volumes: VolumeSet | None = None,
    init_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> StageResult:
    """Train (or resume, or just report) the VAE on `volumes`.

    Args:
        cfg: the composed config (reads `model.vae`, `train.vae`, `device`, `seed`).
        volumes: the training cases (source domain), in memory or memory-mapped.
        run_dir: the stage directory; holds the run_loop files, `final/` and `metrics.json`.
        eval_volumes: held-out cases for PSNR/SSIM after training; None = no evaluation.
        init_state: starting weights for a fresh run, e.g. ``{"vae": state_dict}`` (federated
            rounds pass the global weights; `disc` may be given too).
        progress: show the progress bar (and the section's `progress` must be true too).
        overwrite: discard whatever `run_dir` holds and start at step 0.

    Returns:
        The stage result; `skipped=True` when the run was already complete.
    """
    run_dir = Path(run_dir)
    if len(volumes) == 0:
        raise ValueError("train_vae: no training volumes")
    if overwrite:
        remove_final(run_dir)

    # 1. Settings, device, seed.
    section = vae_section(cfg)
    optim = OptimSettings.from_section(section)
    loop = loop_config(section, int(cfg.seed), progress)
    setup = device_setup(cfg)
    torch.manual_seed(int(cfg.seed))  # the initial weights are part of the run

    # 2. Networks and losses.
    vae = training_layout(build_vae(cfg.model.vae, in_channels=volumes.channels), setup)
    modules: dict[str, nn.Module] = {"vae": vae}
    adversarial = float(section["adv_weight"]) > 0
    disc = adv_loss = None
    if adversarial:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        disc = PatchDiscriminator(
            spatial_dims=3,
            channels=int(section["disc_channels"]),
            in_channels=volumes.channels,
            out_channels=1,
            num_layers_d=int(section["disc_layers"]),
            norm="INSTANCE",
        )
        disc = training_layout(disc, setup)
        modules["disc"] = disc
        adv_loss = PatchAdversarialLoss(criterion="least_squares")
    perceptual, perceptual_note = build_perceptual_loss(section)
    notes = [perceptual_note]
    (log.info if perceptual is not None else log.warning)(perceptual_note)
    if perceptual is not None:
        perceptual = perceptual.to(setup.device)
    init_hash = init_from_state(modules, init_state)

    # 3. Optimizers (AdamW; the discriminator has its own).
    opt_vae = optim.adamw(vae.parameters())
    optimizers: dict[str, Any] = {"vae": opt_vae}
    opt_disc = None
    if disc is not None:
        opt_disc = optim.adamw(disc.parameters(), lr=section["disc_lr"])
        optimizers["disc"] = opt_disc
    scaler = make_grad_scaler(setup)
    if setup.use_grad_scaler:
        optimizers["scaler"] = scaler
    vae_params = list(vae.parameters())

    # 4. What identifies this run.
    train_identity = {k: v for k, v in section.items() if k != "eval"}
    config = run_config(
        cfg, "vae", train_identity,
        model={"vae": cfg.model.vae},
        data=volumes.identity(),
        init_sha256=init_hash,
    )
    meta = {"stage": "vae", "modalities": list(volumes.modalities)}

    # 5. One step: reconstruction + KL (+ adversarial), then the discriminator.
    def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
        idx = batch_indices(loop.seed, step, len(volumes), optim.batch_size)
        x = volumes.images_batch(idx, setup.device)
        with autocast_context(setup):
            recon, z_mu, z_sigma = vae(x)  # samples z with the global RNG (seeded per step)
        recon = recon.float()
        l1 = F.l1_loss(recon, x)
        kl = kl_divergence(z_mu, z_sigma)
        w_kl = kl_weight_at(step, float(section["kl_weight"]), int(section["kl_warmup_steps"]))
        loss = l1 + w_kl * kl
        metrics = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        if perceptual is not None:
            p = perceptual(recon, x)
            loss = loss + float(section["perceptual_weight"]) * p
            metrics["perceptual"] = float(p.detach())
        adv_on = disc is not None and step >= int(section["adv_start_step"])
        if adv_on:
            with autocast_context(setup):
                logits_fake = disc(recon)[-1]
            g_adv = adv_loss(logits_fake.float(), target_is_real=True, for_discriminator=False)
            loss = loss + float(section["adv_weight"]) * g_adv
            metrics["adv_g"] = float(g_adv.detach())
        norm = optimizer_step(loss, opt_vae, vae_params, scaler, optim.grad_clip, update=not adv_on)
        if norm is not None:
            metrics["grad_norm"] = norm
        if adv_on:
            with autocast_context(setup):
                fake = disc(recon.detach())[-1]
                real = disc(x)[-1]
            d_loss = 0.5 * (
                adv_loss(fake.float(), target_is_real=False, for_discriminator=True)
                + adv_loss(real.float(), target_is_real=True, for_discriminator=True)
            )
            with after_an_update():
                optimizer_step(d_loss, opt_disc, list(disc.parameters()), scaler, optim.grad_clip)
            metrics["adv_d"] = float(d_loss.detach())
        return {"loss": float(loss.detach()), **metrics}

    # 6. The loop (resume, checkpoints, metrics.jsonl, EMA).
    result = run_loop(
        run_dir, loop,
        modules=modules, step_fn=step_fn, optimizers=optimizers, config=config, meta=meta,
        ema_modules=["vae"] if loop.ema_decay is not None else [],
        overwrite=overwrite, generator_device=setup.device, setup=setup,
    )

    # 7. Already finished earlier: report the existing result.
    done = existing_result("vae", run_dir, result, loop)
    if done is not None:
        done.notes = notes
        return done

    # 8. Held-out reconstruction quality (of the EMA weights when there are some).
    final_vae = result.ema.get("vae", vae)
    evaluation: dict[str, Any] = {"n_cases": 0, "note": "no held-out cases given"}
    if eval_volumes is not None and len(eval_volumes):
        evaluation = reconstruction_metrics(final_vae, eval_volumes, setup)
        evaluation["case_ids"] = list(eval_volumes.case_ids)
    summary = {**result.metrics}
    for key in ("psnr", "ssim"):
        if key in evaluation:
            summary[key] = float(evaluation[key])

    # 9. final/: the weights every later stage reads, with their evaluation.
    groups: dict[str, Any] = {"vae": vae}
    if "vae" in result.ema:
        groups["ema.vae"] = result.ema["vae"]
    final_meta = {
        "stage": "vae",
        "step": result.step,
        "loop_checkpoint": result.checkpoint.name,
        "config": config,
        "model": {"vae": plain_config(cfg.model.vae)},
        "modalities": list(volumes.modalities),
        "in_channels": volumes.channels,
        "latent_channels": int(vae.latent_channels),
        "vae_downsample": vae_downsample_factor(cfg.model.vae),
        "data": volumes.identity(),
        "train_cases": list(volumes.case_ids),
        "metrics": summary,
        "evaluation": {k: v for k, v in evaluation.items() if k != "cases"},
        "notes": notes,
    }
    doc = {"stage": "vae", "step": result.step, "summary": summary, "train": result.metrics,
           "evaluation": evaluation, "notes": notes}
    path = write_final(run_dir, groups, final_meta, doc)
    return StageResult(
        stage="vae", run_dir=run_dir, checkpoint=path, metrics=summary, step=result.step,
        resumed_from=result.resumed_from, notes=notes,
    )
