"""Downstream evaluation of one site: every classifier regime, tested on its held-out REAL cases.

What `aldm-fed evaluate` and a federated site run, on the site's own data only:

```python
result = evaluate_site(cfg, "C")   # trains in runs/<run>/sites/C/classifier/
result.rows                        # run_regimes' table (one row per regime)
result.metrics()                   # {"real_only.auc_mean": 0.81, ..., "n_test_cases": 8}
```

After the classifier regimes, two measures over what they made:

- paired AUC differences (`regimes.paired_differences`): `real_syn` - `real_only`, ALDM - each
  baseline (same regime) and `real_only` - each domain-shift row, with a paired patient-level
  bootstrap interval, from the runs' predictions (`<classifier>/differences.json`);
- anatomical faithfulness (`faithfulness.enabled`, `aldm_fed.evaluation.faithfulness`): one tumour
  segmenter trained on the K real target cases (`<runs>/sites/<site>/faithfulness/segmenter`,
  trained once, read back by a rerun), its Dice on the real test cases, on the ALDM set ("aldm")
  and on each baseline's set, each after the audit's exclusions (`faithfulness.json` beside it);
- image quality (`aldm_fed.evaluation.image_quality`) of the same sets: SSIM and MMD to each
  volume's host real case, MS-SSIM diversity (and the real cases' own), Frechet distances in the
  features of fixed random networks (`quality.<set>.<metric>`).

The volumes, from the site's manifest (`COHORT/manifests/<site>.json`) and its synthesis folder:

| role | cases |
|---|---|
| real training (`real_only`, `real_aug`, `real_syn`) | the K `target` cases |
| synthetic (`real_syn`, `syn_only`) | every volume in `paths.synthesis` (none there: both skipped) except those the memorisation audit flags as near-copies of a real case (`audit.exclude_flagged`, `aldm_fed.synthesis.audit`) |
| test (every regime) | the `test` cases: held out, real; or, with `split="val"`, the `val` cases (for choosing settings) |
| `oracle` | `target` + `source` + `oracle` cases: the site's larger real pool, when it has source or oracle cases (else skipped) |
| baselines (`real_syn_<b>`, `syn_only_<b>`) | the synthetic set of each baseline `<b>` asked for (`baselines.enabled`: `runs/<run>/sites/<site>/baselines/<b>/`, `aldm_fed.synthesis.baselines`), less its audit's near-copies |
| domain shift (`shift_from_<X>`) | site X's real cases (`shift_from`, only when the caller asks: it reads another site's data, so a federated site never does) |

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
from aldm_fed.evaluation.faithfulness import (
    FaithfulnessSettings,
    faithfulness,
    faithfulness_metrics,
    metric_key_pattern,
)
from aldm_fed.evaluation.image_quality import metric_key_pattern as quality_key_pattern
from aldm_fed.evaluation.image_quality import site_image_quality
from aldm_fed.evaluation.metrics import CLASSIFICATION_METRICS
from aldm_fed.evaluation.regimes import (
    BASELINE_REGIMES,
    DIFFERENCE_NUMBERS,
    REGIMES,
    SYNTHETIC_BASELINES,
    ClassifierSettings,
    difference_name,
    difference_pairs,
    paired_differences,
    run_regimes,
    shift_regime,
)
from aldm_fed.evaluation.tasks import CaseItem, encode_case_labels, items_from_cache, items_from_synthesis
from aldm_fed.models.vae import vae_downsample_factor
from aldm_fed.synthesis.audit import AUDIT_KEY_PATTERN, AuditSettings, audit_site
from aldm_fed.synthesis.site import site_config
from aldm_fed.synthesis.writer import MANIFEST_NAME
from aldm_fed.training.artifacts import SITES_DIR, RunLayout
from aldm_fed.training.common import device_setup

__all__ = ["CLASSIFIER_DIR", "FAITHFULNESS_DIR", "FAITHFULNESS_SETS", "METRIC_KEY_PATTERN", "REGIME_NUMBERS",
           "SITE_NUMBERS", "SiteEvaluation", "enabled_baselines", "evaluate_site"]

log = logging.getLogger(__name__)

CLASSIFIER_DIR = "classifier"  # <paths.runs>/sites/<site>/classifier
# The splits a site can be evaluated on: `test` for results, `val` for choosing settings. A val
# evaluation trains and writes in folders of its own (`classifier-val`, `faithfulness-val`), so no
# file of it can be read as a test result.
EVAL_SPLITS: tuple[str, ...] = ("test", "val")
FAITHFULNESS_DIR = "faithfulness"  # <paths.runs>/sites/<site>/faithfulness (faithfulness.json, segmenter/)
# The synthetic sets the segmenter measures, under fixed names: the site's ALDM set, each baseline's.
FAITHFULNESS_SETS: tuple[str, ...] = ("aldm", *SYNTHETIC_BASELINES)
# The numbers of a run_regimes row that `metrics()` keeps, as `<regime>.<name>` ...
REGIME_NUMBERS: tuple[str, ...] = (
    "n_seeds", "n_train_cases_real", "n_train_cases_syn", "n_boot_valid",
    *(f"{m}_{stat}" for m in CLASSIFICATION_METRICS for stat in ("mean", "std", "ci_low", "ci_high")),
)
# ... and the site-level ones (the test set is the same for every regime).
SITE_NUMBERS: tuple[str, ...] = ("n_target_cases", "n_synthetic_cases", "n_synthetic_excluded", "n_test_cases",
                                 "n_test_samples")
# Every key `metrics()` may produce; fixed names only, so no key can carry a case id or a path
# (`audit.<name>`: the memorisation audit's counts and ratio statistics; `faithfulness.<...>`: the
# segmenter's Dice per set; `quality.<set>.<metric>`: image quality of each synthetic set; `diff.<a>__<b>.<name>`: paired AUC differences). The baselines' regimes
# have fixed names too; the domain-shift rows (`shift_from_<site>`, and the differences naming them)
# do not match: they name a site and exist only in a single-machine comparison.
_DIFF_NAMES = [difference_name(a, b) for a, b in difference_pairs([*REGIMES, *BASELINE_REGIMES])]
METRIC_KEY_PATTERN = re.compile(
    rf"({'|'.join(SITE_NUMBERS)})|({'|'.join((*REGIMES, *BASELINE_REGIMES))})\.({'|'.join(REGIME_NUMBERS)})"
    rf"|{AUDIT_KEY_PATTERN.pattern}"
    rf"|{metric_key_pattern(FAITHFULNESS_SETS)}"
    rf"|{quality_key_pattern(FAITHFULNESS_SETS)}"
    rf"|diff\.({'|'.join(_DIFF_NAMES)})\.({'|'.join(DIFFERENCE_NUMBERS)})"
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
        n_synthetic_cases: synthetic volumes available to `real_syn` / `syn_only` (0: skipped),
            after the exclusion of near-copies.
        n_test_cases: real cases the classifiers were tested on (of `split`).
        notes: remarks for the site's own report (they may name paths: never sent anywhere).
        n_synthetic_excluded: synthetic volumes left out as near-copies of a real case.
        audit: the memorisation audit's shareable numbers (`AuditResult.summary()`), if it ran.
        faithfulness: the segmenter's numbers (`faithfulness_metrics`: `faithfulness.<...>`), if
            it ran.
        differences: `regimes.paired_differences`' rows (paired AUC differences of regime pairs).
        quality: image quality of each synthetic set (`image_quality.site_image_quality`:
            `quality.<set>.<metric>`), if any set exists.
        split: what the classifiers were tested on: "test" (held-out results) or "val" (for
            choosing settings).
    """

    site: str
    rows: list[dict[str, Any]]
    run_dir: Path
    n_target_cases: int
    n_synthetic_cases: int
    n_test_cases: int
    notes: list[str] = field(default_factory=list)
    n_synthetic_excluded: int = 0
    audit: dict[str, float | int] = field(default_factory=dict)
    faithfulness: dict[str, float | int] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)
    quality: dict[str, float | int] = field(default_factory=dict)
    split: str = "test"

    def metrics(self) -> dict[str, float | int]:
        """The results as flat numbers: what a federated site may send to the server.

        Keys are `<regime>.<name>` for each regime that ran (`REGIME_NUMBERS`, e.g.
        `real_syn.auc_mean`, `real_syn.n_train_cases_syn`) and the site-level `SITE_NUMBERS`
        (`n_test_cases`, ...), the memorisation audit's `audit.<name>` numbers when it ran, the
        faithfulness numbers (`faithfulness.real.dice_mean`, `faithfulness.aldm.dice_mean`,
        `faithfulness.<baseline>.dice_gap`, ...) when they were measured, the image quality of each
        synthetic set (`quality.aldm.ssim`, `quality.<baseline>.fd_rand_resnet10_3d`, ...), and the paired AUC
        differences as `diff.<a>__<b>.<name>` (`DIFFERENCE_NUMBERS`, e.g.
        `diff.real_syn__real_only.auc_ci_low`). Skipped regimes and non-finite values (an interval
        without valid resamples) are left out rather than sent as NaN.

        Returns:
            name -> int (counts) or float (metrics), all finite; every name matches
            `METRIC_KEY_PATTERN`, except the domain-shift rows (`shift_from_<X>.<name>`,
            `diff.real_only__shift_from_<X>.<name>`) that `evaluate_site` makes only when its
            caller asks (single machine; never shareable).
        """
        out: dict[str, float | int] = {
            "n_target_cases": int(self.n_target_cases),
            "n_synthetic_cases": int(self.n_synthetic_cases),
            "n_synthetic_excluded": int(self.n_synthetic_excluded),
            "n_test_cases": int(self.n_test_cases),
        }
        out |= {k: x for k, v in self.audit.items() if (x := _finite_number(v)) is not None}
        out |= {k: x for k, v in self.faithfulness.items() if (x := _finite_number(v)) is not None}
        out |= {k: x for k, v in self.quality.items() if (x := _finite_number(v)) is not None}
        for d in self.differences:
            name = difference_name(d["a"], d["b"])
            out |= {f"diff.{name}.{k}": x for k in DIFFERENCE_NUMBERS if (x := _finite_number(d.get(k))) is not None}
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


def _synthetic_set(
    cfg: Any, site: str, syn_dir: Path, label_map: dict[str, int] | None, real: Sequence[CaseItem],
    progress: bool, what: str,
) -> tuple[list[CaseItem], list[str], dict[str, float | int], list[str]]:
    """(items, excluded ids, audit numbers, notes) of one synthesis folder: its volumes less the
    memorisation audit's near-copies (`audit.exclude_flagged`)."""
    notes: list[str] = []
    syn = items_from_synthesis(syn_dir, label_map=label_map)
    if syn and syn[0].image.shape != real[0].image.shape:
        raise ValueError(
            f"{syn_dir}: synthetic volumes are {syn[0].image.shape}, the cached cases "
            f"{real[0].image.shape}; synthesize again with this data config"
        )
    audit = audit_site(cfg, site, out=syn_dir, progress=progress)  # read back if current
    if audit is None:
        return syn, [], {}, [f"memorisation audit off (audit.enabled=false): {what} volumes were not checked"]
    excluded: list[str] = []
    if AuditSettings.from_mapping(cfg.audit).exclude_flagged and audit.flagged_ids:
        flagged = set(audit.flagged_ids)
        excluded = [it.group for it in syn if it.group in flagged]
        syn = [it for it in syn if it.group not in flagged]
        notes.append(f"memorisation audit: {len(excluded)} {what} volume(s) left out of training as "
                     f"near-copies of a real case ({', '.join(excluded)}; {audit.path})")
        log.warning(notes[-1])
    return syn, excluded, audit.summary(), notes


def enabled_baselines(cfg: Any) -> tuple[str, ...]:
    """The synthetic baselines `cfg.baselines.enabled` asks for (none without a `baselines` group).

    Raises:
        ValueError: a name not in `SYNTHETIC_BASELINES`, or a repeated one.
    """
    group = cfg.get("baselines") if hasattr(cfg, "get") else None
    names = tuple(str(b) for b in ((group.get("enabled") if group is not None else None) or ()))
    bad = [b for b in names if b not in SYNTHETIC_BASELINES]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"baselines.enabled: expected distinct names from {SYNTHETIC_BASELINES}, got {list(names)}")
    return names


def evaluate_site(
    cfg: Any,
    site: str | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
    baselines: Sequence[str] | None = None,
    shift_from: Sequence[str] = (),
    split: str = "test",
) -> SiteEvaluation:
    """Train the downstream classifier under every configured regime on a site's own data and test
    it on the site's held-out real cases; then the paired AUC differences of regime pairs and, with
    `faithfulness.enabled`, the anatomical faithfulness of each synthetic set.

    Finished runs are not retrained: a repeated call reads them back (see `run_regimes`; the
    segmenter likewise).

    Args:
        cfg: the composed config (reads `paths`, `data`, `device`, `seed`, `classifier`, `audit`,
            `baselines`, `faithfulness`).
        site: the site; None = `cfg.site`.
        progress: show progress bars (cache preparation and, if `classifier.train.progress`,
            classifier training).
        overwrite: retrain runs (classifier, segmenter) whose folder holds another config.
        baselines: synthetic baselines to compare (`real_syn_<b>`, `syn_only_<b>`), each read from
            `aldm_fed.synthesis.baselines.baseline_dir`; None = `cfg.baselines.enabled`. A baseline
            without a finished set is skipped with a note.
        shift_from: other sites whose real cases (`cfg.baselines.shift_splits`, default their
            `target` cases) train a `shift_from_<X>` classifier tested here. It reads those sites'
            data, so only a single-machine comparison asks for it; its rows do not match
            `METRIC_KEY_PATTERN` (never sent by a federated site).
        split: the cases every regime is tested on: "test" (the held-out results) or "val" (the
            validation cases, on which settings are chosen; written to `classifier-val/`).

    Returns:
        A `SiteEvaluation`; its `metrics()` is the flat, shareable summary.

    Raises:
        ValueError: no site; no `test` or `target` cases in the site's manifest (the message
            names the file); missing case labels for the volume task; an incomplete synthesis
            folder or one of another volume size; an unknown baseline; the site itself in
            `shift_from`, or a shift site without those cases; the guards of `run_regimes`
            (leakage, a test set with one class).
        FileNotFoundError: no manifest for the site (or for a `shift_from` site).
    """
    from aldm_fed.synthesis.baselines import baseline_dir  # synthesis imports evaluation helpers

    cfg, site_name = site_config(cfg, site, needed_for="its held-out real cases test the classifier")
    s = ClassifierSettings.from_mapping(cfg.classifier)
    if not progress:
        s = replace(s, train=replace(s.train, progress=False))  # not part of a run's identity
    wanted = enabled_baselines(cfg) if baselines is None else tuple(baselines)
    bad = [b for b in wanted if b not in SYNTHETIC_BASELINES]
    if bad:
        raise ValueError(f"unknown synthetic baseline(s) {bad}; expected names from {SYNTHETIC_BASELINES}")
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    shift_sites = [str(x) for x in shift_from]
    if site_name in shift_sites:
        raise ValueError(f"shift_from: site {site_name} is the site under test; name other sites")
    for x in shift_sites:
        shift_regime(x)  # validates the name

    # 1. The site's cases by role; fail before preparing anything.
    path, manifest = site_manifests(str(cfg.paths.cohort), [site_name])[site_name]
    target, test = manifest.cases("target"), manifest.cases(split)
    pool = [name for name in ("source", "oracle") if manifest.cases(name)]  # the oracle's cases beyond the K
    extra = [c for name in pool for c in manifest.cases(name)]
    if not test:
        raise ValueError(
            f"{path}: site {site_name} has no '{split}' cases; results are measured on held-out real "
            f"cases only (write the manifest with them, e.g. `aldm-fed data manifest --n-{split} N`)"
        )
    if not target:
        raise ValueError(f"{path}: site {site_name} has no 'target' (few-shot) cases to train on")
    use_oracle = bool(extra) and "oracle" in s.regimes
    labels, label_map = _label_codes(s, manifest, path, [*target, *test, *(extra if use_oracle else [])])

    # 2. Real volumes from the cache (prepared on first use).
    real = _cached_items(cfg, site_name, "target", labels, progress)
    test_items = _cached_items(cfg, site_name, split, labels, progress)
    oracle = real + [it for name in pool for it in _cached_items(cfg, site_name, name, labels, progress)] \
        if use_oracle else None

    # 3. The site's synthetic volumes, if it has made any, less the audit's near-copies; the same
    #    for each baseline's set.
    notes: list[str] = []
    syn: list[CaseItem] = []
    excluded: list[str] = []
    audit_numbers: dict[str, float | int] = {}
    syn_dir = Path(str(cfg.paths.synthesis))
    wants_syn = bool({"real_syn", "syn_only"} & set(s.regimes))
    if wants_syn and (syn_dir / MANIFEST_NAME).is_file():
        syn, excluded, audit_numbers, more = _synthetic_set(cfg, site_name, syn_dir, label_map, real, progress,
                                                            "synthetic")
        notes += more
    elif wants_syn:
        notes.append(f"no synthetic volumes in {syn_dir} (no {MANIFEST_NAME}): real_syn and syn_only "
                     f"skipped; run `aldm-fed synthesize --site {site_name}` first")
        log.warning(notes[-1])
    baseline_items: dict[str, list[CaseItem]] = {}
    for b in wanted if wants_syn else ():
        b_dir = baseline_dir(cfg, site_name, b)
        if (b_dir / MANIFEST_NAME).is_file():
            baseline_items[b], _, _, more = _synthetic_set(cfg, site_name, b_dir, label_map, real, progress,
                                                           f"{b} baseline")
            notes += more
        else:
            baseline_items[b] = []
            notes.append(f"no {b} baseline set in {b_dir} (no {MANIFEST_NAME}): its regimes skipped; "
                         f"`aldm-fed compare` makes it")
            log.warning(notes[-1])
    if "oracle" in s.regimes and not extra:
        notes.append(f"site {site_name} has no source or oracle cases: no larger real pool, oracle skipped")
    if split != "test":
        notes.append(f"tested on the site's {len(test_items)} {split} cases, for choosing settings: not a "
                     "held-out result (that is the test split's)")

    # 4. Domain shift: the same classifier trained on another site's real cases.
    shift_items: dict[str, list[CaseItem]] = {}
    if shift_sites:
        splits = [str(x) for x in (cfg.get("baselines") or {}).get("shift_splits", None) or ["target"]]
        for x, (x_path, x_manifest) in site_manifests(str(cfg.paths.cohort), shift_sites).items():
            cases = [c for split in splits for c in x_manifest.cases(split)]
            if not cases:
                raise ValueError(f"{x_path}: site {x} has no {'/'.join(splits)} cases to train the "
                                 f"shift_from_{x} classifier on (baselines.shift_splits)")
            x_labels, _ = _label_codes(s, x_manifest, x_path, cases)
            shift_items[x] = [it for split in splits for it in _cached_items(cfg, x, split, x_labels, progress)]
        notes.append(f"domain shift: shift_from_<X> trained on the {'+'.join(splits)} cases of site(s) "
                     f"{', '.join(shift_sites)}, tested on site {site_name}'s test cases (single machine only)")

    # 5. Every regime x seed, tested on the real held-out cases.
    site_dir = RunLayout.from_cfg(cfg).root / SITES_DIR / site_name
    suffix = "" if split == "test" else f"-{split}"
    run_dir = site_dir / f"{CLASSIFIER_DIR}{suffix}"
    setup = device_setup(cfg)
    rows = run_regimes(real, syn, test_items, s, run_dir, oracle_items=oracle, baseline_items=baseline_items,
                       shift_items=shift_items, device=setup, overwrite=overwrite)

    # 6. Paired AUC differences (real_syn - real_only, ALDM - baselines, the shift gaps), from the
    #    runs' predictions.
    differences = paired_differences(rows, run_dir, s)

    # 7. Anatomical faithfulness: one segmenter on the K real cases; Dice on the real test cases and
    #    on every synthetic set that exists (the same sets, after the audit, as the classifiers').
    faith: dict[str, float | int] = {}
    sets = {name: items for name, items in (("aldm", syn), *baseline_items.items()) if items}
    fs = FaithfulnessSettings.from_mapping(cfg.faithfulness)
    if fs.enabled:
        if not progress:
            fs = replace(fs, train=replace(fs.train, progress=False))  # not part of the run's identity
        if not sets:
            notes.append("anatomical faithfulness: no synthetic set to measure; only the segmenter's Dice on "
                         "the real test cases is reported")
        result = faithfulness(fs, real, test_items, sets, site_dir / f"{FAITHFULNESS_DIR}{suffix}", seed=int(cfg.seed),
                              device=setup, overwrite=overwrite)
        faith = faithfulness_metrics(result)

    # 8. Image quality of the same sets: SSIM / MMD to each volume's host case, MS-SSIM diversity,
    #    Frechet distances in fixed random features. It only reads volumes (seconds at 64^3), so a
    #    rerun recomputes it rather than caching it.
    #    The feature networks keep their fixed seed 0, so values compare across runs and sites.
    quality = site_image_quality({it.group: it for it in real}, sets, notes=notes,
                                 dilate=vae_downsample_factor(cfg.model.vae)) if sets else {}
    return SiteEvaluation(site=site_name, split=split, rows=rows, run_dir=run_dir, n_target_cases=len(real),
                          n_synthetic_cases=len(syn), n_test_cases=len(test_items), notes=notes,
                          n_synthetic_excluded=len(excluded), audit=audit_numbers, faithfulness=faith,
                          differences=differences, quality=quality)
