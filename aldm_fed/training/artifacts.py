"""Where the training stages put their results, and the one way to load them back.

Run directory (`cfg.paths.runs`, by default `runs/<run_name>/`):

```
runs/<run_name>/
  vae/                              the VAE stage: a run_loop directory
    run.json  metrics.jsonl  latest  checkpoints/step_*/     (aldm_fed.training.loop)
    final/                          checkpoint: group "vae" (+ "ema.vae" with EMA);
                                    meta: stage, step, model.vae, modalities, vae_downsample,
                                    data (case-id hash, prep_hash), metrics (held-out PSNR/SSIM)
    metrics.json                    last training metrics + held-out reconstruction metrics
  latents/<vae_sha16>-<prep_hash>/  posterior-mean latents, UNSCALED, one <case_id>.npy each
    index.json                      float32 (latent_channels, S/f, S/f, S/f); encoded once per VAE
                                    checkpoint and preprocessing, shared by every later stage
  scale/
    final/                          checkpoint: group "stats" (count, sum, sum_sq: float64);
                                    meta: scale_factor = 1 / std, sources.vae (path, sha256)
    metrics.json
  backbone/                         run_loop directory (UNet + source ControlNet, trained jointly)
    final/                          groups "unet", "ema.unet", "controlnet", "ema.controlnet";
                                    meta: scale_factor, sources.vae, model.{unet, controlnet,
                                    conditioning}, scheduler, latent_channels
    metrics.json
  sites/<site>/controlnet/          run_loop directory (the site's ControlNet; backbone frozen)
    final/                          groups "controlnet", "ema.controlnet"; meta: init (source |
                                    unet), sources.{vae, backbone}, scale_factor, site, data
    metrics.json
```

Every `final/` is written atomically after the stage's last step, from the run's last
checkpoint, so a `final/` exists only for a complete stage. Later stages read only `final/`
checkpoints, and record the sha256 of each one they used (`sources`), so a stale chain (a VAE
retrained after its backbone) is detected rather than silently mixed.

`load_generative_models(cfg, site)` turns these checkpoints into the
`aldm_fed.diffusion.pipeline.GenerativeModels` bundle that synthesis and evaluation use. Networks
are rebuilt from the model configs stored in the checkpoints, not from the current `cfg`, so a
later change of presets cannot load weights into the wrong architecture.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from aldm_fed.checkpoints import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from aldm_fed.diffusion.conditioning import conditioning_config
from aldm_fed.diffusion.pipeline import GenerativeModels
from aldm_fed.io import atomic_write_json
from aldm_fed.models import build_controlnet, build_unet, build_vae

__all__ = [
    "FINAL_DIR",
    "METRICS_JSON",
    "STAGES",
    "MissingStageError",
    "RunLayout",
    "StageResult",
    "checkpoint_info",
    "controlnet_weights",
    "load_backbone_unet",
    "load_final",
    "load_generative_models",
    "load_vae",
    "read_metrics_json",
    "write_final",
]

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("vae", "scale", "backbone", "controlnet")
FINAL_DIR = "final"
METRICS_JSON = "metrics.json"
LATENTS_DIR = "latents"
SITES_DIR = "sites"

# What to run when a stage's checkpoint is missing.
_HINTS = {
    "vae": "aldm-fed train vae",
    "scale": "aldm-fed train scale",
    "backbone": "aldm-fed train backbone",
    "controlnet": "aldm-fed train controlnet site=<SITE>",
}


class MissingStageError(FileNotFoundError):
    """A stage needs the result of an earlier stage that is not there (the message says which
    command makes it, and which path was looked at)."""


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run (see the module docstring).

    Args:
        root: the run folder (`cfg.paths.runs`).
    """

    root: Path

    @classmethod
    def from_cfg(cls, cfg: Any) -> RunLayout:
        """The layout of `cfg.paths.runs` (relative paths resolve against the working directory).

        Args:
            cfg: the composed config.
        """
        return cls(Path(str(cfg.paths.runs)))

    def stage_dir(self, stage: str, site: str | None = None) -> Path:
        """The run_loop directory of a stage (the site's, for `controlnet`).

        Args:
            stage: one of `STAGES`.
            site: required for `controlnet`.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        if stage == "controlnet":
            if not site:
                raise ValueError("the controlnet stage is per site: give a site (site=<SITE>)")
            return self.root / SITES_DIR / site / "controlnet"
        return self.root / stage

    def final(self, stage: str, site: str | None = None) -> Path:
        """The `final/` checkpoint directory of a stage.

        Args:
            stage: one of `STAGES`.
            site: required for `controlnet`.
        """
        return self.stage_dir(stage, site) / FINAL_DIR

    def latents_dir(self, key: str) -> Path:
        """Folder of cached latents for one (VAE checkpoint, preprocessing) pair.

        Args:
            key: from `aldm_fed.training.latents.latent_cache_key`.
        """
        return self.root / LATENTS_DIR / key


@dataclass
class StageResult:
    """What a training stage returns (and what `aldm-fed train <stage>` prints).

    Args:
        stage: `vae`, `scale`, `backbone` or `controlnet`.
        run_dir: the stage's directory.
        checkpoint: its `final/` checkpoint.
        metrics: flat numbers: last training metrics (e.g. `loss`) and evaluation results
            (e.g. `psnr`, `ssim`, `scale_factor`).
        step: completed optimizer steps (0 for `scale`).
        site: the site, for `controlnet`.
        resumed_from: the step training resumed from (0 for a fresh run).
        skipped: the stage was already complete; nothing was trained or evaluated.
        notes: human-readable remarks (e.g. "perceptual loss off: ...").
    """

    stage: str
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0
    site: str | None = None
    resumed_from: int = 0
    skipped: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (paths as strings)."""
        return {
            "stage": self.stage,
            "site": self.site,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "step": self.step,
            "resumed_from": self.resumed_from,
            "skipped": self.skipped,
            "metrics": dict(self.metrics),
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------ final/ I/O


def write_final(
    run_dir: str | os.PathLike[str],
    groups: Mapping[str, Mapping[str, torch.Tensor] | torch.nn.Module],
    meta: Mapping[str, Any],
    metrics_doc: Mapping[str, Any],
) -> Path:
    """Write a stage's `final/` checkpoint and `metrics.json` (both atomically).

    Args:
        run_dir: the stage directory.
        groups: checkpoint groups (module or state dict each).
        meta: checkpoint metadata (`stage`, `step`, `metrics`, ...).
        metrics_doc: the content of `metrics.json`.
    """
    run_dir = Path(run_dir)
    path = save_checkpoint(run_dir / FINAL_DIR, groups, meta)
    atomic_write_json(run_dir / METRICS_JSON, dict(metrics_doc))
    return path


def remove_final(run_dir: str | os.PathLike[str]) -> None:
    """Delete `final/` and `metrics.json` of a stage (used with `overwrite=True`).

    Args:
        run_dir: the stage directory.
    """
    import shutil

    run_dir = Path(run_dir)
    if (run_dir / FINAL_DIR).is_dir():
        shutil.rmtree(run_dir / FINAL_DIR)
    (run_dir / METRICS_JSON).unlink(missing_ok=True)


def read_metrics_json(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`metrics.json` of a stage ({} when absent or unreadable).

    Args:
        run_dir: the stage directory.
    """
    path = Path(run_dir) / METRICS_JSON
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def load_final(
    layout: RunLayout,
    stage: str,
    site: str | None = None,
    *,
    groups: list[str] | None = None,
    needed_by: str | None = None,
) -> Checkpoint:
    """Load a stage's `final/` checkpoint, or say clearly which command makes it.

    Args:
        layout: the run layout.
        stage: the stage whose result is needed.
        site: the site, for `controlnet`.
        groups: checkpoint groups to load (None = all).
        needed_by: the stage asking, for the message.

    Raises:
        MissingStageError: no complete result of `stage` there.
        CheckpointError: the checkpoint is damaged.
    """
    path = layout.final(stage, site)
    if not (path / "meta.json").is_file():
        hint = _HINTS[stage].replace("<SITE>", site or "<SITE>")
        who = f"the {needed_by} stage needs" if needed_by else "needs"
        raise MissingStageError(
            f"{who} a finished {stage} stage, but there is no checkpoint at {path}; "
            f"run `{hint}` first (with the same run_name / paths.runs)"
        )
    return load_checkpoint(path, groups=groups)


def checkpoint_info(ckpt: Checkpoint) -> dict[str, Any]:
    """Provenance of a checkpoint: path, step, sha256 of its weights.

    Args:
        ckpt: a loaded checkpoint.
    """
    return {
        "path": str(ckpt.path),
        "step": ckpt.meta.get("step"),
        "sha256": ckpt.meta["weights"]["sha256"],
    }


def final_is_current(run_dir: Path, step: int, loop_checkpoint: Path) -> bool:
    """True when `final/` was written from `loop_checkpoint` at `step` (a finished stage).

    Args:
        run_dir: the stage directory.
        step: the loop's completed steps.
        loop_checkpoint: the loop's last checkpoint.
    """
    meta_path = run_dir / FINAL_DIR / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("step") != step or meta.get("loop_checkpoint") != loop_checkpoint.name:
        return False
    try:
        load_checkpoint(run_dir / FINAL_DIR, groups=[])  # verifies the weights' sha256
    except CheckpointError:
        return False
    return True


# ---------------------------------------------------------------------- the generative bundle


def _weights(ckpt: Checkpoint, name: str, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    ema = f"ema.{name}"
    if use_ema and ema in ckpt.tensors:
        return ckpt.tensors[ema], "ema"
    return ckpt.tensors[name], "raw"


def load_vae(ckpt: Checkpoint, *, use_ema: bool = True) -> tuple[AutoencoderKL, str]:
    """The VAE of a `vae/final` checkpoint, rebuilt from the model config stored in it.

    Args:
        ckpt: the VAE stage's final checkpoint.
        use_ema: take EMA weights when present.

    Returns:
        (VAE in eval mode, "ema" or "raw").
    """
    meta = ckpt.meta
    vae = build_vae(meta["model"]["vae"], in_channels=len(meta["modalities"]))
    state, kind = _weights(ckpt, "vae", use_ema)
    vae.load_state_dict(state)
    return vae.eval(), kind


def load_backbone_unet(ckpt: Checkpoint, *, use_ema: bool = True) -> tuple[DiffusionModelUNet, str]:
    """The UNet of a `backbone/final` checkpoint, rebuilt from the model config stored in it.

    Args:
        ckpt: the backbone stage's final checkpoint.
        use_ema: take EMA weights when present (what the sampler and the ControlNet stage use).

    Returns:
        (UNet in eval mode, "ema" or "raw").
    """
    meta = ckpt.meta
    cond = conditioning_config(meta["model"]["conditioning"])
    unet = build_unet(meta["model"]["unet"], int(meta["latent_channels"]), cond.unet_mask_channels)
    state, kind = _weights(ckpt, "unet", use_ema)
    unet.load_state_dict(state)
    return unet.eval(), kind


def controlnet_weights(ckpt: Checkpoint, *, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The ControlNet state dict of a backbone or site checkpoint.

    Args:
        ckpt: a `backbone/final` or `sites/<site>/controlnet/final` checkpoint.
        use_ema: take EMA weights when present.

    Returns:
        (state dict, "ema" or "raw").
    """
    return _weights(ckpt, "controlnet", use_ema)


def load_generative_models(
    cfg: Any,
    site: str | None = None,
    *,
    device: torch.device | str | None = None,
    use_ema: bool = True,
) -> GenerativeModels:
    """The site's generative bundle from the run's `final/` checkpoints.

    VAE (stage vae), latent scale factor and backbone UNet (stage backbone; EMA weights when
    present), and the ControlNet: the site's adapted one (`sites/<site>/controlnet/final`) when it
    exists, else the source ControlNet trained with the backbone. `provenance["controlnet"]["kind"]`
    says which ("site" or "source") and why.

    Args:
        cfg: the composed config (only `paths.runs` is read).
        site: the site whose ControlNet to use; None = the source ControlNet.
        device: where to put the networks (default: CPU).
        use_ema: take EMA weights where the checkpoint has them.

    Returns:
        The bundle, in eval mode.

    Raises:
        MissingStageError: the VAE or the backbone stage has not run.
        ValueError: the checkpoints do not belong together (e.g. the VAE was retrained after the
            backbone was trained on its latents).
    """
    layout = RunLayout.from_cfg(cfg)
    vae_ckpt = load_final(layout, "vae", needed_by="synthesis")
    bb_ckpt = load_final(layout, "backbone", needed_by="synthesis")
    vae_info, bb_info = checkpoint_info(vae_ckpt), checkpoint_info(bb_ckpt)
    used_vae = bb_ckpt.meta.get("sources", {}).get("vae", {}).get("sha256")
    if used_vae != vae_info["sha256"]:
        raise ValueError(
            f"the backbone at {bb_ckpt.path} was trained on latents of another VAE checkpoint "
            f"(sha256 {used_vae}) than the one at {vae_ckpt.path} ({vae_info['sha256']}); rerun "
            f"`aldm-fed train scale` and `aldm-fed train backbone` (overwrite), or restore that VAE"
        )

    # 1. VAE, architecture from its own checkpoint.
    vm = vae_ckpt.meta
    vae, vae_kind = load_vae(vae_ckpt, use_ema=use_ema)

    # 2. Backbone UNet, with the conditioning it was trained with.
    bm = bb_ckpt.meta
    cond = conditioning_config(bm["model"]["conditioning"])
    latent_channels = int(bm["latent_channels"])
    unet, unet_kind = load_backbone_unet(bb_ckpt, use_ema=use_ema)

    # 3. ControlNet: the site's adapted one, else the source one.
    cn_ckpt, kind, reason = bb_ckpt, "source", "no site given"
    if site is not None:
        path = layout.final("controlnet", site)
        if (path / "meta.json").is_file():
            cn_ckpt, kind, reason = load_checkpoint(path), "site", f"adapted ControlNet of site {site}"
            used_bb = cn_ckpt.meta.get("sources", {}).get("backbone", {}).get("sha256")
            if used_bb != bb_info["sha256"]:
                raise ValueError(
                    f"the ControlNet at {path} was adapted to another backbone checkpoint "
                    f"(sha256 {used_bb}) than {bb_ckpt.path}; rerun `aldm-fed train controlnet "
                    f"site={site}` (overwrite)"
                )
        else:
            reason = f"site {site} has no adapted ControlNet at {path}; using the source one"
            log.warning(reason)
    cm = cn_ckpt.meta
    controlnet = build_controlnet(
        cm["model"]["unet"],
        cm["model"]["controlnet"],
        latent_channels,
        int(vm["vae_downsample"]),
        mask_channels=cond.mask_channels,
        unet_mask_channels=cond.unet_mask_channels,
    )
    cn_state, cn_kind = controlnet_weights(cn_ckpt, use_ema=use_ema)
    controlnet.load_state_dict(cn_state)

    scale_factor = float(bm["scale_factor"])
    provenance = {
        "run": str(layout.root),
        "vae": {**vae_info, "weights": vae_kind},
        "backbone": {**bb_info, "weights": unet_kind},
        "controlnet": {**checkpoint_info(cn_ckpt), "weights": cn_kind, "kind": kind,
                       "site": site, "reason": reason},
        "scale_factor": scale_factor,
    }
    models = GenerativeModels(
        vae=vae,
        unet=unet,
        controlnet=controlnet,
        scale_factor=scale_factor,
        scheduler_cfg=dict(bm["scheduler"]),
        conditioning=cond,
        modalities=list(vm["modalities"]),
        vae_downsample=int(vm["vae_downsample"]),
        provenance=provenance,
    )
    if device is not None:
        models.to(device)
    return models.eval()
