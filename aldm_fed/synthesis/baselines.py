"""Synthetic sets of the generative baselines, paired with a site's ALDM set.

Each baseline replaces one part of ALDM and makes the same synthetic cases, so the classifier
comparison (`real_syn_<b>`, `syn_only_<b>`: `aldm_fed.evaluation.regimes`) differs only in the
generator:

| baseline | generator | what it tests |
|---|---|---|
| `noadapt` | the shared VAE + backbone with the SOURCE ControlNet (the backbone's own `controlnet` group, trained with it on the source sites; no site adaptation) | what the site's few-shot ControlNet adds |
| `concat` | the shared VAE + backbone UNet with the mask concatenated to its input only; no ControlNet at all | what a ControlNet adds over plain mask concatenation |
| `gan` | the mask-conditioned 3D GAN trained on the same K cases (`aldm_fed.synthesis.gan`, `aldm-fed train gan --site X`) | diffusion vs a GAN, as ALDM's paper compares |

```python
summary = synthesize_baseline(cfg, "C", "noadapt")   # runs/<run>/sites/C/baselines/noadapt/
```

Pairing: `noadapt` and `concat` call the same `synthesize` as `synthesize_site` with the same mask
cases, hosts, `synthesis` settings and seed, so sample i of a baseline has the same mask, host and
initial latent noise as sample i of the ALDM set (`aldm_fed.synthesis.run`: masks and noise depend
only on (seed, i)); only the networks differ. The folder layout is the synthesis one (BraTS case
folders, `synthesis.json`, `labels.csv`, `montage.png`) and each set gets its own memorisation audit
(`audit.json`), so `evaluate_site` leaves its near-copies out as for the ALDM set.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from aldm_fed.data.cache import CaseCache
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.diffusion.pipeline import GenerativeModels
from aldm_fed.evaluation.regimes import SYNTHETIC_BASELINES
from aldm_fed.synthesis.audit import audit_site
from aldm_fed.synthesis.run import SynthesisSummary, synthesize
from aldm_fed.synthesis.site import site_config
from aldm_fed.training.artifacts import SITES_DIR, RunLayout, load_generative_models
from aldm_fed.training.device import autocast_context, resolve_device

__all__ = ["BASELINES_DIR", "SYNTHETIC_BASELINES", "baseline_dir", "baseline_models", "synthesize_baseline"]

BASELINES_DIR = "baselines"  # <paths.runs>/sites/<site>/baselines/<name>/


def _check_name(name: str) -> None:
    if name not in SYNTHETIC_BASELINES:
        raise ValueError(f"unknown synthetic baseline {name!r}; expected one of {SYNTHETIC_BASELINES} "
                         "(config baselines.enabled)")


def baseline_dir(cfg: Any, site: str, name: str) -> Path:
    """Where baseline `name`'s synthetic set of `site` lives: `<paths.runs>/sites/<site>/baselines/<name>`.

    Args:
        cfg: the composed config (reads `paths.runs`).
        site: the site.
        name: one of `SYNTHETIC_BASELINES`.
    """
    _check_name(name)
    if name == "gan":  # the GAN module's own folder (`paths.gan_synthesis`, by default this layout)
        from aldm_fed.synthesis.gan import gan_synthesis_dir  # imports the GAN training code

        return Path(gan_synthesis_dir(cfg, site))
    return RunLayout.from_cfg(cfg).root / SITES_DIR / site / BASELINES_DIR / name


def baseline_models(models: GenerativeModels, name: str) -> GenerativeModels:
    """The diffusion baseline's bundle from the SOURCE bundle (`load_generative_models(cfg, None)`).

    Args:
        models: the VAE + backbone with the source ControlNet.
        name: `noadapt` (returned as it is) or `concat` (the ControlNet removed: the UNet sees the
            concatenated mask only).

    Raises:
        ValueError: `concat` on a backbone that does not concatenate the mask (it would be
            unconditional), a bundle with a site ControlNet, or another name.
    """
    kind = models.provenance.get("controlnet", {}).get("kind") if isinstance(models.provenance, dict) else None
    if kind not in (None, "source"):
        raise ValueError(f"baseline {name}: expected the source bundle (load_generative_models(cfg, None)), "
                         f"got a {kind!r} ControlNet")
    if name == "noadapt":
        return replace(models, provenance={**models.provenance, "baseline": "noadapt"})
    if name == "concat":
        if not models.conditioning.concat:
            raise ValueError("baseline concat: the backbone was trained without mask concatenation "
                             "(model.conditioning.concat=false); without its ControlNet it would ignore the mask")
        return replace(models, controlnet=None,
                       provenance={**models.provenance, "controlnet": None, "baseline": "concat"})
    raise ValueError(f"baseline {name!r} is not a diffusion baseline; expected noadapt or concat")


def synthesize_baseline(
    cfg: Any, site: str | None, name: str, *, out: Path | None = None, progress: bool = True
) -> SynthesisSummary:
    """Make (or complete) baseline `name`'s synthetic set of a site, paired with its ALDM set, and
    audit it. Resumable like `synthesize_site`.

    Args:
        cfg: the composed config (reads `paths`, `data`, `device`, `seed`, `synthesis`, `audit`).
        site: the site whose masks to use; None = `cfg.site`.
        name: one of `SYNTHETIC_BASELINES`. `gan` calls `aldm_fed.synthesis.gan.synthesize_gan_site`
            (the GAN must be trained: `aldm-fed train gan --site X`).
        out: output folder; None = `baseline_dir(cfg, site, name)`.
        progress: show progress bars.

    Returns:
        The `SynthesisSummary`, with its memorisation audit.

    Raises:
        ValueError: an unknown baseline, no site, `concat` on a backbone without mask
            concatenation; `SynthesisError` for bad inputs.
        MissingStageError: the VAE or backbone stage has not run.
    """
    _check_name(name)
    cfg, site_name = site_config(cfg, site, needed_for="the site's target cases give the masks")
    out_dir = Path(out) if out is not None else baseline_dir(cfg, site_name, name)
    if name == "gan":
        from aldm_fed.synthesis.gan import synthesize_gan_site

        summary = synthesize_gan_site(cfg, site_name, out=out_dir, progress=progress)
        if summary.audit is None:  # audited here when the GAN module did not
            summary = replace(summary, audit=audit_site(cfg, site_name, out=out_dir, progress=progress))
        return summary
    # The same inputs as `synthesize_site` (the pairing), with the source bundle's networks.
    _, manifest = site_manifests(str(cfg.paths.cohort), [site_name])[site_name]
    cases = manifest.cases("target")
    load_split(cfg, "target", sites=[site_name], progress=progress)
    setup = resolve_device(str(cfg.device.spec), str(cfg.device.precision))
    models = baseline_models(load_generative_models(cfg, None, device=setup.device), name)
    labels = {c: manifest.label(c) for c in cases if manifest.label(c) is not None}
    with autocast_context(setup):
        summary = synthesize(models, CaseCache(str(cfg.paths.cache)), cases, cases, labels or None, out_dir,
                             cfg.synthesis, site=site_name, seed=int(cfg.seed), progress=progress)
    return replace(summary, audit=audit_site(cfg, site_name, out=out_dir, progress=progress))
