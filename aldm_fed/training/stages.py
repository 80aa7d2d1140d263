"""`aldm-fed train <stage>`: read a stage's inputs from the config's paths, run it, report.

    run_stage(cfg, "vae")          source volumes -> runs/<name>/vae/final
    run_stage(cfg, "scale")        VAE + source volumes -> latents (cached) -> runs/<name>/scale/final
    run_stage(cfg, "backbone")     VAE + scale + source latents -> runs/<name>/backbone/final
    run_stage(cfg, "controlnet")   cfg.site's K target latents + frozen backbone
                                   -> runs/<name>/sites/<site>/controlnet/final
    run_stage(cfg, "gan")          cfg.site's K target volumes -> the pix2pix GAN baseline
                                   -> runs/<name>/sites/<site>/gan/final (needs no other stage)

Each stage here only gathers inputs (manifests -> case ids -> cache, preparing missing cases;
earlier stages' `final/` checkpoints) and calls the pure training function of its module
(`train_vae`, `compute_scale`, `train_backbone`, `train_controlnet`), which a federated client
calls the same way with its own data and the round's global weights. Layout of the run folder:
`aldm_fed.training.artifacts`.

Every stage resumes from its own checkpoints; rerunning a finished stage reports the stored
result without training; raising `train.<stage>.max_steps` continues where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aldm_fed.checkpoints import Checkpoint
from aldm_fed.data.volumes import VolumeSet, load_split, site_manifests, source_sites
from aldm_fed.training.artifacts import (
    STAGES,
    MissingStageError,
    RunLayout,
    StageResult,
    checkpoint_identity,
    controlnet_weights,
    latent_vae_weights,
    load_backbone_unet,
    load_final,
    load_vae,
    remove_final,
)
from aldm_fed.training.backbone import train_backbone
from aldm_fed.training.common import device_setup
from aldm_fed.training.controlnet import controlnet_section, train_controlnet
from aldm_fed.training.device import configure_threads
from aldm_fed.training.gan import train_gan
from aldm_fed.training.latents import LatentSet, encode_volumes, latent_cache_key
from aldm_fed.training.scale import compute_scale
from aldm_fed.training.vae import train_vae, vae_section

__all__ = ["STAGES", "MissingStageError", "StageResult", "cached_latents", "run_stage", "vae_source"]

log = logging.getLogger(__name__)


def run_stage(cfg: Any, stage: str, *, progress: bool = True, overwrite: bool = False) -> StageResult:
    """Run one training stage of the generative core for the composed config.

    Args:
        cfg: the composed config (`aldm_fed.config.compose`).
        stage: `vae`, `scale`, `backbone`, `controlnet` or `gan` (the last two for `cfg.site`).
        progress: show progress bars.
        overwrite: discard the stage's previous run (its run folder) and start over.

    Returns:
        The stage's result (`.to_dict()` for JSON).

    Raises:
        ValueError: unknown stage, missing/invalid settings, no `cfg.site` for `controlnet`, a site
            without target cases, or inputs that do not belong together.
        MissingStageError: a prerequisite stage has not run (the message names the command and
            the path it looked at).
    """
    runners = {"vae": _vae, "scale": _scale, "backbone": _backbone, "controlnet": _controlnet, "gan": _gan}
    if stage not in runners:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {list(STAGES)}")
    dev = cfg.get("device") if hasattr(cfg, "get") else None
    configure_threads(dev.get("num_threads") if dev is not None else None)
    layout = RunLayout.from_cfg(cfg)
    result = runners[stage](cfg, layout, progress=progress, overwrite=overwrite)
    state = "already complete" if result.skipped else f"done at step {result.step}"
    log.info("stage %s%s: %s -> %s", stage, f" ({result.site})" if result.site else "", state,
             result.checkpoint)
    return result


# ------------------------------------------------------------------------------------- stages


def _vae(cfg: Any, layout: RunLayout, *, progress: bool, overwrite: bool) -> StageResult:
    # 1. The source sites' source cases train; their held-out cases evaluate.
    section = vae_section(cfg)
    sites = source_sites(cfg)
    if not sites:
        raise ValueError(f"no site in {cfg.paths.cohort}/manifests has source cases to train the VAE on")
    volumes = load_split(cfg, "source", sites=sites, progress=progress)
    ev = section["eval"]
    eval_volumes = None
    if ev["split"] != "none" and int(ev["max_cases"]) > 0:
        try:
            eval_volumes = load_split(cfg, ev["split"], sites=sites, max_cases=int(ev["max_cases"]),
                                      progress=progress)
        except ValueError as exc:  # no such cases: train anyway, say so in the metrics
            log.warning("VAE evaluation skipped: %s", exc)
    # 2. Train.
    return train_vae(cfg, volumes, layout.stage_dir("vae"), eval_volumes=eval_volumes,
                     progress=progress, overwrite=overwrite)


def _scale(cfg: Any, layout: RunLayout, *, progress: bool, overwrite: bool) -> StageResult:
    # 1. The trained VAE and the source set.
    vae_ckpt = load_final(layout, "vae", needed_by="scale")
    volumes = load_split(cfg, "source", sites=source_sites(cfg), progress=progress)
    # 2. Encode once (cached for the backbone), then the statistics.
    latents = cached_latents(cfg, layout, vae_ckpt, volumes, progress)
    if overwrite:
        remove_final(layout.stage_dir("scale"))
    return compute_scale(latents, layout.stage_dir("scale"),
                         sources={"vae": vae_source(vae_ckpt)}, data=volumes.identity())


def _backbone(cfg: Any, layout: RunLayout, *, progress: bool, overwrite: bool) -> StageResult:
    # 1. Inputs: VAE and scale factor, which must belong together.
    vae_ckpt = load_final(layout, "vae", needed_by="backbone")
    scale_ckpt = load_final(layout, "scale", needed_by="backbone")
    vae_info = vae_source(vae_ckpt)
    if scale_ckpt.meta.get("sources", {}).get("vae", {}).get("sha256") != vae_info["sha256"]:
        raise MissingStageError(
            f"the scale factor at {scale_ckpt.path} was computed for another VAE checkpoint than "
            f"{vae_ckpt.path}; run `aldm-fed train scale` first"
        )
    volumes = load_split(cfg, "source", sites=source_sites(cfg), progress=progress)
    if scale_ckpt.meta.get("data") != volumes.identity():
        raise MissingStageError(
            f"the scale factor at {scale_ckpt.path} was computed on other source cases than the "
            f"cohort's manifests list now; run `aldm-fed train scale` first"
        )
    # 2. Source latents (cached by the scale stage).
    latents = cached_latents(cfg, layout, vae_ckpt, volumes, progress)
    # 3. Train.
    return train_backbone(
        cfg, latents, layout.stage_dir("backbone"),
        scale_factor=float(scale_ckpt.meta["scale_factor"]),
        sources={"vae": vae_info, "scale": checkpoint_identity(scale_ckpt)},
        progress=progress, overwrite=overwrite,
    )


def _controlnet(cfg: Any, layout: RunLayout, *, progress: bool, overwrite: bool) -> StageResult:
    # 1. The site and its K target cases.
    site = cfg.get("site")
    cohort = str(cfg.paths.cohort)
    if not site:
        known = sorted(site_manifests(cohort)) if _has_manifests(cohort) else []
        raise ValueError(
            f"the controlnet stage adapts one site's ControlNet: give site=<SITE> (or --site) "
            f"(sites in {cohort}/manifests: {known})"
        )
    site = str(site)
    path, manifest = site_manifests(cohort, [site])[site]
    if not manifest.cases("target"):
        raise ValueError(
            f"site {site} has no target (few-shot) cases: the 'target' split of {path} is empty"
        )
    section = controlnet_section(cfg)

    # 2. Inputs: the VAE and the backbone trained on its latents.
    vae_ckpt = load_final(layout, "vae", needed_by="controlnet")
    bb_ckpt = load_final(layout, "backbone", needed_by="controlnet")
    vae_info, bb_info = vae_source(vae_ckpt), checkpoint_identity(bb_ckpt)
    if bb_ckpt.meta.get("sources", {}).get("vae", {}).get("sha256") != vae_info["sha256"]:
        raise MissingStageError(
            f"the backbone at {bb_ckpt.path} was trained on another VAE checkpoint than "
            f"{vae_ckpt.path}; run `aldm-fed train scale` and `aldm-fed train backbone` first"
        )
    volumes = load_split(cfg, "target", sites=[site], progress=progress)
    latents = cached_latents(cfg, layout, vae_ckpt, volumes, progress)

    # 3. The frozen backbone and the ControlNet's starting point; the model settings are the
    #    backbone's (a ControlNet must match the UNet it steers).
    use_ema = section["backbone_weights"] == "ema"
    unet, unet_kind = load_backbone_unet(bb_ckpt, use_ema=use_ema)
    init_state = None
    if section["init"] == "source":
        state, kind = controlnet_weights(bb_ckpt, use_ema=use_ema)
        init_state = {"controlnet": state}
    site_cfg = _with_backbone_models(cfg, bb_ckpt.meta)
    return train_controlnet(
        site_cfg, latents, layout.stage_dir("controlnet", site),
        unet=unet, scale_factor=float(bb_ckpt.meta["scale_factor"]),
        init_state=init_state, init_kind="source" if init_state else None,
        sources={"vae": vae_info, "backbone": {**bb_info, "weights": unet_kind}},
        site=site, progress=progress, overwrite=overwrite,
    )


def _gan(cfg: Any, layout: RunLayout, *, progress: bool, overwrite: bool) -> StageResult:
    # 1. The site and its K target cases: the same cases its ControlNet is adapted on.
    site = cfg.get("site")
    cohort = str(cfg.paths.cohort)
    if not site:
        known = sorted(site_manifests(cohort)) if _has_manifests(cohort) else []
        raise ValueError(f"the gan stage trains one site's GAN baseline: give site=<SITE> (or --site) "
                         f"(sites in {cohort}/manifests: {known})")
    site = str(site)
    path, manifest = site_manifests(cohort, [site])[site]
    if not manifest.cases("target"):
        raise ValueError(f"site {site} has no target (few-shot) cases: the 'target' split of {path} is empty")
    volumes = load_split(cfg, "target", sites=[site], progress=progress)
    # 2. Train (no other stage is needed: the GAN works on the volumes themselves).
    return train_gan(cfg, volumes, layout.stage_dir("gan", site), site=site, progress=progress,
                     overwrite=overwrite)


# ------------------------------------------------------------------------------------ helpers


def vae_source(vae_ckpt: Checkpoint) -> dict[str, Any]:
    """The VAE as later stages record it: sha256 and the weights that encode the latents."""
    return {**checkpoint_identity(vae_ckpt), "weights": latent_vae_weights(vae_ckpt)}


def cached_latents(cfg: Any, layout: RunLayout, vae_ckpt: Checkpoint, volumes: VolumeSet, progress: bool) -> LatentSet:
    """Latents of `volumes` under the VAE of `vae_ckpt`, from (or into) the run's latent cache."""
    info = vae_source(vae_ckpt)
    setup = device_setup(cfg)
    vae, kind = load_vae(vae_ckpt, weights=info["weights"])
    key = latent_cache_key(info["sha256"], volumes.prep_hash, weights=kind, precision=setup.precision)
    vae.to(setup.device)
    return encode_volumes(vae, volumes, setup=setup, cache_dir=layout.latents_dir(key),
                          cache_info={"vae": info}, progress=progress)


def _with_backbone_models(cfg: Any, backbone_meta: dict[str, Any]) -> Any:
    """`cfg` with model.unet / controlnet / conditioning and scheduler taken from the backbone."""
    stored = {
        "model": {k: backbone_meta["model"][k] for k in ("unet", "controlnet", "conditioning")},
        "scheduler": backbone_meta["scheduler"],
    }
    current = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    differs = [f"model.{k}" for k in stored["model"] if current.get("model", {}).get(k) != stored["model"][k]]
    if current.get("scheduler") != stored["scheduler"]:
        differs.append("scheduler")
    if differs:
        log.warning("controlnet: using the backbone's %s (the current config differs)", ", ".join(differs))
    out = OmegaConf.create(current)
    out.model.unet = stored["model"]["unet"]
    out.model.controlnet = stored["model"]["controlnet"]
    out.model.conditioning = stored["model"]["conditioning"]
    out.scheduler = stored["scheduler"]
    return out


def _has_manifests(cohort: str) -> bool:
    return (Path(cohort) / "manifests").is_dir()
