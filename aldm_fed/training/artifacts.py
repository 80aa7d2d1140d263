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
  latents/<vae_sha16>-<weights>-<precision>-<prep_hash>/
                                    posterior-mean latents, UNSCALED, one <case_id>.npy each,
    index.json                      float32 (latent_channels, S/f, S/f, S/f); encoded once per VAE
                                    checkpoint, weight kind (ema|raw), precision and preprocessing,
                                    shared by every later stage
  scale/
    final/                          checkpoint: group "stats" (count, sum, sum_sq: float64);
                                    meta: scale_factor = 1 / std, sources.vae (sha256)
    metrics.json
  backbone/                         run_loop directory (UNet + source ControlNet, trained jointly)
    final/                          groups "unet", "ema.unet", "controlnet", "ema.controlnet";
                                    meta: scale_factor, sources.vae (sha256, weights: the VAE
                                    weights that encoded the latents), model.{unet, controlnet,
                                    conditioning}, scheduler, latent_channels
    metrics.json
  sites/<site>/controlnet/          run_loop directory (the site's ControlNet; backbone frozen)
    final/                          groups "controlnet", "ema.controlnet"; meta: init (source |
                                    unet), sources.{vae, backbone}, scale_factor, site, data
    metrics.json
  sites/<site>/gan/                 run_loop directory (the pix2pix GAN baseline on the site's K
    final/                          target cases): groups "generator", "disc"; meta: model.gan,
                                    modalities, size, site, data, train_cases
    metrics.json
```

Every `final/` is written atomically after the stage's last step, from the run's last
checkpoint, so a `final/` exists only for a complete stage. Later stages read only `final/`
checkpoints, and record the sha256 of each one they used (`sources`, `checkpoint_identity`: never
a path, so a moved run folder still resumes), so a stale chain (a VAE retrained after its
backbone) is detected rather than silently mixed.

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
from aldm_fed.models import build_controlnet, build_unet, build_vae, controlnet_conditioning_scale

__all__ = [
    "FINAL_DIR",
    "METRICS_JSON",
    "STAGES",
    "SITE_STAGES",
    "MissingStageError",
    "RunLayout",
    "StageResult",
    "LATENT_VAE_WEIGHTS",
    "checkpoint_identity",
    "checkpoint_info",
    "controlnet_weights",
    "existing_result",
    "load_backbone_unet",
    "load_final",
    "load_generative_models",
    "latent_vae_weights",
    "load_vae",
    "read_metrics_json",
    "write_final",
]

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("vae", "scale", "backbone", "controlnet", "gan")
# Stages trained per site (their folder is sites/<site>/<stage>): the site's ControlNet and its GAN baseline.
SITE_STAGES: tuple[str, ...] = ("controlnet", "gan")
FINAL_DIR = "final"
METRICS_JSON = "metrics.json"
LATENTS_DIR = "latents"
SITES_DIR = "sites"
# Which VAE weights encode the cached latents: EMA when the checkpoint has them, else raw. The
# kind actually used is recorded with the backbone (`sources.vae.weights`), and sampling decodes
# with the same weights.
LATENT_VAE_WEIGHTS = "ema"

# What to run when a stage's checkpoint is missing.
_HINTS = {
    "vae": "aldm-fed train vae",
    "scale": "aldm-fed train scale",
    "backbone": "aldm-fed train backbone",
    "controlnet": "aldm-fed train controlnet site=<SITE>",
    "gan": "aldm-fed train gan site=<SITE>",
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
        """The run_loop directory of a stage (the site's, for `controlnet` and `gan`).

        Args:
            stage: one of `STAGES`.
            site: required for `controlnet` and `gan` (`SITE_STAGES`).
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        if stage in SITE_STAGES:
            if not site:
                raise ValueError(f"the {stage} stage is per site: give a site (site=<SITE>)")
            return self.root / SITES_DIR / site / stage
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


def checkpoint_identity(ckpt: Checkpoint) -> dict[str, Any]:
    """What a later stage depends on in a checkpoint: the sha256 of its weights, nothing else.

    This (not `checkpoint_info`) goes into run identities and `sources`, so moving the run folder
    or naming it by an absolute instead of a relative path does not make a run "different".

    Args:
        ckpt: a loaded checkpoint.
    """
    return {"sha256": ckpt.meta["weights"]["sha256"]}


def checkpoint_info(ckpt: Checkpoint) -> dict[str, Any]:
    """Provenance of a checkpoint for humans (manifests, logs): path, step, sha256.

    Not for run identities: use `checkpoint_identity`.

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


def existing_result(
    stage: str, run_dir: Path, result: Any, loop: Any, site: str | None = None
) -> StageResult | None:
    """The stored result when the loop had nothing left to do and `final/` matches it.

    Args:
        stage: the stage name.
        run_dir: the stage directory.
        result: what run_loop returned (`LoopResult`).
        loop: the loop settings (`LoopConfig`).
        site: the site, for `controlnet`.
    """
    if result.resumed_from != loop.max_steps or not final_is_current(run_dir, result.step, result.checkpoint):
        return None
    doc = read_metrics_json(run_dir)
    return StageResult(
        stage=stage, run_dir=run_dir, checkpoint=run_dir / FINAL_DIR, step=result.step, site=site,
        resumed_from=result.resumed_from, skipped=True,
        metrics={k: float(v) for k, v in doc.get("summary", {}).items()},
    )


# ---------------------------------------------------------------------- the generative bundle


def _weights(
    ckpt: Checkpoint, name: str, use_ema: bool, weights: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    ema = f"ema.{name}"
    if weights is not None:  # pinned by a record: exactly these, never a fallback
        if weights not in ("ema", "raw"):
            raise ValueError(f"{ckpt.path}: weights must be 'ema' or 'raw', got {weights!r}")
        group = ema if weights == "ema" else name
        if group not in ckpt.tensors:
            raise ValueError(f"{ckpt.path} has no {group!r} weights, but they are the ones recorded as used")
        return ckpt.tensors[group], weights
    if use_ema and ema in ckpt.tensors:
        return ckpt.tensors[ema], "ema"
    return ckpt.tensors[name], "raw"


def latent_vae_weights(vae_ckpt: Checkpoint) -> str:
    """"ema" or "raw": the VAE weights the latent cache is encoded with (`LATENT_VAE_WEIGHTS`,
    when the checkpoint has them).

    Args:
        vae_ckpt: the VAE stage's final checkpoint.
    """
    return _weights(vae_ckpt, "vae", LATENT_VAE_WEIGHTS == "ema")[1]


def load_vae(
    ckpt: Checkpoint, *, use_ema: bool = True, weights: str | None = None
) -> tuple[AutoencoderKL, str]:
    """The VAE of a `vae/final` checkpoint, rebuilt from the model config stored in it.

    Args:
        ckpt: the VAE stage's final checkpoint.
        use_ema: take EMA weights when present.
        weights: "ema" or "raw" exactly (overrides `use_ema`; an error when absent).

    Returns:
        (VAE in eval mode, "ema" or "raw").
    """
    meta = ckpt.meta
    vae = build_vae(meta["model"]["vae"], in_channels=len(meta["modalities"]))
    state, kind = _weights(ckpt, "vae", use_ema, weights)
    vae.load_state_dict(state)
    return vae.eval(), kind


def load_backbone_unet(
    ckpt: Checkpoint, *, use_ema: bool = True, weights: str | None = None
) -> tuple[DiffusionModelUNet, str]:
    """The UNet of a `backbone/final` checkpoint, rebuilt from the model config stored in it.

    Args:
        ckpt: the backbone stage's final checkpoint.
        use_ema: take EMA weights when present (what the sampler and the ControlNet stage use).
        weights: "ema" or "raw" exactly (overrides `use_ema`; an error when absent).

    Returns:
        (UNet in eval mode, "ema" or "raw").
    """
    meta = ckpt.meta
    cond = conditioning_config(meta["model"]["conditioning"])
    unet = build_unet(meta["model"]["unet"], int(meta["latent_channels"]), cond.unet_mask_channels)
    state, kind = _weights(ckpt, "unet", use_ema, weights)
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

    VAE (stage vae), latent scale factor and backbone UNet (stage backbone), and the ControlNet:
    the site's adapted one (`sites/<site>/controlnet/final`) when it exists, else the source
    ControlNet trained with the backbone. `provenance["controlnet"]["kind"]` says which ("site"
    or "source") and why.

    Every network gets the weights it was trained against, where a checkpoint records them:
    - the VAE: the weights that encoded the backbone's latents (`sources.vae.weights` of the
      backbone; older backbones: `LATENT_VAE_WEIGHTS`, what encoded them);
    - the UNet, with a site ControlNet: the backbone weights that ControlNet was adapted to
      (`sources.backbone.weights`, i.e. `train.controlnet.backbone_weights`).
    `use_ema` picks only what no record pins: the ControlNet's own weights, and the UNet when it
    runs with the source ControlNet (then both take EMA or both raw, as trained together).

    Args:
        cfg: the composed config (only `paths.runs` is read).
        site: the site whose ControlNet to use; None = the source ControlNet.
        device: where to put the networks (default: CPU).
        use_ema: take EMA weights where the checkpoint has them and no record pins the choice.

    Returns:
        The bundle, in eval mode.

    Raises:
        MissingStageError: the VAE or the backbone stage has not run.
        ValueError: the checkpoints do not belong together (e.g. the VAE was retrained after the
            backbone was trained on its latents), or recorded weights are missing.
    """
    layout = RunLayout.from_cfg(cfg)
    vae_ckpt = load_final(layout, "vae", needed_by="synthesis")
    bb_ckpt = load_final(layout, "backbone", needed_by="synthesis")
    vae_info, bb_info = checkpoint_info(vae_ckpt), checkpoint_info(bb_ckpt)
    bm = bb_ckpt.meta
    used_vae = bm.get("sources", {}).get("vae", {})
    if used_vae.get("sha256") != vae_info["sha256"]:
        raise ValueError(
            f"the backbone at {bb_ckpt.path} was trained on latents of another VAE checkpoint "
            f"(sha256 {used_vae.get('sha256')}) than the one at {vae_ckpt.path} ({vae_info['sha256']}); "
            f"rerun `aldm-fed train scale` and `aldm-fed train backbone` (overwrite), or restore that VAE"
        )

    # 1. The ControlNet checkpoint: the site's adapted one, else the source one.
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

    # 2. VAE: the weights that encoded the latents the backbone learned (decode = inverse of encode).
    vm = vae_ckpt.meta
    vae_pin = used_vae.get("weights") or latent_vae_weights(vae_ckpt)
    vae, vae_kind = load_vae(vae_ckpt, weights=vae_pin)

    # 3. Backbone UNet, with the conditioning it was trained with; a site ControlNet pins which
    #    of its weights (the ones it was adapted against).
    cond = conditioning_config(bm["model"]["conditioning"])
    latent_channels = int(bm["latent_channels"])
    unet_pin = cm.get("sources", {}).get("backbone", {}).get("weights") if kind == "site" else None
    unet, unet_kind = load_backbone_unet(bb_ckpt, use_ema=use_ema, weights=unet_pin)

    # 4. The ControlNet network, from the model config stored with it.
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
        "vae": {**vae_info, "weights": vae_kind,
                "pinned_by": "backbone sources.vae.weights" if used_vae.get("weights") else "latent default"},
        "backbone": {**bb_info, "weights": unet_kind,
                     "pinned_by": "site ControlNet sources.backbone.weights" if unet_pin else None},
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
        conditioning_scale=controlnet_conditioning_scale(cm["model"]["controlnet"]),
        provenance=provenance,
    )
    if device is not None:
        models.to(device)
    return models.eval()
