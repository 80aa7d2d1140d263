"""The federation's global models on disk: the server's round checkpoints and finals, and their
installation at a site.

Server (`cfg.fed.state`, `cfg.paths.runs`):

```
<paths.runs>/                     the single-site run layout (aldm_fed.training.artifacts), so
  vae/final  scale/final            `aldm-fed synthesize` and evaluation read a federated run as
  backbone/final                    they read a single-site one
<fed.state>/
  rounds/<phase>/round_0003/      global weights after round 3 of a FedAvg phase (checkpoint;
                                    meta: phase, round, sites, metrics); the last two are kept
  rounds.jsonl                    one line per completed round (phase, round, sites, metrics, time,
                                    cost: wall time, overhead, bytes per site; docs/contracts.md)
```

A restarted server resumes each phase from its newest round checkpoint; a phase whose `final/`
exists is done. At a site, `install_global` writes the server's finals into the site's own run
layout with the server's metadata, and checks the weights' SHA-256 against the server's: the site
then runs the unchanged single-site stages (ControlNet adaptation, synthesis) on top of them.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from aldm_fed.checkpoints import Checkpoint, load_checkpoint, plain_config, save_checkpoint
from aldm_fed.diffusion.conditioning import conditioning_config
from aldm_fed.io import atomic_write_text
from aldm_fed.models import build_vae
from aldm_fed.models.vae import vae_downsample_factor
from aldm_fed.training.artifacts import RunLayout, checkpoint_identity
from aldm_fed.training.backbone import build_diffusion_networks, diffusion_model_config

__all__ = [
    "ROUNDS_LOG",
    "ServerState",
    "backbone_meta",
    "initial_weights",
    "install_global",
    "vae_meta",
]

log = logging.getLogger(__name__)

ROUNDS_LOG = "rounds.jsonl"
_KEEP_ROUNDS = 2
# Keys save_checkpoint writes itself; a received meta keeps its sha256 for the check, not for saving.
_FORMAT_KEYS = frozenset({"format", "format_version", "created", "versions", "groups", "weights"})


def initial_weights(cfg: Any, phase: str) -> dict[str, dict[str, torch.Tensor]]:
    """The first global weights of a FedAvg phase, made on the server from `cfg.seed`.

    They are the weights a single-site run would start from (same builders, same seed), so every
    site starts the first round from the same point.

    Args:
        cfg: the composed config.
        phase: "vae" or "backbone".
    """
    torch.manual_seed(int(cfg.seed))
    if phase == "vae":
        return {"vae": build_vae(cfg.model.vae, in_channels=len(cfg.data.modalities)).state_dict()}
    if phase == "backbone":
        unet, controlnet = build_diffusion_networks(
            cfg, int(cfg.model.vae.latent_channels), vae_downsample_factor(cfg.model.vae)
        )
        return {"unet": unet.state_dict(), "controlnet": controlnet.state_dict()}
    raise ValueError(f"phase {phase!r} has no global weights")


def vae_meta(cfg: Any, *, rounds: int, local_steps: int, sites: list[str], metrics: Mapping[str, float]) -> dict[str, Any]:
    """Metadata of the global VAE's `final/`: what `load_vae` and the latent cache need.

    Args:
        cfg: the composed config.
        rounds: FedAvg rounds run.
        local_steps: optimizer steps per site per round.
        sites: the sites that trained it.
        metrics: the last round's aggregated training metrics.
    """
    return {
        "stage": "vae",
        "step": rounds * local_steps,
        "federated": {"rounds": rounds, "local_steps": local_steps, "sites": list(sites)},
        "model": {"vae": plain_config(cfg.model.vae)},
        "modalities": list(cfg.data.modalities),
        "in_channels": len(cfg.data.modalities),
        "latent_channels": int(cfg.model.vae.latent_channels),
        "vae_downsample": vae_downsample_factor(cfg.model.vae),
        "metrics": dict(metrics),
    }


def backbone_meta(
    cfg: Any,
    *,
    vae_ckpt: Checkpoint,
    scale_ckpt: Checkpoint,
    rounds: int,
    local_steps: int,
    sites: list[str],
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    """Metadata of the global backbone's `final/`: what `load_generative_models` and the site
    ControlNet stage read (models, scheduler, scale factor, and the VAE it was trained under).

    Args:
        cfg: the composed config.
        vae_ckpt: the global VAE final (its sha256 chains the two).
        scale_ckpt: the global scale final.
        rounds, local_steps, sites, metrics: as in `vae_meta`.
    """
    conditioning_config(cfg.model.conditioning)  # validated here, not first at a site
    return {
        "stage": "backbone",
        "step": rounds * local_steps,
        "federated": {"rounds": rounds, "local_steps": local_steps, "sites": list(sites)},
        "scale_factor": float(scale_ckpt.meta["scale_factor"]),
        # Sites encode their latents with the raw global VAE (it has no EMA), so "raw".
        "sources": {"vae": {**checkpoint_identity(vae_ckpt), "weights": "raw"},
                    "scale": checkpoint_identity(scale_ckpt)},
        "model": diffusion_model_config(cfg),
        "scheduler": plain_config(cfg.scheduler),
        "latent_channels": int(vae_ckpt.meta["latent_channels"]),
        "vae_downsample": int(vae_ckpt.meta["vae_downsample"]),
        "metrics": dict(metrics),
    }


def install_global(
    layout: RunLayout, stage: str, groups: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any]
) -> Checkpoint:
    """Write a global `final/` the server sent into a site's run layout (no-op when present).

    Args:
        layout: the site's run layout.
        stage: "vae", "scale" or "backbone".
        groups: the weights.
        meta: the server's checkpoint metadata, including `weights.sha256`.

    Raises:
        ValueError: the written weights do not hash to the server's sha256 (altered or
            mis-decoded on the way).
    """
    expected = str(meta.get("weights", {}).get("sha256", ""))
    path = layout.final(stage)
    if (path / "meta.json").is_file():
        current = load_checkpoint(path, groups=[])
        if current.meta["weights"]["sha256"] == expected:
            return load_checkpoint(path)
    save_checkpoint(path, groups, {k: v for k, v in meta.items() if k not in _FORMAT_KEYS})
    ckpt = load_checkpoint(path)
    got = ckpt.meta["weights"]["sha256"]
    if got != expected:
        shutil.rmtree(path)
        raise ValueError(
            f"the global {stage} weights written to {path} hash to {got[:16]}..., the server's to "
            f"{expected[:16]}...: they were altered or mis-decoded on the way; nothing was installed"
        )
    return ckpt


class ServerState:
    """The server's side of a federated run on disk (see the module docstring).

    Args:
        cfg: the composed config (`paths.runs`, `fed.state`).
    """

    def __init__(self, cfg: Any) -> None:
        self.layout = RunLayout.from_cfg(cfg)
        self.root = Path(str(cfg.fed.state))

    def round_dir(self, phase: str, rnd: int) -> Path:
        return self.root / "rounds" / phase / f"round_{rnd:04d}"

    def last_round(self, phase: str, inputs: Mapping[str, Any]) -> tuple[int, Checkpoint | None]:
        """(number, checkpoint) of the newest complete round of `phase` on `inputs`; (0, None)
        when none. Rounds on other inputs (e.g. a backbone trained under an older VAE) are
        deleted: they cannot be continued.

        Args:
            phase: "vae" or "backbone".
            inputs: what the phase's rounds build on (`{}` for the VAE; the backbone: the
                identities of the global VAE and scale checkpoints).
        """
        folder = self.root / "rounds" / phase
        for path in sorted(folder.glob("round_*"), reverse=True) if folder.is_dir() else []:
            if not (path / "meta.json").is_file():
                continue
            ckpt = load_checkpoint(path)
            if ckpt.meta.get("inputs", {}) == dict(inputs):
                return int(path.name.split("_")[1]), ckpt
            log.warning("[%s] discarding %s: it was trained on other inputs", phase, path)
            shutil.rmtree(path)
        return 0, None

    def save_round(
        self,
        phase: str,
        rnd: int,
        groups: Mapping[str, Mapping[str, torch.Tensor]],
        info: Mapping[str, Any],
        log_only: Mapping[str, Any] | None = None,
    ) -> Path:
        """Log then checkpoint one completed round (atomic); keep the newest `_KEEP_ROUNDS`.

        The log line comes first: a kill between the two leaves a line for a round without a
        checkpoint, which `truncate_log` drops when the round is redone.

        Args:
            phase, rnd: the round.
            groups: the global weights after it.
            info: sites, metrics, inputs: in the log line and the checkpoint's meta.
            log_only: fields for the log line only (the round's "cost").
        """
        line = {"phase": phase, "round": rnd, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **plain_config(dict(info)), **plain_config(dict(log_only or {}))}
        with open(self.root / ROUNDS_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        path = save_checkpoint(self.round_dir(phase, rnd), groups, {"phase": phase, "round": rnd, **info})
        for old in sorted((self.root / "rounds" / phase).glob("round_*"))[:-_KEEP_ROUNDS]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def truncate_log(self, phase: str, done: int) -> None:
        """Drop log lines of `phase` rounds after `done` (rounds that are about to be redone)."""
        path = self.root / ROUNDS_LOG
        if not path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            return
        kept = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not (line.get("phase") == phase and int(line.get("round", 0)) > done):
                kept.append(raw)
        atomic_write_text(path, "".join(k + "\n" for k in kept))

    def rounds(self) -> list[dict[str, Any]]:
        """Every logged round, oldest first."""
        path = self.root / ROUNDS_LOG
        if not path.is_file():
            return []
        out = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return out
