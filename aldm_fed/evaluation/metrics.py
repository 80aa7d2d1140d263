"""Evaluation metrics: classification (with patient-level bootstrap) and image quality.

Classification (scikit-learn): ROC AUC on the scores, balanced accuracy and F1 (positive class 1)
on `score >= threshold` (0.5 by default: the scores are sigmoid probabilities). Confidence
intervals come from a **two-stage bootstrap** over patients and training seeds: each resample
draws the test patients with replacement and takes all their samples (slices) along, because
slices of one patient are not independent, and draws the training seeds with replacement too,
because a classifier's result depends on its seed as much as on which patients it is tested on.
An interval from patients alone would hide the seeds' disagreement. With one seed it is the plain
patient-level bootstrap. Resamples holding one class only (AUC undefined) are dropped for every
metric, and their count is reported. With fewer than `MIN_PATIENTS` test patients an interval is
still computed but says nothing reliable (a bootstrap over 4 patients has 35 distinct resamples):
`too_few_to_conclude` marks it, and reports claim no evidence from it.

Image quality (MONAI):

| name | what |
|---|---|
| `ssim` | SSIM (3D, data range 1, 11-voxel Gaussian window) of each synthetic volume to its paired real case, averaged |
| `ms_ssim_diversity` | mean pairwise MS-SSIM among synthetic samples (lower = more diverse); kernel and scale weights picked for the volume size (`ms_ssim_settings`) |
| `mmd` | MONAI `MMDMetric` between real and synthetic batches (linear-kernel unbiased estimator) |
| `fd_rand_resnet10_2d` | Frechet distance of axial-slice features of a randomly initialised 2D ResNet-10 |
| `fd_rand_resnet10_3d` | Frechet distance of volume features of a randomly initialised 3D ResNet-10 |

The Frechet distances are **not FID**: no Inception network (it would need a download and
torchvision). The features come from MONAI ResNet-10 (basic blocks, layers [1, 1, 1, 1], width
factor 0.25 -> 128 global-average-pooled features, first conv 7 stride 2), built with
`torch.manual_seed(0)` and used in eval mode, never trained. A fixed random network is a
known, reproducible (for a given torch version) if weaker feature space; values are comparable
only with other `fd_rand_*` values, never with published FIDs. The names say so.
"""

from __future__ import annotations

import re

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import LinAlgWarning
from scipy.stats import rankdata
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from torch import nn

__all__ = [
    "CLASSIFICATION_METRICS",
    "DEFAULT_N_BOOT",
    "MIN_PATIENTS",
    "set_metric_pattern",
    "FD_2D_NAME",
    "FD_3D_NAME",
    "FeatureNetSpec",
    "MSSSIMSettings",
    "aggregate_seeds",
    "axial_slices",
    "bootstrap_group_indices",
    "bootstrap_seed_weights",
    "classification_metrics",
    "extract_features",
    "frechet_distance",
    "frechet_distance_2d",
    "frechet_distance_3d",
    "image_quality_metrics",
    "mmd",
    "ms_ssim_diversity",
    "ms_ssim_settings",
    "paired_auc_difference",
    "point_metrics",
    "random_feature_net",
    "ssim",
    "ssim_per_pair",
    "too_few_to_conclude",
]

CLASSIFICATION_METRICS: tuple[str, ...] = ("auc", "balanced_accuracy", "f1")
# Below this many test patients an interval is marked "too few to conclude" (`too_few_to_conclude`).
MIN_PATIENTS = 10
DEFAULT_N_BOOT = 2000
FD_2D_NAME = "fd_rand_resnet10_2d"
FD_3D_NAME = "fd_rand_resnet10_3d"


# ============================================================================================
# Classification
# ============================================================================================


def _check_binary(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.shape[-1] != y.shape[0]:
        raise ValueError(f"y_true must be 1-D and match the scores; got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold 0/1 labels, got values {np.unique(y)[:10]}")
    if not np.isfinite(s).all():
        raise ValueError("y_score holds NaN or infinite values")
    return y.astype(np.int64), s


def point_metrics(y_true: Any, y_score: Any, threshold: float = 0.5) -> dict[str, float]:
    """AUC, balanced accuracy and F1 of one set of scores (no interval).

    Args:
        y_true: 0/1 labels, shape (N,); both classes must occur.
        y_score: scores (probabilities of class 1), shape (N,).
        threshold: `score >= threshold` is predicted positive (balanced accuracy, F1).

    Raises:
        ValueError: bad shapes or labels, or only one class in `y_true` (AUC undefined).
    """
    y, s = _check_binary(y_true, y_score)
    if y.min() == y.max():
        raise ValueError(f"AUC is undefined: y_true holds only class {int(y[0])}")
    return _metrics(y, s, threshold)


def _metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (s >= threshold).astype(np.int64)
    return {
        "auc": float(roc_auc_score(y, s)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0.0)),
    }


def _fast_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    # The same three numbers as `_metrics` (sklearn) from ranks and confusion counts, ~10x faster:
    # the bootstrap evaluates them thousands of times. AUC = Mann-Whitney U / (n_pos n_neg) with
    # average ranks for ties, which is exactly sklearn's roc_auc_score; a test checks the match.
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = y.shape[0] - n_pos
    auc = _rank_auc(y, s)
    pred = s >= threshold
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    fn = n_pos - tp
    tn = n_neg - fp
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"auc": float(auc), "balanced_accuracy": 0.5 * (tp / n_pos + tn / n_neg), "f1": float(f1)}


def _rank_auc(y: np.ndarray, s: np.ndarray) -> np.ndarray | float:
    """ROC AUC from ranks (Mann-Whitney U / (n_pos n_neg), ties averaged: sklearn's value) of one
    score row (N,) -> float, or of several rows (R, N) -> (R,); `y` must hold both classes."""
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = y.shape[0] - n_pos
    ranks = rankdata(s, axis=-1)
    auc = (ranks[..., pos].sum(axis=-1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return float(auc) if np.ndim(auc) == 0 else auc


def bootstrap_group_indices(groups: Any, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Sample indices of `n_boot` patient-level bootstrap resamples.

    Each resample draws as many patients as there are, with replacement, and takes every sample
    of each drawn patient (a patient drawn twice contributes its samples twice).

    Args:
        groups: patient id per sample, shape (N,).
        n_boot: number of resamples.
        seed: seed of the resampling.
    """
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] == 0:
        raise ValueError(f"groups must be a non-empty 1-D array, got shape {g.shape}")
    _, codes = np.unique(g.astype(str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes))
    members = np.split(order, bounds[:-1])
    rng = np.random.default_rng(seed)
    n_groups = len(members)
    for _ in range(n_boot):
        drawn = rng.integers(0, n_groups, size=n_groups)
        yield np.concatenate([members[i] for i in drawn])


def bootstrap_seed_weights(n_seeds: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The second stage of the two-stage bootstrap: per resample, how often each training seed is drawn.

    Each resample draws `n_seeds` seeds with replacement; the weights (counts / n_seeds) turn the
    per-seed metrics into the resample's seed mean. One seed: always weight 1.

    Args:
        n_seeds: training seeds.
        n_boot: number of resamples (as `bootstrap_group_indices`, which it is zipped with).
        seed: seed of the resampling (its own stream, apart from the patients' draws).
    """
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
    rng = np.random.default_rng([seed, 0x5EED5])
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, n_seeds, size=n_seeds), minlength=n_seeds) / n_seeds


def too_few_to_conclude(n_patients: int | None) -> bool:
    """True when an interval over `n_patients` test patients supports no conclusion (< MIN_PATIENTS)."""
    return n_patients is not None and n_patients < MIN_PATIENTS


def _two_stage(groups: np.ndarray, n_seeds: int, n_boot: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # (sample indices, seed weights) of each resample: patients and seeds drawn independently.
    return zip(bootstrap_group_indices(groups, n_boot, seed), bootstrap_seed_weights(n_seeds, n_boot, seed))


def _bootstrap_scores(
    y: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_boot: int, threshold: float, seed: int
) -> tuple[dict[str, np.ndarray], int]:
    # Seed-mean metric per resample of patients and seeds (one seed = the plain patient bootstrap).
    values: dict[str, list[float]] = {m: [] for m in CLASSIFICATION_METRICS}
    for idx, weights in _two_stage(groups, scores.shape[0], n_boot, seed):
        yb = y[idx]
        if yb.min() == yb.max():
            continue  # one class only: AUC undefined, and BAcc/F1 would be misleading
        drawn = np.flatnonzero(weights)
        per_seed = [_fast_metrics(yb, scores[i][idx], threshold) for i in drawn]
        for m in CLASSIFICATION_METRICS:
            values[m].append(float(sum(weights[i] * r[m] for i, r in zip(drawn, per_seed))))
    n_valid = len(values["auc"])
    return {m: np.asarray(v) for m, v in values.items()}, n_valid


def _interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _check_boot_args(n_boot: int, ci: float, threshold: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")


def _groups_or_samples(groups: Any, n: int) -> tuple[np.ndarray, str]:
    if groups is None:
        return np.arange(n).astype(str), "sample"
    g = np.asarray(groups).astype(str)
    if g.shape != (n,):
        raise ValueError(f"groups must have one entry per sample ({n}), got shape {g.shape}")
    return g, "group"


def classification_metrics(
    y_true: Any,
    y_score: Any,
    groups: Any = None,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    ci: float = 0.95,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC, balanced accuracy and F1 with patient-level bootstrap confidence intervals.

    Args:
        y_true: 0/1 labels, shape (N,); both classes must occur.
        y_score: probabilities of class 1, shape (N,).
        groups: patient id per sample (resampling unit). None resamples single samples, which
            is only right when each sample is its own patient (volume task).
        n_boot: bootstrap resamples (0: no interval, bounds NaN).
        ci: interval coverage (0.95 -> 2.5th and 97.5th percentiles).
        threshold: `score >= threshold` predicts class 1 (balanced accuracy, F1).
        seed: seed of the resampling.

    Returns:
        `{"auc": {"value", "ci_low", "ci_high"}, "balanced_accuracy": {...}, "f1": {...},
        "n_samples", "n_groups", "n_pos", "n_boot", "n_boot_valid", "ci", "threshold",
        "resample_unit", "too_few_to_conclude"}`. `n_boot_valid` counts resamples holding both
        classes; the interval uses those only.
    """
    _check_boot_args(n_boot, ci, threshold)
    y, s = _check_binary(y_true, y_score)
    if s.ndim != 1:
        raise ValueError(f"y_score must be 1-D, got shape {s.shape}; use aggregate_seeds for several")
    point = point_metrics(y, s, threshold)
    g, unit = _groups_or_samples(groups, y.shape[0])
    boot, n_valid = _bootstrap_scores(y, s[None], g, n_boot, threshold, seed)
    out: dict[str, Any] = {}
    for m in CLASSIFICATION_METRICS:
        lo, hi = _interval(boot[m], ci)
        out[m] = {"value": point[m], "ci_low": lo, "ci_high": hi}
    out.update(_counts(y, g, n_boot, n_valid, ci, threshold, unit))
    return out


def _counts(y: np.ndarray, g: np.ndarray, n_boot: int, n_valid: int, ci: float, threshold: float,
            unit: str) -> dict[str, Any]:
    return {
        "n_samples": int(y.shape[0]),
        "n_groups": len(set(g.tolist())),
        "n_pos": int(y.sum()),
        "n_boot": n_boot,
        "n_boot_valid": n_valid,
        "ci": ci,
        "threshold": threshold,
        "resample_unit": unit,
        "too_few_to_conclude": too_few_to_conclude(len(set(g.tolist()))),
    }


def aggregate_seeds(
    y_true: Any,
    scores: Sequence[Any],
    groups: Any = None,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    ci: float = 0.95,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of several training seeds on one test set: mean and std over seeds, and a
    two-stage bootstrap interval of the seed mean.

    Each bootstrap resample draws patients and, independently, training seeds with replacement,
    and averages the drawn seeds' metrics on the drawn patients, so the interval covers both the
    test-set sampling and the spread over seeds.

    Args:
        y_true: 0/1 labels, shape (N,).
        scores: one (N,) score array per seed (same samples, same order).
        groups: patient id per sample (None: each sample is its own patient).
        n_boot: bootstrap resamples.
        ci: interval coverage.
        threshold: decision threshold for balanced accuracy and F1.
        seed: seed of the resampling.

    Returns:
        `{metric: {"mean", "std", "per_seed", "ci_low", "ci_high"}, "n_seeds", ...counts}`; std
        is the sample std (ddof=1), 0 for one seed.
    """
    _check_boot_args(n_boot, ci, threshold)
    if len(scores) == 0:
        raise ValueError("aggregate_seeds needs the scores of at least one seed")
    y, s = _check_binary(y_true, np.stack([np.asarray(x, dtype=np.float64) for x in scores]))
    per_seed = [point_metrics(y, row, threshold) for row in s]
    g, unit = _groups_or_samples(groups, y.shape[0])
    boot, n_valid = _bootstrap_scores(y, s, g, n_boot, threshold, seed)
    out: dict[str, Any] = {}
    for m in CLASSIFICATION_METRICS:
        vals = np.asarray([r[m] for r in per_seed])
        lo, hi = _interval(boot[m], ci)
        out[m] = {
            "mean": float(vals.mean()),
            "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
            "per_seed": vals.tolist(),
            "ci_low": lo,
            "ci_high": hi,
        }
    out["n_seeds"] = int(s.shape[0])
    out.update(_counts(y, g, n_boot, n_valid, ci, threshold, unit))
    return out


def paired_auc_difference(
    y_true: Any,
    scores_a: Sequence[Any],
    scores_b: Sequence[Any],
    groups: Any = None,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC(a) - AUC(b) of two models tested on the same samples, with a PAIRED two-stage
    bootstrap interval (patients, then seed pairs) of the seed-mean difference.

    Both models' scores are resampled with the same patients in each resample (they were tested
    on the same samples), so what the two share (which patients are easy) cancels and the interval
    is that of the difference itself, narrower than two separate intervals side by side. Per
    resample: the seed pairs (seed i of `a` with seed i of `b`) are drawn with replacement too, and
    their differences averaged, so seeds that disagree widen the interval. Resamples holding one class only are dropped and counted. With `seed` equal to that of
    `aggregate_seeds`, the resamples are the very ones of the per-regime intervals.

    Args:
        y_true: 0/1 labels, shape (N,); both classes must occur.
        scores_a: one (N,) score array per training seed of model a.
        scores_b: the same for model b, paired with `scores_a` by position (same seeds, same order).
        groups: patient id per sample (None: each sample is its own patient).
        n_boot: bootstrap resamples (0: no interval, bounds NaN).
        ci: interval coverage (0.95 -> 2.5th and 97.5th percentiles).
        seed: seed of the resampling.

    Returns:
        `{"mean" (mean over seeds of AUC(a) - AUC(b) on all samples), "per_seed", "ci_low",
        "ci_high", "n_seeds", "n_samples", "n_groups", "n_boot", "n_boot_valid", "ci",
        "resample_unit", "too_few_to_conclude"}`.

    Raises:
        ValueError: no seeds, a different number of seeds for a and b, bad shapes or labels, or a
            single class in `y_true`.
    """
    _check_boot_args(n_boot, ci, 0.5)
    if len(scores_a) == 0 or len(scores_a) != len(scores_b):
        raise ValueError(f"paired_auc_difference: give the scores of the same seeds for both models, got "
                         f"{len(scores_a)} and {len(scores_b)} arrays")
    k = len(scores_a)
    y, s = _check_binary(y_true, np.stack([np.asarray(x, dtype=np.float64) for x in [*scores_a, *scores_b]]))
    if y.min() == y.max():
        raise ValueError(f"AUC is undefined: y_true holds only class {int(y[0])}")
    auc = _rank_auc(y, s)
    per_seed = auc[:k] - auc[k:]
    g, unit = _groups_or_samples(groups, y.shape[0])
    diffs = []
    for idx, weights in _two_stage(g, k, n_boot, seed):
        yb = y[idx]
        if yb.min() == yb.max():
            continue  # AUC undefined in this resample
        b = _rank_auc(yb, s[:, idx])
        diffs.append(float(np.dot(weights, b[:k] - b[k:])))  # the drawn seed pairs' mean
    lo, hi = _interval(np.asarray(diffs), ci)
    return {
        "mean": float(per_seed.mean()),
        "per_seed": per_seed.tolist(),
        "ci_low": lo,
        "ci_high": hi,
        "n_seeds": k,
        "n_samples": int(y.shape[0]),
        "n_groups": len(set(g.tolist())),
        "n_boot": n_boot,
        "n_boot_valid": len(diffs),
        "ci": ci,
        "resample_unit": unit,
        "too_few_to_conclude": too_few_to_conclude(len(set(g.tolist()))),
    }


# ============================================================================================
# Image quality
# ============================================================================================


def _to_tensor(x: Any) -> torch.Tensor:
    # Contiguous: NIfTI volumes load Fortran-ordered, and MONAI's MMDMetric `.view()`s its inputs.
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous()
    arr = np.asarray(x)
    if not arr.flags.writeable:  # memory-mapped cache arrays: torch warns on read-only memory
        arr = np.array(arr, order="C")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _as_batch(x: Any, name: str, spatial_dims: int = 3) -> torch.Tensor:
    # (C, *spatial) -> (1, C, *spatial); (B, C, *spatial) unchanged; float32 on CPU.
    t = _to_tensor(x).to("cpu", torch.float32)
    if t.ndim == spatial_dims + 1:
        t = t.unsqueeze(0)
    if t.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name}: expected (C, *spatial) or (B, C, *spatial) with {spatial_dims} spatial dims, "
            f"got shape {tuple(t.shape)}"
        )
    return t


def ssim_per_pair(real: Any, synthetic: Any, *, data_range: float = 1.0, win_size: int = 11) -> np.ndarray:
    """3D SSIM of each synthetic volume to its paired real volume (MONAI `SSIMMetric`).

    Args:
        real: (B, C, S, S, S) or (C, S, S, S) real volumes in [0, data_range].
        synthetic: the same shape; item i is paired with real item i (same patient / mask).
        data_range: intensity range (1 for the cache's [0, 1]).
        win_size: Gaussian window size (MONAI default 11; must not exceed the volume).

    Returns:
        (B,) SSIM per pair, averaged over channels and voxels.
    """
    from monai.metrics import SSIMMetric

    y, y_pred = _as_batch(real, "real"), _as_batch(synthetic, "synthetic")
    if y.shape != y_pred.shape:
        raise ValueError(f"ssim pairs volumes: shapes differ {tuple(y.shape)} vs {tuple(y_pred.shape)}")
    if min(y.shape[2:]) < win_size:
        raise ValueError(f"ssim: win_size {win_size} exceeds the volume {tuple(y.shape[2:])}")
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win_size, reduction="none")
    return metric(y_pred, y).reshape(-1).numpy().astype(np.float64)


def ssim(real: Any, synthetic: Any, *, data_range: float = 1.0, win_size: int = 11) -> float:
    """Mean 3D SSIM of synthetic volumes to their paired real volumes (see `ssim_per_pair`).

    Args:
        real: (B, C, S, S, S) or (C, S, S, S).
        synthetic: the same shape, paired item by item.
        data_range: intensity range.
        win_size: Gaussian window size.
    """
    return float(ssim_per_pair(real, synthetic, data_range=data_range, win_size=win_size).mean())


@dataclass(frozen=True)
class MSSSIMSettings:
    """Kernel and scale weights for MONAI `MultiScaleSSIMMetric` at one volume size.

    Attributes:
        kernel_size: Gaussian kernel size per axis.
        weights: one weight per scale; the volume is halved between scales.
    """

    kernel_size: int
    weights: tuple[float, ...]


_MS_SSIM_DEFAULT_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_settings(size: int) -> MSSSIMSettings:
    """MS-SSIM settings valid for volumes of `size` voxels per side.

    MONAI requires `size // (len(weights) - 1) ** 2 > kernel_size - 1`; its defaults (kernel 11,
    5 scales) need >= 176 voxels. Smaller volumes keep 5 scales with a smaller kernel down to
    48 voxels (64 -> kernel 4), then use 3 scales with kernel 3 and weights (0.3, 0.4, 0.3)
    (32 -> 8 voxels at the coarsest scale).

    Args:
        size: smallest spatial side of the volumes.

    Raises:
        ValueError: volumes smaller than 16 voxels.
    """
    if size >= 176:
        return MSSSIMSettings(11, _MS_SSIM_DEFAULT_WEIGHTS)
    if size >= 48:
        return MSSSIMSettings(min(11, size // 16), _MS_SSIM_DEFAULT_WEIGHTS)
    if size >= 16:
        return MSSSIMSettings(3, (0.3, 0.4, 0.3))
    raise ValueError(f"MS-SSIM needs volumes of at least 16 voxels per side, got {size}")


def ms_ssim_diversity(
    samples: Any, *, data_range: float = 1.0, settings: MSSSIMSettings | None = None, pair_batch: int = 8
) -> float:
    """Mean pairwise 3D MS-SSIM among samples (MONAI `MultiScaleSSIMMetric`); lower = more diverse.

    Args:
        samples: (N, C, S, S, S) volumes, N >= 2 (all N (N - 1) / 2 pairs are compared).
        data_range: intensity range.
        settings: kernel and weights; None picks them from the size (`ms_ssim_settings`).
        pair_batch: pairs compared per MONAI call (memory).

    Raises:
        ValueError: fewer than two samples, or settings the volume size cannot take.
    """
    from monai.metrics import MultiScaleSSIMMetric

    x = _as_batch(samples, "samples")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"ms_ssim_diversity compares pairs of samples: need >= 2, got {n}")
    settings = settings or ms_ssim_settings(min(x.shape[2:]))
    metric = MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=data_range,
        kernel_size=settings.kernel_size,
        weights=settings.weights,
        reduction="none",
    )
    i, j = np.triu_indices(n, k=1)
    # Pairs in chunks: all 1128 pairs of 48 volumes at 3 x 64^3 would need ~7 GB at once.
    if pair_batch < 1:
        raise ValueError(f"pair_batch must be >= 1, got {pair_batch}")
    values = []
    for k in range(0, i.size, pair_batch):
        a, b = torch.as_tensor(i[k : k + pair_batch]), torch.as_tensor(j[k : k + pair_batch])
        values.append(metric(x[a], x[b]).reshape(-1))
    return float(torch.cat(values).mean())


def mmd(real: Any, synthetic: Any, y_mapping: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Maximum mean discrepancy between a real and a synthetic batch (MONAI `MMDMetric`).

    MONAI computes the unbiased linear-kernel estimator of MMD^2 on the flattened volumes
    (mean within-set dot products minus twice the mean cross-set dot product). Two properties
    the tests pin down: it is exactly 0 when every volume in both sets is the same, and adding a
    constant c to every voxel of one set raises it by exactly n_voxels * c^2. For two identical
    sets of *different* volumes it is slightly negative, exactly -2 / (B - 1) times the mean
    squared distance of a volume to its set mean, so it approaches 0 as B grows: an unbiased
    estimator, not a distance.

    Args:
        real: (B, C, *spatial) real volumes, B >= 2.
        synthetic: synthetic volumes, the same shape (MONAI compares equal-sized batches).
        y_mapping: optional transform applied to both before comparison (e.g. a blur).

    Raises:
        ValueError: a batch of fewer than 2, or shapes that differ.
    """
    from monai.metrics import MMDMetric

    y, y_pred = _as_batch(real, "real"), _as_batch(synthetic, "synthetic")
    if y.shape[0] < 2 or y_pred.shape[0] < 2:
        raise ValueError(
            f"mmd needs at least 2 volumes per set (MONAI's estimator divides by B - 1); got "
            f"{y.shape[0]} real and {y_pred.shape[0]} synthetic"
        )
    if y.shape != y_pred.shape:
        raise ValueError(f"mmd compares equal-sized batches: {tuple(y.shape)} vs {tuple(y_pred.shape)}")
    return float(MMDMetric(y_mapping=y_mapping)(y, y_pred))


# -------------------------------------------------------------------- Frechet distance


@dataclass(frozen=True)
class FeatureNetSpec:
    """The fixed random feature network of the Frechet distances.

    Attributes:
        spatial_dims: 2 (axial slices) or 3 (volumes).
        in_channels: modalities.
        seed: torch seed the weights are drawn with.
        widen_factor: MONAI ResNet width factor (0.25 -> 16/32/64/128 channels, 128 features).
    """

    spatial_dims: int
    in_channels: int
    seed: int = 0
    widen_factor: float = 0.25

    @property
    def name(self) -> str:
        """Metric name: `fd_rand_resnet10_{2,3}d` (random ResNet-10, not Inception)."""
        return FD_2D_NAME if self.spatial_dims == 2 else FD_3D_NAME

    def describe(self) -> str:
        return (
            f"MONAI ResNet-10 (basic blocks, layers [1,1,1,1], widen_factor {self.widen_factor}, "
            f"conv1 7 stride 2), {self.spatial_dims}D, {self.in_channels} input channels, random "
            f"init with torch.manual_seed({self.seed}), eval mode, untrained; global average "
            "pooled features. Not Inception: not comparable with FID values."
        )


@functools.lru_cache(maxsize=8)
def random_feature_net(spec: FeatureNetSpec) -> nn.Module:
    """The fixed, randomly initialised ResNet-10 feature extractor of `spec` (cached).

    Built inside a forked RNG so the caller's global torch RNG is untouched.

    Args:
        spec: dims, channels, seed and width.
    """
    from monai.networks.nets import ResNet

    if spec.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spec.spatial_dims}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = ResNet(
            block="basic",
            layers=[1, 1, 1, 1],
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spec.spatial_dims,
            n_input_channels=spec.in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            widen_factor=spec.widen_factor,
            feed_forward=False,  # no FC head: forward returns the pooled features
        )
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@torch.no_grad()
def extract_features(images: Any, spec: FeatureNetSpec, *, batch_size: int = 16) -> torch.Tensor:
    """Global pooled features of `images` under the fixed random network of `spec`.

    Args:
        images: (N, C, *spatial) with spec.spatial_dims spatial dims.
        spec: the feature network.
        batch_size: images per forward pass.

    Returns:
        float64 (N, F) features on CPU.
    """
    x = _as_batch(images, "images", spec.spatial_dims)
    if x.shape[1] != spec.in_channels:
        raise ValueError(f"images have {x.shape[1]} channels, feature net expects {spec.in_channels}")
    net = random_feature_net(spec)
    feats = [net(x[i : i + batch_size]).reshape(min(batch_size, x.shape[0] - i), -1)
             for i in range(0, x.shape[0], batch_size)]
    return torch.cat(feats).double()


def frechet_distance(features_real: Any, features_synthetic: Any) -> float:
    """Frechet distance between two sets of feature vectors (MONAI `FIDMetric`).

    Args:
        features_real: (N, F) features of real images, N >= 2.
        features_synthetic: (M, F) features of synthetic images, M >= 2.

    With fewer vectors than features (16 volumes, 128 features) the covariance estimates are
    singular and the distance is biased upwards at small sizes: compare values only between sets
    of equal sizes.
    """
    from monai.metrics import FIDMetric

    a, b = _to_tensor(features_real), _to_tensor(features_synthetic)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, F) with equal F; got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"a covariance needs >= 2 feature vectors per set; got {a.shape[0]}, {b.shape[0]}")
    with warnings.catch_warnings():
        # N < F (the usual case for volumes) makes the covariances singular; scipy then warns on
        # every call although the square root is still usable (see the docstring).
        warnings.simplefilter("ignore", LinAlgWarning)
        # MONAI 1.6 passes scipy's deprecated `disp=` to sqrtm; not ours to fix.
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning)
        value = float(FIDMetric()(b.double(), a.double()))
    # Two identical sets leave ~1e-8 of sqrtm noise, which can be slightly negative.
    return max(0.0, value)


def axial_slices(volumes: Any, *, min_brain_fraction: float = 0.0, axis: int = -1) -> torch.Tensor:
    """All axial slices of (B, C, S, S, S) volumes as (N, C, S, S), optionally without near-empty ones.

    Args:
        volumes: (B, C, S, S, S) or (C, S, S, S).
        min_brain_fraction: drop slices whose nonzero area (any channel) is below this fraction.
        axis: spatial axis to cut (-1: axial in the RAS cache).
    """
    x = _as_batch(volumes, "volumes")
    a = (axis % 3) + 2
    slices = x.movedim(a, 1).reshape(-1, x.shape[1], *[s for i, s in enumerate(x.shape) if i not in (0, 1, a)])
    if min_brain_fraction > 0:
        frac = (slices.amax(dim=1) > 0).float().mean(dim=(1, 2))
        slices = slices[frac >= min_brain_fraction]
    return slices


def frechet_distance_3d(real: Any, synthetic: Any, *, seed: int = 0, batch_size: int = 8) -> float:
    """`fd_rand_resnet10_3d`: Frechet distance of volume features of the fixed random 3D ResNet-10.

    Args:
        real: (N, C, S, S, S) real volumes, N >= 2.
        synthetic: (M, C, S, S, S) synthetic volumes, M >= 2.
        seed: seed of the random network (0 for reported numbers).
        batch_size: volumes per forward pass.
    """
    r = _as_batch(real, "real")
    spec = FeatureNetSpec(3, int(r.shape[1]), seed)
    return frechet_distance(extract_features(r, spec, batch_size=batch_size),
                            extract_features(synthetic, spec, batch_size=batch_size))


def frechet_distance_2d(
    real: Any, synthetic: Any, *, min_brain_fraction: float = 0.05, seed: int = 0, batch_size: int = 64
) -> float:
    """`fd_rand_resnet10_2d`: Frechet distance of axial-slice features of the fixed random 2D
    ResNet-10 (slices of all volumes pooled per set, as ALDM's per-slice FID).

    Args:
        real: (N, C, S, S, S) real volumes.
        synthetic: (M, C, S, S, S) synthetic volumes.
        min_brain_fraction: leave out slices with less nonzero area than this fraction.
        seed: seed of the random network.
        batch_size: slices per forward pass.
    """
    r = axial_slices(real, min_brain_fraction=min_brain_fraction)
    s = axial_slices(synthetic, min_brain_fraction=min_brain_fraction)
    spec = FeatureNetSpec(2, int(r.shape[1]), seed)
    return frechet_distance(extract_features(r, spec, batch_size=batch_size),
                            extract_features(s, spec, batch_size=batch_size))


def image_quality_metrics(
    real: Any, synthetic: Any, *, paired: bool = True, min_brain_fraction: float = 0.05, seed: int = 0
) -> dict[str, float]:
    """Every image-quality metric for one set of real and synthetic volumes.

    Args:
        real: (N, C, S, S, S) real volumes.
        synthetic: (M, C, S, S, S) synthetic volumes; with `paired`, M == N and item i was
            generated from real case i's mask (SSIM and MMD need pairs / equal sizes).
        paired: compute `ssim` and `mmd` (skipped otherwise).
        min_brain_fraction: slice filter of the 2D Frechet distance.
        seed: seed of the random feature networks.

    Returns:
        {"ssim", "mmd" (when paired), "ms_ssim_diversity", FD_2D_NAME, FD_3D_NAME}.
    """
    out: dict[str, float] = {}
    if paired:
        out["ssim"] = ssim(real, synthetic)
        out["mmd"] = mmd(real, synthetic)
    out["ms_ssim_diversity"] = ms_ssim_diversity(synthetic)
    out[FD_2D_NAME] = frechet_distance_2d(real, synthetic, min_brain_fraction=min_brain_fraction, seed=seed)
    out[FD_3D_NAME] = frechet_distance_3d(real, synthetic, seed=seed)
    return out


def set_metric_pattern(prefix: str, fixed: str, set_names: Sequence[str], set_numbers: Sequence[str]) -> str:
    """A regular expression (for `re.fullmatch`) accepting `<prefix>.<fixed>` and
    `<prefix>.<set>.<number>` for the given synthetic sets and numbers, and nothing else: the
    shareable names of an evaluation section (faithfulness, image quality).

    Args:
        prefix: the section, e.g. "quality".
        fixed: a regular expression of the section's names that belong to no synthetic set.
        set_names: the synthetic sets' fixed names (e.g. ("aldm", "noadapt", "concat", "gan")).
        set_numbers: the numbers each set has.
    """
    names = [re.escape(n) for n in set_names]
    sets = rf"|({'|'.join(names)})\.({'|'.join(map(re.escape, set_numbers))})" if names else ""
    return rf"{re.escape(prefix)}\.({fixed}{sets})"
