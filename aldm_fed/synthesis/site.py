"""Synthesis for one site from a composed config: what `aldm-fed synthesize` and a federated site run.

```python
summary = synthesize_site(cfg, "C")      # runs/<run>/sites/C/synthesis/ (cfg.paths.synthesis)
```

1. The site's few-shot target cases go into the cache (prepared once, then memory-mapped).
2. The shared VAE + backbone and the site's own ControlNet (`load_generative_models`).
3. Their tumour masks, augmented, become new volumes (`synthesize`), hosted by the same cases.
4. The memorisation audit (`audit_site`): each volume against the site's real training cases;
   near-copies are flagged in `audit.json` (on unless `audit.enabled=false`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aldm_fed.data.cache import CaseCache
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.synthesis.audit import audit_site
from aldm_fed.synthesis.run import SynthesisSummary, synthesize
from aldm_fed.training.artifacts import load_generative_models
from aldm_fed.training.device import autocast_context, resolve_device

__all__ = ["site_config", "synthesize_site"]


def site_config(cfg: Any, site: str | None, *, needed_for: str) -> tuple[DictConfig, str]:
    """`cfg` for one site: `site` (or `cfg.site` when None) set as `cfg.site`, so paths that
    interpolate `${site}` (`paths.synthesis`) point at that site. The caller's config is untouched.

    Args:
        cfg: the composed config.
        site: the site; None = `cfg.site`.
        needed_for: what the site is for, ending the error message.

    Returns:
        (a copy of the config with `site` set, the site name).

    Raises:
        ValueError: no site given and `cfg.site` is null.
    """
    name = site if site is not None else cfg.get("site")
    if name is None or str(name) == "":
        raise ValueError(f"which site? pass --site X or the override site=X ({needed_for})")
    return OmegaConf.merge(cfg, {"site": str(name)}), str(name)


def synthesize_site(
    cfg: Any, site: str | None = None, *, out: Path | None = None, progress: bool = True
) -> SynthesisSummary:
    """Synthesize BraTS-style volumes from augmented tumour masks of a site's few-shot cases.

    Resumable like `synthesize`: a rerun with the same settings keeps complete case folders.

    Args:
        cfg: the composed config (reads `paths`, `data`, `device`, `seed`, `synthesis`, `audit`).
        site: the site whose masks and ControlNet to use; None = `cfg.site`.
        out: output folder; None = `cfg.paths.synthesis` of the site.
        progress: show progress bars.

    Returns:
        The `SynthesisSummary` of `synthesize`, with the memorisation audit (`audit`, None when
        `audit.enabled` is false).

    Raises:
        ValueError: no site; `SynthesisError` (a ValueError) for a bad input or output folder.
        FileNotFoundError: no manifest for the site; `MissingStageError` when the VAE or backbone
            stage has not run.
    """
    cfg, site_name = site_config(cfg, site, needed_for="the site's target cases give the masks")
    _, manifest = site_manifests(str(cfg.paths.cohort), [site_name])[site_name]
    cases = manifest.cases("target")
    # 1. Make sure the site's few-shot cases are in the cache (prepared once, then memory-mapped).
    load_split(cfg, "target", sites=[site_name], progress=progress)
    # 2. The shared VAE + backbone and the site's own ControlNet.
    setup = resolve_device(str(cfg.device.spec), str(cfg.device.precision))
    models = load_generative_models(cfg, site_name, device=setup.device)
    labels = {c: manifest.label(c) for c in cases if manifest.label(c) is not None}
    # 3. Masks -> volumes -> NIfTI folders, montage, manifest.
    out_dir = Path(out if out is not None else str(cfg.paths.synthesis))
    with autocast_context(setup):
        summary = synthesize(
            models,
            CaseCache(str(cfg.paths.cache)),
            cases,
            cases,
            labels or None,
            out_dir,
            cfg.synthesis,
            site=site_name,
            seed=int(cfg.seed),
            progress=progress,
        )
    # 4. The memorisation audit: read back when nothing changed since the last one.
    return replace(summary, audit=audit_site(cfg, site_name, out=out_dir, progress=progress))
