"""`aldm-fed compare`: every regime, baseline and domain-shift row for several sites, in ONE report.

A single-machine research evaluation on a cohort that holds every site (the phantom cohort):

```python
result = compare(compose(["experiment=demo", "baselines=compare"]), ["B", "C"])
result.report["md"]      # runs/<run>/compare/report.md (also .csv, .json, .html)
```

Steps, each resumable (a rerun reads what is finished and makes only what is missing):

1. The cohort: the embedded phantom cohort is made at `paths.cohort` when there is none.
2. The shared stages once: `vae`, `scale`, `backbone` (with its source ControlNet).
3. Per site: its ControlNet, its ALDM synthetic set, each baseline's set (`baselines.enabled`:
   `noadapt`, `concat`, and `gan` after training the site's GAN), all from the same masks.
4. Per site: every classifier regime (`classifier.regimes`), `real_syn_<b>` / `syn_only_<b>` per
   baseline and `shift_from_<X>` per other site (`baselines.shift_from`), on the site's held-out
   real cases; the paired AUC differences of regime pairs and the anatomical faithfulness of the
   ALDM and baseline sets (`evaluate_site`); each site's own report beside its runs (with ROC curves).
5. One report over the sites (`write_report`): tables with patient-bootstrap CIs, the ALDM - baseline
   differences and the domain-shift gaps with paired intervals, and the faithfulness Dice per set.

Domain shift reads other sites' cases, so it exists only here; a federated run never makes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from aldm_fed.data.volumes import site_manifests
from aldm_fed.diffusion.conditioning import conditioning_config
from aldm_fed.evaluation.report import config_summary, write_report
from aldm_fed.evaluation.site import SiteEvaluation, enabled_baselines, evaluate_site
from aldm_fed.training.artifacts import RunLayout

__all__ = ["COMPARE_DIR", "CompareResult", "compare", "shift_sites"]

COMPARE_DIR = "compare"  # <paths.runs>/compare/report.{md,csv,json,html}
_SHARED_STAGES = ("vae", "scale", "backbone")


@dataclass
class CompareResult:
    """What `compare` did.

    Args:
        sites: the evaluated sites, in order.
        evaluations: site -> its `SiteEvaluation`.
        report: the written report files ({"json", "csv", "md", "html"} -> path).
        seconds: wall time of the call.
        steps: one line per step (what ran or was already there, and its time).
    """

    sites: list[str]
    evaluations: dict[str, SiteEvaluation]
    report: dict[str, Path]
    seconds: float
    steps: list[str] = field(default_factory=list)


def shift_sites(cfg: Any, site: str) -> list[str]:
    """The sites whose real cases train `site`'s domain-shift classifiers: `baselines.shift_from`,
    or (null) every other site of the cohort that has `baselines.shift_splits` cases.

    Args:
        cfg: the composed config.
        site: the site under test.
    """
    group = cfg.get("baselines") or {}
    named = group.get("shift_from")
    if named is not None:
        return [str(x) for x in named if str(x) != site]
    splits = [str(x) for x in group.get("shift_splits") or ["target"]]
    return [x for x, (_, m) in site_manifests(str(cfg.paths.cohort)).items()
            if x != site and any(m.cases(split) for split in splits)]


def _ensure_cohort(cfg: Any, progress: bool) -> str | None:
    """Make the phantom cohort at `paths.cohort` when the folder is missing or empty."""
    cohort = Path(str(cfg.paths.cohort))
    if (cohort / "manifests").is_dir():
        return None
    if cohort.is_dir() and any(cohort.iterdir()):
        raise ValueError(f"{cohort}: no manifests/ folder; make one per site with `aldm-fed data manifest`, or "
                         "point paths.cohort at an empty folder for the embedded phantom cohort")
    from aldm_fed.data.phantom import PhantomConfig, make_cohort

    make_cohort(cohort, PhantomConfig.from_mapping(cfg.phantom), seed=int(cfg.seed), progress=progress)
    return f"made the phantom cohort at {cohort}"


def concat_note(cfg: Any) -> str:
    """Whether the `concat` baseline samples a mode its backbone trained in (for the report)."""
    p = conditioning_config(cfg.model.conditioning).residual_drop_prob
    if p > 0:
        return (f"the backbone trained with the mask alone (ControlNet residuals dropped) in {p:.0%} of its "
                "conditioned steps (model.conditioning.residual_drop_prob), the mode this baseline samples")
    return ("the backbone never trained with the mask alone (model.conditioning.residual_drop_prob=0, ALDM's "
            "recipe): this baseline samples an untrained mode, so ALDM - concat may overstate what the "
            "ControlNet adds; train the backbone with residual_drop_prob=0.15 for a fair comparison")


def compare(
    cfg: Any,
    sites: Sequence[str],
    *,
    out: Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> CompareResult:
    """Run what is missing for each site and write one report comparing every regime, baseline and
    domain-shift row.

    Args:
        cfg: the composed config (e.g. `experiment=demo baselines=compare`).
        sites: the target sites (at least one; each needs `target` and `test` cases).
        out: report folder; None = `<paths.runs>/compare`.
        progress: show progress bars.
        overwrite: retrain classifier runs whose folder holds another config.
        echo: where the progress lines go.

    Returns:
        A `CompareResult`.

    Raises:
        ValueError: no site or a repeated one, an unknown baseline, or the errors of the stages.
        FileNotFoundError: a site without a manifest.
    """
    from aldm_fed.synthesis.baselines import synthesize_baseline
    from aldm_fed.synthesis.site import synthesize_site
    from aldm_fed.training.stages import run_stage

    t_start = time.perf_counter()
    names = [str(s) for s in sites]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"compare: give distinct target sites (--sites B C), got {names}")
    baselines = enabled_baselines(cfg)
    steps: list[str] = []

    def step(what: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        echo(f"compare: {what} ...")
        value = fn()
        skipped = getattr(value, "skipped", False) or (getattr(value, "n_made", None) == 0)
        line = f"compare: {what}: {'already done' if skipped else 'done'} ({time.perf_counter() - t0:.0f} s)"
        echo(line)
        steps.append(line)
        return value

    # 1-2. The cohort and the shared stages.
    made = _ensure_cohort(cfg, progress)
    if made:
        steps.append(f"compare: {made}")
        echo(steps[-1])
    site_manifests(str(cfg.paths.cohort), names)  # every named site exists, before any training
    for stage in _SHARED_STAGES:
        step(f"train {stage}", lambda stage=stage: run_stage(cfg, stage, progress=progress))

    # 3. Per site: its ControlNet, its ALDM set and the baselines' sets.
    site_cfgs = {s: OmegaConf.merge(cfg, {"site": s}) for s in names}
    for s, scfg in site_cfgs.items():
        step(f"site {s}: train controlnet", lambda scfg=scfg: run_stage(scfg, "controlnet", progress=progress))
        step(f"site {s}: synthesize (ALDM)", lambda scfg=scfg: synthesize_site(scfg, progress=progress))
        for b in baselines:
            if b == "gan":
                step(f"site {s}: train gan", lambda scfg=scfg: run_stage(scfg, "gan", progress=progress))
            step(f"site {s}: synthesize ({b} baseline)",
                 lambda scfg=scfg, s=s, b=b: synthesize_baseline(scfg, s, b, progress=progress))

    # 4. Per site: every regime + baselines + domain shift; the site's own report beside its runs.
    evaluations: dict[str, SiteEvaluation] = {}
    for s, scfg in site_cfgs.items():
        others = shift_sites(scfg, s)
        result = step(f"site {s}: evaluate ({len(baselines)} baseline(s), shift from {', '.join(others) or 'none'})",
                      lambda scfg=scfg, s=s, others=others: evaluate_site(
                          scfg, s, progress=progress, overwrite=overwrite, baselines=baselines, shift_from=others))
        evaluations[s] = result
        write_report(result.run_dir, {s: result.metrics()}, title=f"Downstream classification, site {s}",
                     context={**config_summary(scfg), "site": s, "runs": str(result.run_dir),
                              **({"notes": " / ".join(result.notes)} if result.notes else {})})

    # 5. The one report.
    out_dir = Path(out) if out is not None else RunLayout.from_cfg(cfg).root / COMPARE_DIR
    context: dict[str, Any] = {
        **config_summary(cfg),
        "sites": {s: {"status": "done", "n_test_cases": e.n_test_cases, "n_target_cases": e.n_target_cases,
                      "n_synthetic_cases": e.n_synthetic_cases, "classifier_runs": str(e.run_dir)}
                  for s, e in evaluations.items()},
        "baselines": list(baselines) or "none",
        **({"concat_baseline": concat_note(cfg)} if "concat" in baselines else {}),
        "domain_shift": "single-machine research evaluation (reads other sites' cases); never part of a "
                        "federated run",
        "notes": " / ".join(f"{s}: {n}" for s, e in evaluations.items() for n in e.notes) or "none",
    }
    report = write_report(out_dir, {s: e.metrics() for s, e in evaluations.items()},
                          title=f"ALDM against baselines and domain shift, run {cfg.run_name}", context=context)
    seconds = time.perf_counter() - t_start
    echo(f"compare: report {report['md']} ({seconds:.0f} s in all)")
    return CompareResult(sites=names, evaluations=evaluations, report=report, seconds=seconds, steps=steps)
