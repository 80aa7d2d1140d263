"""Downstream evaluation of one site: every classifier regime, tested on its held-out REAL cases.

What `aldm-fed evaluate` and a federated site run, on the site's own data only:

```python
result = evaluate_site(cfg, "C")   # trains in runs/<run>/sites/C/classifier/
result.rows                        # run_regimes' table (one row per regime)
result.metrics()                   # {"real_only.auc_mean": 0.81, ..., "n_test_cases": 8}
```

The volumes, from the site's manifest (`COHORT/manifests/<site>.json`) and its synthesis folder:

| role | cases |
|---|---|
| real training (`real_only`, `real_aug`, `real_syn`) | the K `target` cases |
| synthetic (`real_syn`, `syn_only`) | every volume in `paths.synthesis` (none there: both skipped) |
| test (every regime) | the `test` cases: held out, real |
| `oracle` | `target` + `source` cases: the site's larger real pool, when it has source cases (else skipped) |

`SiteEvaluation.metrics()` is what a federated site may send: counts and metric values as plain
numbers under fixed names (`METRIC_KEY_PATTERN`), never a case id, a path or a string.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aldm_fed.data.cache import CaseCache
from aldm_fed.data.manifest import SiteManifest
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.evaluation.metrics import CLASSIFICATION_METRICS
from aldm_fed.evaluation.regimes import REGIMES, ClassifierSettings, run_regimes
from aldm_fed.evaluation.tasks import CaseItem, encode_case_labels, items_from_cache, items_from_synthesis
from aldm_fed.synthesis.site import site_config
from aldm_fed.synthesis.writer import MANIFEST_NAME
from aldm_fed.training.artifacts import SITES_DIR, RunLayout
from aldm_fed.training.common import device_setup

__all__ = ["CLASSIFIER_DIR", "METRIC_KEY_PATTERN", "REGIME_NUMBERS", "SITE_NUMBERS", "SiteEvaluation",
           "evaluate_site"]

log = logging.getLogger(__name__)

CLASSIFIER_DIR = "classifier"  # <paths.runs>/sites/<site>/classifier
# The numbers of a run_regimes row that `metrics()` keeps, as `<regime>.<name>` ...
REGIME_NUMBERS: tuple[str, ...] = (
    "n_seeds", "n_train_cases_real", "n_train_cases_syn", "n_boot_valid",
    *(f"{m}_{stat}" for m in CLASSIFICATION_METRICS for stat in ("mean", "std", "ci_low", "ci_high")),
)
# ... and the site-level ones (the test set is the same for every regime).
SITE_NUMBERS: tuple[str, ...] = ("n_target_cases", "n_synthetic_cases", "n_test_cases", "n_test_samples")
# Every key `metrics()` may produce; fixed names only, so no key can carry a case id or a path.
METRIC_KEY_PATTERN = re.compile(
    rf"({'|'.join(SITE_NUMBERS)})|({'|'.join(REGIMES)})\.({'|'.join(REGIME_NUMBERS)})"
)


@dataclass
class SiteEvaluation:
    """What `evaluate_site` did at one site.

    Args:
        site: the site.
        rows: `run_regimes`' table: one row per regime, `status` "ok" (counts and metrics) or
            "skipped" (`reason`).
        run_dir: the classifier runs (`results.json`, `<regime>/seed_<s>/`).
        n_target_cases: real few-shot training cases (K).
        n_synthetic_cases: synthetic volumes available to `real_syn` / `syn_only` (0: skipped).
        n_test_cases: held-out real test cases.
        notes: remarks for the site's own report (they may name paths: never sent anywhere).
    """

    site: str
    rows: list[dict[str, Any]]
    run_dir: Path
    n_target_cases: int
    n_synthetic_cases: int
    n_test_cases: int
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float | int]:
        """The results as flat numbers: what a federated site may send to the server.

        Keys are `<regime>.<name>` for each regime that ran (`REGIME_NUMBERS`, e.g.
        `real_syn.auc_mean`, `real_syn.n_train_cases_syn`) and the site-level `SITE_NUMBERS`
        (`n_test_cases`, ...). Skipped regimes and non-finite values (an interval without valid
        resamples) are left out rather than sent as NaN.

        Returns:
            name -> int (counts) or float (metrics), all finite; every name matches
            `METRIC_KEY_PATTERN`.
        """
        out: dict[str, float | int] = {
            "n_target_cases": int(self.n_target_cases),
            "n_synthetic_cases": int(self.n_synthetic_cases),
            "n_test_cases": int(self.n_test_cases),
        }
        for row in self.rows:
            if row.get("status") != "ok":
                continue
            if "n_test_samples" in row:
                out["n_test_samples"] = int(row["n_test_samples"])
            for name in REGIME_NUMBERS:
                value = _finite_number(row.get(name))
                if value is not None:
                    out[f"{row['regime']}.{name}"] = value
        return out


def _finite_number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return int(value)
    return float(value) if math.isfinite(value) else None


def _label_codes(
    s: ClassifierSettings, manifest: SiteManifest, path: Path, cases: Sequence[str]
) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """(case id -> 0/1, label map) for the volume task; (None, None) for the slice task, whose
    labels come from the masks."""
    if s.task != "volume":
        return None, None
    label_map = {str(k): int(v) for k, v in s.volume["label_map"].items()}
    column = s.volume.get("label_column") or manifest.label_column
    try:
        codes = encode_case_labels({c: manifest.label(c, column) for c in cases}, label_map)
    except ValueError as exc:
        raise ValueError(f"{path}: case labels (column {column!r}) for the volume task: {exc}") from None
    return codes, label_map


def _cached_items(
    cfg: Any, site: str, split: str, labels: Mapping[str, int] | None, progress: bool
) -> list[CaseItem]:
    # load_split prepares what the cache lacks; the items then memory-map the cached arrays.
    volumes = load_split(cfg, split, sites=[site], progress=progress)
    return items_from_cache(CaseCache(str(cfg.paths.cache)), volumes.case_ids, labels)


def evaluate_site(
    cfg: Any, site: str | None = None, *, progress: bool = True, overwrite: bool = False
) -> SiteEvaluation:
    """Train the downstream classifier under every configured regime on a site's own data and test
    it on the site's held-out real cases.

    Finished runs are not retrained: a repeated call reads them back (see `run_regimes`).

    Args:
        cfg: the composed config (reads `paths`, `data`, `device`, `classifier`).
        site: the site; None = `cfg.site`.
        progress: show progress bars (cache preparation and, if `classifier.train.progress`,
            classifier training).
        overwrite: retrain runs whose folder holds another config.

    Returns:
        A `SiteEvaluation`; its `metrics()` is the flat, shareable summary.

    Raises:
        ValueError: no site; no `test` or `target` cases in the site's manifest (the message
            names the file); missing case labels for the volume task; an incomplete synthesis
            folder or one of another volume size; the guards of `run_regimes` (leakage, a test
            set with one class).
        FileNotFoundError: no manifest for the site.
    """
    cfg, site_name = site_config(cfg, site, needed_for="its held-out real cases test the classifier")
    s = ClassifierSettings.from_mapping(cfg.classifier)
    if not progress:
        s = replace(s, train=replace(s.train, progress=False))  # not part of a run's identity

    # 1. The site's cases by role; fail before preparing anything.
    path, manifest = site_manifests(str(cfg.paths.cohort), [site_name])[site_name]
    target, test, source = (manifest.cases(split) for split in ("target", "test", "source"))
    if not test:
        raise ValueError(
            f"{path}: site {site_name} has no 'test' cases; results are measured on held-out real "
            "cases only (write the manifest with test cases, e.g. `aldm-fed data manifest --n-test N`)"
        )
    if not target:
        raise ValueError(f"{path}: site {site_name} has no 'target' (few-shot) cases to train on")
    use_oracle = bool(source) and "oracle" in s.regimes
    labels, label_map = _label_codes(s, manifest, path, [*target, *test, *(source if use_oracle else [])])

    # 2. Real volumes from the cache (prepared on first use).
    real = _cached_items(cfg, site_name, "target", labels, progress)
    test_items = _cached_items(cfg, site_name, "test", labels, progress)
    oracle = real + _cached_items(cfg, site_name, "source", labels, progress) if use_oracle else None

    # 3. The site's synthetic volumes, if it has made any.
    notes: list[str] = []
    syn: list[CaseItem] = []
    syn_dir = Path(str(cfg.paths.synthesis))
    wants_syn = bool({"real_syn", "syn_only"} & set(s.regimes))
    if wants_syn and (syn_dir / MANIFEST_NAME).is_file():
        syn = items_from_synthesis(syn_dir, label_map=label_map)
        if syn and syn[0].image.shape != real[0].image.shape:
            raise ValueError(
                f"{syn_dir}: synthetic volumes are {syn[0].image.shape}, the cached cases "
                f"{real[0].image.shape}; synthesize again with this data config"
            )
    elif wants_syn:
        notes.append(f"no synthetic volumes in {syn_dir} (no {MANIFEST_NAME}): real_syn and syn_only "
                     f"skipped; run `aldm-fed synthesize --site {site_name}` first")
        log.warning(notes[-1])
    if "oracle" in s.regimes and not source:
        notes.append(f"site {site_name} has no source cases: no larger real pool, oracle skipped")

    # 4. Every regime x seed, tested on the real held-out cases.
    run_dir = RunLayout.from_cfg(cfg).root / SITES_DIR / site_name / CLASSIFIER_DIR
    rows = run_regimes(real, syn, test_items, s, run_dir, oracle_items=oracle, device=device_setup(cfg),
                       overwrite=overwrite)
    return SiteEvaluation(site=site_name, rows=rows, run_dir=run_dir, n_target_cases=len(real),
                          n_synthetic_cases=len(syn), n_test_cases=len(test_items), notes=notes)
