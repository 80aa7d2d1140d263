"""Training regimes for the downstream classifier, all tested on held-out REAL cases of a site.

Same classifier, same budget (steps x batch size), same test set; only the training data differ:

| regime | trains on |
|---|---|
| `real_only` | the K real target cases |
| `real_aug` | the K real cases with classic augmentation (flips, small affine, intensity) |
| `real_syn` | the K real cases + round(`syn_ratio` x K) synthetic volumes (drawn per seed) |
| `syn_only` | all synthetic volumes given (train-synthetic-test-real) |
| `oracle` | many real target cases (only when the cohort has them; else skipped) |

Comparisons run next to them with the same classifier, budget, seeds and test set (`run_regimes`'
`baseline_items` and `shift_items`):

| regime | trains on |
|---|---|
| `real_syn_<b>`, `syn_only_<b>` | as `real_syn` / `syn_only`, with the synthetic set of baseline `<b>` of `SYNTHETIC_BASELINES` (`noadapt`: source ControlNet; `concat`: no ControlNet; `gan`: the 3D GAN; `aldm_fed.synthesis.baselines`) instead of the site's adapted ALDM set |
| `shift_from_<site>` | another site's real cases (domain shift: trained there, tested here); a single-machine research evaluation, never a federated metric |

```python
rows = run_regimes(real_k, synthetic, real_test, cfg.classifier, "runs/x/classifier/A",
                   oracle_items=real_many)
```

Paired differences (`paired_differences`, after the runs): AUC(a) - AUC(b) for the pairs of
`difference_pairs` (`real_syn` - `real_only`, ALDM - each baseline, `real_only` - each domain-shift
row), with a paired patient-level bootstrap interval (`metrics.paired_auc_difference`) from the
runs' predictions.

Layout of `run_dir`:

```
run_dir/
  results.json                      table (one row per regime, seeds aggregated) + every run
  differences.json                  paired AUC differences of regime pairs (`paired_differences`)
  <regime>/seed_<s>/result.json     metrics with patient-bootstrap CIs, counts, settings
  <regime>/seed_<s>/predictions.json  y_true, y_score, patient per test sample
  <regime>/seed_<s>/train/          the loop's run dir (checkpoints, metrics.jsonl)
```

Guards, all raising ValueError: a synthetic test item; a patient (or a synthetic volume's source
patient) on both sides; real items flagged synthetic or the reverse; a test set with one class.
A finished run is not retrained when the same call is repeated (the loop resumes at its end).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm_fed.checkpoints import plain_config
from aldm_fed.evaluation.metrics import (
    CLASSIFICATION_METRICS,
    DEFAULT_N_BOOT,
    MIN_PATIENTS,
    aggregate_seeds,
    classification_metrics,
    paired_auc_difference,
)
from aldm_fed.evaluation.tasks import (
    TASKS,
    CaseItem,
    TaskData,
    check_no_leakage,
    check_real_test_items,
    make_task,
    training_groups,
)
from aldm_fed.io import atomic_write_json
from aldm_fed.models.classifier import build_classifier, classifier_spatial_dims
from aldm_fed.training.classifier import (
    AugmentConfig,
    ClassifierTrainConfig,
    predict_proba,
    train_classifier,
)
from aldm_fed.training.device import DeviceSetup, resolve_device
from aldm_fed.training.loop import stable_seed

__all__ = [
    "BASELINE_REGIMES",
    "DIFFERENCES_FILE",
    "DIFFERENCE_NUMBERS",
    "REGIMES",
    "SHIFT_PREFIX",
    "SYNTHETIC_BASELINES",
    "RESULTS_FILE",
    "ClassifierSettings",
    "RegimeResult",
    "run_regime",
    "run_regimes",
    "comparison_pairs",
    "difference_name",
    "difference_pairs",
    "is_regime",
    "order_regimes",
    "paired_differences",
    "read_predictions",
    "regime_kind",
    "select_synthetic",
    "shift_regime",
]

REGIMES: tuple[str, ...] = ("real_only", "real_aug", "real_syn", "syn_only", "oracle")
# Generative baselines whose synthetic sets replace the ALDM one (aldm_fed.synthesis.baselines).
SYNTHETIC_BASELINES: tuple[str, ...] = ("noadapt", "concat", "gan")
# The regimes that take a synthetic set, and their per-baseline names (fixed: they are shareable).
_SYN_REGIMES = ("real_syn", "syn_only")
BASELINE_REGIMES: tuple[str, ...] = tuple(f"{r}_{b}" for b in SYNTHETIC_BASELINES for r in _SYN_REGIMES)
# `shift_from_<site>`: site names are free text, so these rows never match the federated
# allow-list (aldm_fed.evaluation.site.METRIC_KEY_PATTERN) and stay on the machine that ran them.
SHIFT_PREFIX = "shift_from_"
_SITE_NAME = re.compile(r"[A-Za-z0-9_-]+")
RESULTS_FILE = "results.json"
RESULT_FILE = "result.json"
PREDICTIONS_FILE = "predictions.json"
DIFFERENCES_FILE = "differences.json"
# result.json's metrics method: 2 = two-stage bootstrap (patients and seeds, too_few_to_conclude).
# A finished run saved under another version has its metrics recomputed from its predictions.
METRICS_VERSION = 2
# The numbers of one paired difference that a site's metrics keep (`diff.<a>__<b>.<name>`).
DIFFERENCE_NUMBERS: tuple[str, ...] = ("auc_mean", "auc_ci_low", "auc_ci_high", "n_boot_valid", "n_patients")
_SECTIONS = ("task", "slice", "volume", "network", "train", "augmentation", "regimes", "syn_ratio",
             "seeds", "eval")
_EVAL_DEFAULTS: dict[str, Any] = {"threshold": 0.5, "n_boot": DEFAULT_N_BOOT, "ci": 0.95, "predict_batch_size": 64}
_SLICE_DEFAULTS: dict[str, Any] = {"axis": -1, "min_brain_fraction": 0.0}


@dataclass(frozen=True)
class ClassifierSettings:
    """The `classifier` config group, validated (configs/classifier/{slice,volume}.yaml).

    Attributes:
        task: "slice" or "volume".
        network: the `network` group (for `build_classifier`).
        train: budget and optimizer.
        augmentation: classic augmentation of the `real_aug` regime.
        regimes: regimes `run_regimes` runs, in order.
        syn_ratio: synthetic volumes per real volume in `real_syn`.
        seeds: training seeds.
        threshold: decision threshold of balanced accuracy and F1.
        n_boot: bootstrap resamples.
        ci: interval coverage.
        predict_batch_size: samples per forward pass at test time.
        slice_axis: axis of the slice task (-1: axial).
        min_brain_fraction: slice filter of the slice task.
        volume: the `volume` section as given (label_column, label_map: read by the caller that
            builds the items).
    """

    task: str
    network: dict[str, Any]
    train: ClassifierTrainConfig
    augmentation: AugmentConfig
    regimes: tuple[str, ...]
    syn_ratio: float
    seeds: tuple[int, ...]
    threshold: float = 0.5
    n_boot: int = DEFAULT_N_BOOT
    ci: float = 0.95
    predict_batch_size: int = 64
    slice_axis: int = -1
    min_brain_fraction: float = 0.0
    volume: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> ClassifierSettings:
        """Validate the `classifier` group.

        Args:
            cfg: mapping or DictConfig (e.g. `OmegaConf.load("configs/classifier/slice.yaml")`).

        Raises:
            ValueError: unknown/missing keys or bad values, named as `classifier.<key>`.
        """
        if isinstance(cfg, ClassifierSettings):
            return cfg
        c = plain_config(cfg)
        if not isinstance(c, dict):
            raise ValueError(f"classifier: expected a mapping, got {type(c).__name__}")
        unknown = sorted(set(c) - set(_SECTIONS))
        missing = [k for k in ("task", "network", "train") if k not in c]
        if unknown or missing:
            raise ValueError(f"classifier: unknown key(s) {unknown}, missing key(s) {missing}")
        task = c["task"]
        if task not in TASKS:
            raise ValueError(f"classifier.task: expected one of {TASKS}, got {task!r}")
        dims = classifier_spatial_dims(c["network"])
        if dims != (2 if task == "slice" else 3):
            raise ValueError(f"classifier.network.spatial_dims is {dims}, but the {task} task needs "
                             f"{2 if task == 'slice' else 3}")
        regimes = tuple(c.get("regimes", REGIMES))
        bad = [r for r in regimes if r not in REGIMES]
        if bad or not regimes or len(set(regimes)) != len(regimes):
            raise ValueError(f"classifier.regimes: expected distinct names from {REGIMES}, got {list(regimes)}")
        seeds = tuple(c.get("seeds", (0,)))
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"classifier.seeds: expected a non-empty list of integers, got {list(seeds)}")
        ratio = c.get("syn_ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
            raise ValueError(f"classifier.syn_ratio: expected a number > 0, got {ratio!r}")
        ev = {**_EVAL_DEFAULTS, **(c.get("eval") or {})}
        sl = {**_SLICE_DEFAULTS, **(c.get("slice") or {})}
        for name, section, known in (("eval", ev, _EVAL_DEFAULTS), ("slice", sl, _SLICE_DEFAULTS)):
            extra = sorted(set(section) - set(known))
            if extra:
                raise ValueError(f"classifier.{name}: unknown key(s) {extra} (known: {sorted(known)})")
        n_boot = ev["n_boot"]
        if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
            raise ValueError(f"classifier.eval.n_boot: expected an integer >= 0, got {n_boot!r}")
        if not 0 < float(ev["ci"]) < 1 or not 0 <= float(ev["threshold"]) <= 1:
            raise ValueError(f"classifier.eval: ci must be in (0, 1) and threshold in [0, 1], got {ev}")
        if not isinstance(ev["predict_batch_size"], int) or ev["predict_batch_size"] < 1:
            raise ValueError(f"classifier.eval.predict_batch_size: expected an integer >= 1, "
                             f"got {ev['predict_batch_size']!r}")
        if not 0.0 <= float(sl["min_brain_fraction"]) < 1.0:
            raise ValueError(
                f"classifier.slice.min_brain_fraction: expected [0, 1), got {sl['min_brain_fraction']}"
            )
        if sl["axis"] not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"classifier.slice.axis: expected a spatial axis, got {sl['axis']!r}")
        volume = dict(c.get("volume") or {})
        if task == "volume":
            extra = sorted(set(volume) - {"label_column", "label_map"})
            label_map = volume.get("label_map")
            if extra or not isinstance(label_map, dict) or not label_map or not set(label_map.values()) <= {0, 1}:
                raise ValueError(
                    "classifier.volume: needs label_column and label_map (raw value -> 0/1, e.g. "
                    f"{{HGG: 1, LGG: 0}}) and nothing else; got {volume}"
                )
        return cls(
            task=task,
            network=dict(c["network"]),
            train=ClassifierTrainConfig.from_mapping(c["train"]),
            augmentation=AugmentConfig.from_mapping(c.get("augmentation") or {}),
            regimes=regimes,
            syn_ratio=float(ratio),
            seeds=seeds,
            threshold=float(ev["threshold"]),
            n_boot=int(n_boot),
            ci=float(ev["ci"]),
            predict_batch_size=int(ev["predict_batch_size"]),
            slice_axis=int(sl["axis"]),
            min_brain_fraction=float(sl["min_brain_fraction"]),
            volume=volume,
        )

    def make_task(self, items: Sequence[CaseItem]) -> TaskData:
        """The task of these settings over `items`.

        Args:
            items: the volumes.
        """
        return make_task(self.task, items, min_brain_fraction=self.min_brain_fraction, axis=self.slice_axis)


@dataclass
class RegimeResult:
    """One regime trained with one seed and tested on the real test cases.

    Attributes:
        regime: the regime name.
        seed: training seed.
        task: "slice" or "volume".
        network: network family name.
        metrics: from `classification_metrics` (values + patient-bootstrap CIs + counts).
        n_train_cases_real: real training volumes.
        n_train_cases_syn: synthetic training volumes.
        n_train_samples: training samples (slices or volumes).
        n_test_cases: real test volumes.
        steps: optimizer steps (the shared budget).
        batch_size: samples per step.
        run_dir: where result.json, predictions.json and the training run live.
        y_true: test labels.
        y_score: predicted probabilities of class 1.
        groups: patient id per test sample.
    """

    regime: str
    seed: int
    task: str
    network: str
    metrics: dict[str, Any]
    n_train_cases_real: int
    n_train_cases_syn: int
    n_train_samples: int
    n_test_cases: int
    steps: int
    batch_size: int
    run_dir: str
    y_true: np.ndarray = field(repr=False)
    y_score: np.ndarray = field(repr=False)
    groups: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (predictions left out; they are in predictions.json)."""
        d = asdict(self)
        for key in ("y_true", "y_score", "groups"):
            d.pop(key)
        return d

    def row(self) -> dict[str, Any]:
        """A flat table row: counts, then `<metric>`, `<metric>_ci_low`, `<metric>_ci_high`."""
        out: dict[str, Any] = {
            "regime": self.regime, "seed": self.seed, "task": self.task, "network": self.network,
            "n_train_cases_real": self.n_train_cases_real, "n_train_cases_syn": self.n_train_cases_syn,
            "n_test_cases": self.n_test_cases, "n_test_samples": self.metrics["n_samples"],
        }
        for m in CLASSIFICATION_METRICS:
            out[m] = self.metrics[m]["value"]
            out[f"{m}_ci_low"] = self.metrics[m]["ci_low"]
            out[f"{m}_ci_high"] = self.metrics[m]["ci_high"]
        return out


def shift_regime(site: str) -> str:
    """The domain-shift regime of a classifier trained on `site`'s real cases: `shift_from_<site>`.

    Args:
        site: the training site (letters, digits, '-' or '_').

    Raises:
        ValueError: a site name with other characters.
    """
    if not isinstance(site, str) or not _SITE_NAME.fullmatch(site):
        raise ValueError(f"domain shift: site name {site!r} must be letters, digits, '-' or '_'")
    return SHIFT_PREFIX + site


def is_regime(name: str) -> bool:
    """True for a regime name: `REGIMES`, `BASELINE_REGIMES` or `shift_from_<site>`."""
    if name in REGIMES or name in BASELINE_REGIMES:
        return True
    return name.startswith(SHIFT_PREFIX) and _SITE_NAME.fullmatch(name.removeprefix(SHIFT_PREFIX)) is not None


def regime_kind(name: str) -> str:
    """The regime of `REGIMES` whose training recipe `name` follows: `real_syn_gan` -> `real_syn`,
    `shift_from_A` -> `real_only` (real cases, no augmentation); a name of `REGIMES` -> itself.

    Raises:
        ValueError: not a regime name.
    """
    if name in REGIMES:
        return name
    if name in BASELINE_REGIMES:
        return next(r for r in _SYN_REGIMES if name.startswith(r + "_"))
    if is_regime(name):
        return "real_only"
    raise ValueError(f"unknown regime {name!r}; expected one of {REGIMES + BASELINE_REGIMES} or "
                     f"{SHIFT_PREFIX}<site>")


def order_regimes(names: set[str] | Sequence[str]) -> list[str]:
    """Regime names in report order: `REGIMES`, then the baselines (by `SYNTHETIC_BASELINES`), then
    the domain-shift rows (by site); other names last, sorted."""
    names = set(names)
    known = [*REGIMES, *BASELINE_REGIMES]
    shifts = sorted(n for n in names if n not in known and is_regime(n))
    return [n for n in known if n in names] + shifts + sorted(names - set(known) - set(shifts))


def comparison_pairs(regimes: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) pairs whose AUC difference a - b a report shows: each ALDM regime against the same
    regime with each baseline's set, and `real_only` against each domain-shift row (the gap of
    training at another site).

    Args:
        regimes: the regimes present.
    """
    present = set(regimes)
    pairs = [(kind, f"{kind}_{b}") for b in SYNTHETIC_BASELINES for kind in _SYN_REGIMES
             if f"{kind}_{b}" in present]
    return pairs + [("real_only", r) for r in order_regimes(present) if r.startswith(SHIFT_PREFIX)]


def difference_pairs(regimes: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) pairs whose paired AUC difference a - b `paired_differences` computes: the synthetic
    data effect `real_syn` - `real_only`, then `comparison_pairs`.

    Args:
        regimes: the regimes present.
    """
    first = [("real_syn", "real_only")] if {"real_syn", "real_only"} <= set(regimes) else []
    return first + comparison_pairs(regimes)


def difference_name(a: str, b: str) -> str:
    """The name of the difference a - b in flat metrics: `<a>__<b>` (regime names hold no "__")."""
    return f"{a}__{b}"


def read_predictions(
    run_dir: str | os.PathLike[str], regime: str, seeds: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test predictions of one regime's runs (`<run_dir>/<regime>/seed_<s>/predictions.json`).

    Args:
        run_dir: the `run_regimes` folder.
        regime: the regime.
        seeds: the seeds to read, in order.

    Returns:
        (y_true (N,), scores (len(seeds), N), patient per sample (N,)).

    Raises:
        FileNotFoundError: a seed's file is missing (the run did not finish).
        ValueError: the seeds were tested on different samples.
    """
    y_true = groups = None
    scores = []
    for seed in seeds:
        path = Path(run_dir) / regime / f"seed_{seed}" / PREDICTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no predictions; run the regime {regime!r} (seed {seed}) first")
        rec = json.loads(path.read_text(encoding="utf-8"))
        y, g = np.asarray(rec["y_true"], dtype=np.int64), np.asarray(rec["groups"], dtype=str)
        if y_true is None:
            y_true, groups = y, g
        elif not (np.array_equal(y, y_true) and np.array_equal(g, groups)):
            raise ValueError(f"{path}: other test samples than seed {seeds[0]} of {regime!r}")
        scores.append(np.asarray(rec["y_score"], dtype=np.float64))
    if y_true is None:
        raise ValueError(f"read_predictions: no seeds given for {regime!r}")
    return y_true, np.stack(scores), groups


def paired_differences(
    rows: Sequence[Mapping[str, Any]],
    run_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any] | ClassifierSettings | Any,
) -> list[dict[str, Any]]:
    """Paired AUC differences of the regime pairs of `difference_pairs` that ran, from their
    predictions; written to `run_dir/differences.json` (atomically).

    For each pair (a, b): the seeds both ran, paired by seed; each bootstrap resample draws test
    patients once for both regimes, and seed pairs (`metrics.paired_auc_difference`, the
    classifier's `n_boot` and `ci`, resampling seed 0 as the per-regime intervals).

    Args:
        rows: `run_regimes`' table (rows with `status` "ok" count).
        run_dir: the `run_regimes` folder.
        cfg: the `classifier` config group (or `ClassifierSettings`).

    Returns:
        One row per pair: `a`, `b`, `auc_mean` (seed-mean AUC(a) - AUC(b)), `auc_ci_low`,
        `auc_ci_high`, `n_boot_valid`, `n_seeds`, `n_patients`, `n_boot`, `ci`, `excludes_zero`,
        `too_few_to_conclude` (fewer than `metrics.MIN_PATIENTS` test patients).

    Raises:
        FileNotFoundError, ValueError: as `read_predictions`; two regimes tested on different samples.
    """
    s = ClassifierSettings.from_mapping(cfg)
    run_dir = Path(run_dir)
    ok = {str(r["regime"]): r for r in rows if r.get("status") == "ok"}
    out: list[dict[str, Any]] = []
    for a, b in difference_pairs(order_regimes(set(ok))):
        seeds = [x for x in ok[a]["seeds"] if x in set(ok[b]["seeds"])]
        if not seeds:
            continue
        ya, sa, ga = read_predictions(run_dir, a, seeds)
        yb, sb, gb = read_predictions(run_dir, b, seeds)
        if not (np.array_equal(ya, yb) and np.array_equal(ga, gb)):
            raise ValueError(f"{run_dir}: {a!r} and {b!r} were tested on different samples; a paired "
                             "difference needs the same test set")
        d = paired_auc_difference(ya, list(sa), list(sb), ga, n_boot=s.n_boot, ci=s.ci, seed=0)
        lo, hi = d["ci_low"], d["ci_high"]
        out.append({"a": a, "b": b, "auc_mean": d["mean"], "auc_ci_low": lo, "auc_ci_high": hi,
                    "n_boot_valid": d["n_boot_valid"], "n_seeds": d["n_seeds"], "n_patients": d["n_groups"],
                    "n_boot": s.n_boot, "ci": s.ci,
                    "excludes_zero": bool(lo > 0 or hi < 0),  # NaN bounds (no resample): False
                    "too_few_to_conclude": d["too_few_to_conclude"]})
    _write_summary(run_dir / DIFFERENCES_FILE, {
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": {"difference": "AUC(a) - AUC(b), mean over the seeds both ran (paired by seed)",
                  "ci": f"{s.ci:.0%} paired two-stage bootstrap ({s.n_boot} resamples): each resample "
                        "draws test patients once for both regimes, and the seed pairs",
                  "too_few_to_conclude": f"fewer than {MIN_PATIENTS} test patients: no conclusion"},
        "pairs": out,
    })
    return out


def select_synthetic(items: Sequence[CaseItem], n_real: int, ratio: float, seed: int) -> list[CaseItem]:
    """The synthetic volumes of `real_syn`: round(ratio x n_real) of them, drawn without
    replacement by `seed`.

    Args:
        items: the synthetic pool.
        n_real: real training volumes.
        ratio: synthetic per real volume.
        seed: draw seed (the regime's training seed).

    Raises:
        ValueError: the pool is smaller than asked for (lower `syn_ratio` or synthesise more).
    """
    n = int(round(ratio * n_real))
    if n < 1:
        raise ValueError(f"syn_ratio {ratio} x {n_real} real volumes asks for no synthetic volume")
    if n > len(items):
        raise ValueError(f"syn_ratio {ratio} x {n_real} real volumes needs {n} synthetic volumes, "
                         f"only {len(items)} given")
    rng = np.random.default_rng(stable_seed("aldm-fed/real_syn", int(seed)))
    pick = np.sort(rng.choice(len(items), size=n, replace=False))
    return [items[int(i)] for i in pick]


def _check_origin(items: Sequence[CaseItem], synthetic: bool, what: str) -> None:
    wrong = [it.group for it in items if it.synthetic != synthetic]
    if wrong:
        kind = "real" if synthetic else "synthetic"
        raise ValueError(f"{what} holds {kind} item(s) {wrong[:10]}: pass real and synthetic volumes "
                         "in their own lists")


def _training_items(
    name: str, real: Sequence[CaseItem], syn: Sequence[CaseItem], s: ClassifierSettings, seed: int
) -> tuple[list[CaseItem], list[CaseItem]]:
    name = regime_kind(name)
    if name in ("real_only", "real_aug", "oracle"):
        return list(real), []
    if name == "real_syn":
        return list(real), select_synthetic(syn, len(real), s.syn_ratio, seed)
    return [], list(syn)  # syn_only


def run_regime(
    name: str,
    train_items_real: Sequence[CaseItem],
    train_items_syn: Sequence[CaseItem],
    test_items: Sequence[CaseItem],
    cfg: Mapping[str, Any] | ClassifierSettings | Any,
    run_dir: str | os.PathLike[str],
    seed: int,
    *,
    device: DeviceSetup | None = None,
    overwrite: bool = False,
) -> RegimeResult:
    """Train the configured classifier under one regime and test it on real held-out cases.

    Args:
        name: one of `REGIMES`, `BASELINE_REGIMES` or `shift_from_<site>` (`regime_kind` says
            which recipe). For "oracle", `train_items_real` is the large real pool; for a
            domain-shift regime, the other site's real cases.
        train_items_real: real training volumes (the K target cases, or the oracle pool).
        train_items_syn: synthetic volumes (used by real_syn and syn_only; may be empty otherwise).
        test_items: held-out real volumes of the site.
        cfg: the `classifier` config group (or `ClassifierSettings`).
        run_dir: this regime-and-seed's folder.
        seed: training seed (network init, batch order, augmentation, synthetic draw).
        device: from `resolve_device`; None = `resolve_device("auto")`.
        overwrite: retrain even if `run_dir` holds a run with another config.

    Raises:
        ValueError: unknown regime, synthetic test items, patient leakage, items in the wrong
            list, no training data for the regime, or a test/train set with one class.
    """
    regime_kind(name)  # raises for an unknown name
    s = ClassifierSettings.from_mapping(cfg)
    run_dir = Path(run_dir)
    setup = device or resolve_device("auto")

    # 1. Which volumes train; the guards.
    check_real_test_items(test_items)
    _check_origin(train_items_real, False, "train_items_real")
    _check_origin(train_items_syn, True, "train_items_syn")
    real, syn = _training_items(name, train_items_real, train_items_syn, s, seed)
    train_items = real + syn
    if not train_items:
        raise ValueError(f"regime {name!r} has no training volumes (real: {len(real)}, synthetic: {len(syn)})")
    check_no_leakage(training_groups(train_items), [it.group for it in test_items])

    # 2. Tasks.
    train = s.make_task(train_items)
    test = s.make_task(test_items)
    if test.labels.min() == test.labels.max():
        raise ValueError(f"the real test set holds only class {int(test.labels[0])}: AUC is undefined")

    # 3. Train (same init for every regime at one seed, so regimes differ only in their data).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed("aldm-fed/classifier-init", int(seed)) % 2**63)
        model = build_classifier(s.network, train.in_channels)
    augment = s.augmentation if name == "real_aug" else None
    identity = {
        "regime": name,
        "task": s.task,
        # Only the chosen family's block: editing an unused block must not void finished runs.
        "network": {k: s.network[k] for k in ("name", "spatial_dims", s.network["name"])},
        "train": plain_config(s.train),
        "augmentation": plain_config(augment) if augment is not None else None,
        "min_brain_fraction": s.min_brain_fraction,
        "slice_axis": s.slice_axis,
        # The volumes themselves: a run dir trained on other cases must not be reused ...
        "train_groups": sorted(it.group for it in train_items),
        # ... nor on the same ids with other content (re-synthesised cases, another preprocessing).
        "train_content": sorted(f"{it.group}={it.content_key}" for it in train_items),
    }
    test_content = sorted(f"{it.group}={it.content_key}" for it in test_items)

    def result_of(y_score: np.ndarray) -> RegimeResult:
        metrics = classification_metrics(test.labels, y_score, test.groups, n_boot=s.n_boot, ci=s.ci,
                                          threshold=s.threshold, seed=seed)
        return RegimeResult(
            regime=name, seed=seed, task=s.task, network=str(s.network["name"]), metrics=metrics,
            n_train_cases_real=len(real), n_train_cases_syn=len(syn), n_train_samples=len(train),
            n_test_cases=len(test_items), steps=s.train.steps, batch_size=s.train.batch_size,
            run_dir=str(run_dir), y_true=test.labels.copy(), y_score=y_score, groups=test.groups.copy(),
        )

    # 3a. Finished before on the same volumes and test set: read back; nothing is trained or
    # written, unless the interval settings (or their method) changed, which rewrites result.json.
    saved = None if overwrite else _finished(run_dir, identity, test_content, test)
    if saved is not None:
        record, y_score = saved
        result = result_of(y_score)
        if (_json_text(record.get("metrics")) != _json_text(result.metrics)  # n_boot, ci or threshold changed
                or record.get("metrics_version") != METRICS_VERSION):
            atomic_write_json(run_dir / RESULT_FILE, {**record, **result.to_dict(), "metrics_version": METRICS_VERSION})
        return result
    trained = train_classifier(model, train, run_dir / "train", s.train, seed=seed, augment=augment,
                               device=setup, config=identity, overwrite=overwrite)

    # 4. Test on the real cases, two-stage bootstrap.
    result = result_of(predict_proba(trained.model, test, batch_size=s.predict_batch_size, device=setup))
    atomic_write_json(run_dir / PREDICTIONS_FILE, {
        "y_true": result.y_true.tolist(),
        "y_score": result.y_score.tolist(),
        "groups": [str(g) for g in result.groups],
    })
    atomic_write_json(run_dir / RESULT_FILE, {**result.to_dict(), "identity": identity, "test_content": test_content,
                                              "metrics_version": METRICS_VERSION,
                                              "class_weights": list(trained.class_weights)})
    return result


def _write_summary(path: Path, doc: dict[str, Any]) -> None:
    """Write a summary file unless it already says the same (its "created" time aside), so reading a
    finished evaluation back leaves every file as it was."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and _json_text({**old, "created": None}) == _json_text({**doc, "created": None}):
        return
    atomic_write_json(path, doc)


def _json_ready(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _json_text(obj: Any) -> str:
    # Compared as text: NaN bounds (no interval) never equal themselves as floats.
    return json.dumps(obj, sort_keys=True)


def _finished(run_dir: Path, identity: Mapping[str, Any], test_content: list[str],
              test: TaskData) -> tuple[dict[str, Any], np.ndarray] | None:
    """(result.json, the saved test scores) of a run finished on the same training identity and test
    samples, else None (then the regime trains, resuming whatever checkpoint it has)."""
    try:
        record = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
        preds = json.loads((run_dir / PREDICTIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("identity") != _json_ready(dict(identity)) or record.get("test_content") != test_content:
        return None
    y, g = np.asarray(preds.get("y_true", []), dtype=np.int64), np.asarray(preds.get("groups", []), dtype=str)
    if not (np.array_equal(y, test.labels) and np.array_equal(g, test.groups.astype(str))):
        return None
    return record, np.asarray(preds["y_score"], dtype=np.float64)


def _skipped(name: str, reason: str, s: ClassifierSettings) -> dict[str, Any]:
    return {"regime": name, "status": "skipped", "reason": reason, "task": s.task,
            "network": str(s.network["name"])}


def run_regimes(
    train_items_real: Sequence[CaseItem],
    train_items_syn: Sequence[CaseItem],
    test_items: Sequence[CaseItem],
    cfg: Mapping[str, Any] | ClassifierSettings | Any,
    run_dir: str | os.PathLike[str],
    *,
    oracle_items: Sequence[CaseItem] | None = None,
    baseline_items: Mapping[str, Sequence[CaseItem]] | None = None,
    shift_items: Mapping[str, Sequence[CaseItem]] | None = None,
    regimes: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    device: DeviceSetup | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run every regime for every seed and write `run_dir/results.json` (atomically).

    Args:
        train_items_real: the K real target volumes.
        train_items_syn: synthetic volumes (empty: real_syn and syn_only are skipped).
        test_items: held-out real volumes.
        cfg: the `classifier` config group (or `ClassifierSettings`).
        run_dir: output folder (one subfolder per regime and seed).
        oracle_items: many real target volumes for the oracle (None: oracle skipped).
        baseline_items: baseline name (`SYNTHETIC_BASELINES`) -> its synthetic volumes: runs
            `real_syn_<b>` / `syn_only_<b>` for each of `real_syn` / `syn_only` that runs (an empty
            set: skipped). `real_syn_<b>` draws its volumes with the same seeds as `real_syn`, so
            with sets made from the same masks the draws are paired.
        shift_items: training site -> its real volumes: runs `shift_from_<site>` (trained there,
            tested on `test_items`), after the other regimes.
        regimes: override of `cfg.regimes` (names of `REGIMES`).
        seeds: override of `cfg.seeds`.
        device: from `resolve_device`; None = auto.
        overwrite: retrain runs whose folder holds another config.

    Returns:
        One row per regime: `status` ("ok" / "skipped" + `reason`), counts, and per metric
        `<m>_mean`, `<m>_std` (over seeds) and `<m>_ci_low` / `<m>_ci_high` (patient-bootstrap
        interval of the seed-mean, `aggregate_seeds`).
    """
    s = ClassifierSettings.from_mapping(cfg)
    names = tuple(regimes) if regimes is not None else s.regimes
    bad = [r for r in names if r not in REGIMES]
    if bad:
        raise ValueError(f"unknown regime(s) {bad}; expected names from {REGIMES}")
    seed_list = tuple(seeds) if seeds is not None else s.seeds
    if not seed_list:
        raise ValueError("no seeds to run")
    unknown = sorted(set(baseline_items or {}) - set(SYNTHETIC_BASELINES))
    if unknown:
        raise ValueError(f"unknown synthetic baseline(s) {unknown}; expected names from {SYNTHETIC_BASELINES}")
    run_dir = Path(run_dir)
    setup = device or resolve_device("auto")

    # (name, real training pool, synthetic pool) per regime, in report order.
    jobs: list[tuple[str, Sequence[CaseItem] | None, Sequence[CaseItem]]] = [
        (name, oracle_items if name == "oracle" else train_items_real, train_items_syn) for name in names
    ]
    for b in SYNTHETIC_BASELINES:
        if baseline_items and b in baseline_items:
            jobs += [(f"{kind}_{b}", train_items_real, baseline_items[b]) for kind in _SYN_REGIMES if kind in names]
    jobs += [(shift_regime(site), items, []) for site, items in (shift_items or {}).items()]
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for name, real, syn in jobs:
        kind = regime_kind(name)
        if kind in _SYN_REGIMES and not syn:
            rows.append(_skipped(name, "no synthetic volumes given", s))
            continue
        if kind == "oracle" and not real:
            rows.append(_skipped(name, "no oracle cases (the cohort has no large real target pool)", s))
            continue
        if not real and kind != "syn_only":
            rows.append(_skipped(name, "no real training cases given", s))
            continue
        assert real is not None
        results = [
            run_regime(name, real, syn, test_items, s, run_dir / name / f"seed_{seed}", seed,
                       device=setup, overwrite=overwrite)
            for seed in seed_list
        ]
        runs += [{**r.row(), "run_dir": r.run_dir} for r in results]
        first = results[0]
        agg = aggregate_seeds(first.y_true, [r.y_score for r in results], first.groups, n_boot=s.n_boot,
                              ci=s.ci, threshold=s.threshold, seed=0)
        row: dict[str, Any] = {
            "regime": name, "status": "ok", "task": s.task, "network": first.network,
            "n_seeds": len(results), "seeds": list(seed_list),
            "n_train_cases_real": first.n_train_cases_real, "n_train_cases_syn": first.n_train_cases_syn,
            "n_test_cases": first.n_test_cases, "n_test_samples": agg["n_samples"],
            "n_test_patients": agg["n_groups"], "steps": first.steps, "batch_size": first.batch_size,
        }
        for m in CLASSIFICATION_METRICS:
            row |= {f"{m}_mean": agg[m]["mean"], f"{m}_std": agg[m]["std"],
                    f"{m}_ci_low": agg[m]["ci_low"], f"{m}_ci_high": agg[m]["ci_high"]}
        row["n_boot_valid"] = agg["n_boot_valid"]
        rows.append(row)

    _write_summary(run_dir / RESULTS_FILE, {
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": s.task,
        "device": setup.description,
        "settings": plain_config(s),
        "notes": {
            "test": "held-out real cases only",
            "ci": f"{s.ci:.0%} two-stage bootstrap ({s.n_boot} resamples: test patients, then training "
                  "seeds) of the seed-mean metric",
            "std": "sample standard deviation over training seeds",
            "threshold": f"balanced accuracy and F1 at probability >= {s.threshold}",
        },
        "table": rows,
        "runs": runs,
    })
    return rows
