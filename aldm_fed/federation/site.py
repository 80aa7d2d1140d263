"""A site's side of the federated run: one function per phase, over the single-site library.

Each function takes the composed config, the site, and what the server sent, does the work with
the same functions `aldm-fed train` / `synthesize` / `evaluate` call, and returns the reply's
content built by `sharing.site_reply` (the allow-list). Everything else stays in the site's state
folder, which is a single-site run layout (`aldm_fed.training.artifacts`):

```
<state>/
  vae/final  backbone/final          the global models, installed as the server sent them
  sites/<site>/controlnet/           the site's own ControlNet (never sent)
  sites/<site>/synthesis/            its synthetic volumes; sites/<site>/classifier/ its classifiers
  federation/<phase>/round_0003-<init sha>/   the site's local run of a FedAvg round (resumable)
  latents/  cache/                   encoded latents and the preprocessed cases
```

A site process that is killed and restarted finds all of it on disk: a round whose global
weights it already trained on resumes from its own checkpoint; finished stages are not redone.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict
from omegaconf import DictConfig, OmegaConf

from aldm_fed import __version__
from aldm_fed.checkpoints import load_checkpoint
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.federation.global_models import install_global
from aldm_fed.federation.records import (
    from_array_record,
    to_array_record,
    transfer_dtype,
)
from aldm_fed.federation.sharing import ALLOW_LIST, PROTOCOL, site_reply
from aldm_fed.training.artifacts import RunLayout, load_final
from aldm_fed.training.backbone import train_backbone
from aldm_fed.training.common import state_sha256
from aldm_fed.training.loop import stable_seed
from aldm_fed.training.scale import latent_statistics
from aldm_fed.training.stages import cached_latents, run_stage, vae_source
from aldm_fed.training.vae import train_vae

__all__ = ["Site", "backbone_round", "hello", "local_phase", "scale_statistics", "vae_round"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """One hospital of the federation.

    Args:
        name: its site name (its manifest is `<data>/manifests/<name>.json`).
        data: its cohort folder (case folders + manifests/).
        state: its state folder (models, synthetic volumes, caches; see the module docstring).
    """

    name: str
    data: Path
    state: Path

    def config(self, cfg: Any) -> DictConfig:
        """`cfg` pointed at this site's data and state: it is its own single-site run."""
        out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        out.site = self.name
        out.source_sites = [self.name]
        out.paths.cohort = str(self.data)
        out.paths.runs = str(self.state)
        out.paths.cache = str(self.state / "cache" / str(cfg.data.size))
        out.paths.synthesis = str(self.state / "sites" / self.name / "synthesis")
        return out

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.state)

    def counts(self) -> dict[str, int]:
        """Cases per split in the site's manifest."""
        _, manifest = site_manifests(self.data, [self.name])[self.name]
        return {split: len(manifest.cases(split)) for split in ("source", "target", "test")}


def hello(site: Site, cfg: Any | None = None, request: Mapping[str, Any] | None = None) -> RecordDict:
    """Who the site is and what it holds (case counts only), for the server's roll call.

    When the server sends the shapes of the shared networks (`request["model-shapes"]`), the site
    first checks that it can serve the run (`compatibility`): its code builds the same shapes from
    the run config, and its data holds every manifest case with the run's modalities. Its reply
    then carries the fingerprint of its own shapes (`model-sha256`), which the server compares.

    Args:
        site: the site.
        cfg: the run's composed config (None: no compatibility check, as protocol 1 did).
        request: the server's hello config ("protocol", "model-sha256", "model-shapes").

    Raises:
        FederationError: the site cannot serve the run; the message names the site and the first
            differing network key or the cases whose files are missing.
    """
    from aldm_fed.federation.compatibility import (
        data_problems,
        decode_shapes,
        model_shapes,
        shape_mismatches,
        shapes_fingerprint,
    )
    from aldm_fed.federation.strategy import FederationError

    counts = site.counts()
    config: dict[str, str | int] = {"site": site.name, "protocol": PROTOCOL, "version": __version__}
    if cfg is not None and request is not None and "model-shapes" in request:
        if int(request.get("protocol", PROTOCOL)) != PROTOCOL:
            # the server names the mismatch (both versions) once it reads the reply
            return site_reply("hello", metrics={f"n-{k}": v for k, v in counts.items()}, config=config)
        scfg = site.config(cfg)
        shapes = model_shapes(scfg)
        fingerprint = shapes_fingerprint(shapes)
        if fingerprint != str(request.get("model-sha256")):
            diff = shape_mismatches(decode_shapes(str(request["model-shapes"])), shapes)
            raise FederationError(
                f"site {site.name}: the shared networks this site builds from the run config differ from "
                f"the server's in {len(diff)} key(s), first {diff[0] if diff else 'none (fingerprint only)'}; "
                f"install the same aldm-fed and MONAI versions as the server"
            )
        problems = data_problems(site.data, site.name, list(scfg.data.modalities))
        if problems:
            raise FederationError(
                f"site {site.name}: its data cannot serve this run (data.modalities="
                f"{list(scfg.data.modalities)}): {len(problems)} problem(s), e.g. {'; '.join(problems[:3])}"
            )
        config["model-sha256"] = fingerprint
    return site_reply("hello", metrics={f"n-{k}": v for k, v in counts.items()}, config=config)


def _round_config(cfg: DictConfig, phase: str, rnd: int, local_steps: int) -> DictConfig:
    # Each site and round draws its own batches and noise; the budget is the phase's local steps.
    out = cfg.copy()
    out.seed = stable_seed(int(cfg.seed), str(cfg.site), phase, rnd)
    out.train[phase].max_steps = int(local_steps)
    out.train[phase].ckpt_every = int(min(int(cfg.train[phase].ckpt_every), int(local_steps)))
    if phase == "vae":
        out.train.vae.eval.split = "none"  # rounds report training losses; quality is measured once
    return out


def _round_dir(site: Site, phase: str, rnd: int, init: Mapping[str, Mapping[str, torch.Tensor]]) -> Path:
    # Keyed by the global weights too: a server that redoes a round with other weights gets a
    # fresh run, never a resumed one built on different starting weights.
    return site.state / "federation" / phase / f"round_{rnd:04d}-{state_sha256(init)[:12]}"


def _prune_rounds(current: Path) -> None:
    for old in current.parent.glob("round_*"):
        if old != current and old.name < current.name:
            shutil.rmtree(old, ignore_errors=True)


def _train_metrics(phase: str, metrics: Mapping[str, float], n: int) -> dict[str, float]:
    rule = ALLOW_LIST[phase]
    return {"num-examples": n, **{k: float(v) for k, v in metrics.items() if rule.metric_allowed(k)}}


def vae_round(
    cfg: Any, site: Site, global_groups: Mapping[str, Mapping[str, torch.Tensor]], rnd: int, local_steps: int
) -> RecordDict:
    """One FedAvg round of the VAE at the site: `local_steps` steps from the global weights.

    The discriminator (when `train.vae.adv_weight` > 0) never leaves the site: it carries on from
    the site's previous round.

    Args:
        cfg: the composed config.
        site: the site.
        global_groups: {"vae": state dict} from the server.
        rnd: the round number (from 1).
        local_steps: optimizer steps this round.
    """
    scfg = _round_config(site.config(cfg), "vae", rnd, local_steps)
    volumes = load_split(scfg, "source", sites=[site.name], progress=False)
    init = {"vae": global_groups["vae"]}
    run_dir = _round_dir(site, "vae", rnd, init)
    previous = sorted(p for p in run_dir.parent.glob("round_*") if p.name < run_dir.name)
    if previous and (previous[-1] / "final" / "meta.json").is_file():
        prev = load_checkpoint(previous[-1] / "final")
        if "disc" in prev.tensors and float(scfg.train.vae.adv_weight) > 0:
            init = {**init, "disc": prev.tensors["disc"]}
    started = time.perf_counter()  # the round's compute, for the server's overhead accounting
    result = train_vae(scfg, volumes, run_dir, init_state=init, progress=False)
    compute = time.perf_counter() - started
    weights = load_checkpoint(result.checkpoint, groups=["vae"]).tensors["vae"]
    _prune_rounds(run_dir)
    log.info("site %s: vae round %d: %d steps on %d cases, loss %.4g", site.name, rnd, local_steps,
             len(volumes), result.metrics.get("loss", float("nan")))
    return site_reply("vae", metrics={**_train_metrics("vae", result.metrics, len(volumes)), "compute-seconds": compute},
                      arrays=to_array_record({"vae": weights}, transfer_dtype(cfg)))


def scale_statistics(
    cfg: Any, site: Site, vae_groups: Mapping[str, Mapping[str, torch.Tensor]], vae_meta: Mapping[str, Any]
) -> RecordDict:
    """Install the global VAE; reply with the sums over the site's source latents.

    Count, sum and sum of squares are all the server needs for the pooled standard deviation
    (`LatentStats.merge`); a site without source cases installs the VAE and sends zeros.
    """
    scfg = site.config(cfg)
    vae_ckpt = install_global(site.layout, "vae", vae_groups, vae_meta)
    if site.counts()["source"] == 0:
        return site_reply("scale", metrics={"num-examples": 0, "latent-count": 0, "latent-sum": 0.0,
                                            "latent-sum-sq": 0.0})
    volumes = load_split(scfg, "source", sites=[site.name], progress=False)
    latents = cached_latents(scfg, site.layout, vae_ckpt, volumes, False)
    stats = latent_statistics(None, latents)
    log.info("site %s: latent statistics of %d source cases", site.name, len(volumes))
    return site_reply("scale", metrics={"num-examples": len(volumes), "latent-count": int(stats.count),
                                        "latent-sum": float(stats.sum), "latent-sum-sq": float(stats.sum_sq)})


def backbone_round(
    cfg: Any,
    site: Site,
    global_groups: Mapping[str, Mapping[str, torch.Tensor]],
    rnd: int,
    local_steps: int,
    *,
    scale_factor: float,
    scale_sha256: str,
) -> RecordDict:
    """One FedAvg round of the backbone (UNet + source ControlNet) on the site's source latents.

    Args:
        cfg, site, rnd, local_steps: as in `vae_round`.
        global_groups: {"unet": ..., "controlnet": ...} from the server.
        scale_factor: the global latent scale factor.
        scale_sha256: the global scale checkpoint's sha256 (recorded as a source).
    """
    scfg = _round_config(site.config(cfg), "backbone", rnd, local_steps)
    vae_ckpt = load_final(site.layout, "vae", needed_by="backbone round")
    volumes = load_split(scfg, "source", sites=[site.name], progress=False)
    latents = cached_latents(scfg, site.layout, vae_ckpt, volumes, False)
    init = {"unet": global_groups["unet"], "controlnet": global_groups["controlnet"]}
    run_dir = _round_dir(site, "backbone", rnd, init)
    started = time.perf_counter()
    result = train_backbone(
        scfg, latents, run_dir, scale_factor=scale_factor,
        sources={"vae": vae_source(vae_ckpt), "scale": {"sha256": scale_sha256}},
        init_state=init, progress=False,
    )
    compute = time.perf_counter() - started
    weights = load_checkpoint(result.checkpoint, groups=["unet", "controlnet"]).tensors
    _prune_rounds(run_dir)
    log.info("site %s: backbone round %d: %d steps on %d cases, loss %.4g", site.name, rnd, local_steps,
             len(latents), result.metrics.get("loss", float("nan")))
    return site_reply("backbone", metrics={**_train_metrics("backbone", result.metrics, len(latents)),
                                           "compute-seconds": compute},
                      arrays=to_array_record({"unet": weights["unet"], "controlnet": weights["controlnet"]},
                                             transfer_dtype(cfg)))


def local_phase(
    cfg: Any,
    site: Site,
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    vae_meta: Mapping[str, Any],
    backbone_meta: Mapping[str, Any],
) -> RecordDict:
    """Install the global VAE and backbone, then at the site only: adapt its ControlNet,
    synthesize, train and test the classifiers. Reply: metrics on its held-out real cases.

    The VAE comes again (it was installed in the scale phase) so that a site that lost its state
    or joined late can still adapt. Each step resumes from the site's disk (finished ones are
    reported, not redone).

    Args:
        cfg: the composed config.
        site: the site.
        groups: {"vae", "unet", "controlnet"} global weights.
        vae_meta, backbone_meta: the server's checkpoint metadata of each.
    """
    from aldm_fed.evaluation.site import evaluate_site
    from aldm_fed.synthesis import synthesize_site

    scfg = site.config(cfg)
    install_global(site.layout, "vae", {"vae": groups["vae"]}, vae_meta)
    install_global(site.layout, "backbone", {k: groups[k] for k in ("unet", "controlnet")}, backbone_meta)
    steps = cfg.fed.phases.local
    counts = site.counts()
    metrics: dict[str, float] = {f"n_{k}_cases": v for k, v in counts.items()}
    if counts["target"] == 0:
        log.warning("site %s has no target cases: nothing to adapt, synthesize or evaluate", site.name)
        return site_reply("local", metrics=metrics)
    if steps.adapt:
        adapted = run_stage(scfg, "controlnet", progress=False)
        metrics |= {f"adapt.{k}": v for k, v in adapted.metrics.items() if ALLOW_LIST["local"].metric_allowed(f"adapt.{k}")}
        log.info("site %s: ControlNet adapted (%d steps)", site.name, adapted.step)
    if steps.synthesize:
        summary = synthesize_site(scfg, site.name, progress=False)
        metrics["synthesis.n_volumes"] = len(summary.ids)
        if summary.audit is not None:  # ran here, at the site: only its counts and statistics leave
            metrics |= summary.audit.summary()
        log.info("site %s: synthesis done", site.name)
    if steps.evaluate and counts["test"] > 0:
        evaluation = evaluate_site(scfg, site.name, progress=False)
        metrics |= evaluation.metrics()
        log.info("site %s: classifier regimes evaluated", site.name)
    return site_reply("local", metrics=metrics)


def arrays_of(content: RecordDict, groups: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """The parameter groups of a server message."""
    return from_array_record(content["arrays"], groups)
