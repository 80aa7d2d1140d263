"""Evaluation metrics against known values: sklearn/textbook classification cases, the
two-stage bootstrap (patients, then seeds), SSIM / MS-SSIM / MMD identities, Frechet distances."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from aldm_fed.evaluation.metrics import (
    FD_2D_NAME,
    FD_3D_NAME,
    MIN_PATIENTS,
    FeatureNetSpec,
    _fast_metrics,
    aggregate_seeds,
    axial_slices,
    bootstrap_group_indices,
    bootstrap_seed_weights,
    classification_metrics,
    extract_features,
    frechet_distance,
    frechet_distance_2d,
    frechet_distance_3d,
    image_quality_metrics,
    mmd,
    ms_ssim_diversity,
    ms_ssim_settings,
    paired_auc_difference,
    point_metrics,
    ssim,
    ssim_per_pair,
    too_few_to_conclude,
)

torch.set_num_threads(1)


def volumes(n: int, size: int = 32, channels: int = 2, seed: int = 0) -> np.ndarray:
    """Smooth-ish random volumes in [0, 1] with a zero background border."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, channels, size, size, size)).astype(np.float32)
    x[..., :2, :, :] = 0  # empty caps, like the cache's cube around the brain
    return x


# ---------------------------------------------------------------------------- classification


def test_textbook_case_matches_sklearn() -> None:
    # sklearn's roc_auc_score docstring example: AUC 0.75.
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    m = point_metrics(y, s)
    assert m["auc"] == pytest.approx(0.75)
    # At 0.5 only 0.8 is positive: recall(1) 0.5, recall(0) 1 -> BAcc 0.75; F1 = 2/(2+0+1).
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 / 3)
    assert point_metrics(y, s, threshold=0.3)["balanced_accuracy"] == pytest.approx(0.75)


def test_perfect_inverted_and_random_scores() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    perfect = point_metrics(y, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert perfect == {"auc": 1.0, "balanced_accuracy": 1.0, "f1": 1.0}
    assert point_metrics(y, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1])["auc"] == 0.0
    rng = np.random.default_rng(0)
    y_big = rng.integers(0, 2, 20000)
    assert point_metrics(y_big, rng.random(20000))["auc"] == pytest.approx(0.5, abs=0.02)


def test_fast_bootstrap_metrics_equal_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = (0, 1)
        s = np.round(rng.random(60), 1)  # many ties, and scores exactly at the threshold
        fast = _fast_metrics(y, s, 0.5)
        pred = (s >= 0.5).astype(int)
        assert fast["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert fast["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
        assert fast["f1"] == pytest.approx(f1_score(y, pred, zero_division=0.0), abs=1e-12)


def test_one_class_is_an_error() -> None:
    with pytest.raises(ValueError, match="only class 1"):
        point_metrics([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="0/1"):
        point_metrics([0, 2], [0.2, 0.5])


def _patients(n_patients: int = 12, per: int = 20, seed: int = 0) -> tuple[np.ndarray, ...]:
    # Each patient has a patient-level score offset: slices of one patient are correlated.
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:02d}" for i in range(n_patients)], per)
    y = np.tile(np.r_[np.zeros(per // 2), np.ones(per - per // 2)], n_patients).astype(int)
    offset = np.repeat(rng.normal(0, 0.25, n_patients), per)
    s = 1 / (1 + np.exp(-(2.0 * (y - 0.5) + offset * 4 + rng.normal(0, 0.3, y.size))))
    return y, s, groups


def test_bootstrap_ci_contains_point_and_is_seeded() -> None:
    y, s, g = _patients()
    r = classification_metrics(y, s, g, n_boot=300, seed=3)
    for m in ("auc", "balanced_accuracy", "f1"):
        assert r[m]["ci_low"] <= r[m]["value"] <= r[m]["ci_high"]
        assert r[m]["ci_low"] < r[m]["ci_high"]
    assert r["auc"]["value"] == pytest.approx(roc_auc_score(y, s))
    assert (r["n_samples"], r["n_groups"], r["n_boot"], r["resample_unit"]) == (240, 12, 300, "group")
    assert classification_metrics(y, s, g, n_boot=300, seed=3) == r
    assert classification_metrics(y, s, g, n_boot=300, seed=4)["auc"] != r["auc"]


def test_bootstrap_resamples_whole_patients() -> None:
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    for idx in bootstrap_group_indices(groups, 50, seed=0):
        drawn = groups[idx]
        for g, size in (("a", 3), ("b", 1), ("c", 2)):
            count = int((drawn == g).sum())
            assert count % size == 0  # a patient comes with all its samples, or not at all
            members = idx[drawn == g]
            if count:
                assert set(members.tolist()) == set(np.flatnonzero(groups == g).tolist())


def test_patient_bootstrap_differs_from_slice_bootstrap() -> None:
    # Slices within a patient are strongly correlated; slice-level resampling pretends 240
    # independent samples and gives a much narrower interval than the 12 patients allow.
    y, s, g = _patients()
    by_patient = classification_metrics(y, s, g, n_boot=400, seed=0)
    by_slice = classification_metrics(y, s, None, n_boot=400, seed=0)
    assert by_slice["resample_unit"] == "sample"
    assert by_patient["auc"]["value"] == by_slice["auc"]["value"]
    width_p = by_patient["auc"]["ci_high"] - by_patient["auc"]["ci_low"]
    width_s = by_slice["auc"]["ci_high"] - by_slice["auc"]["ci_low"]
    assert width_p > 1.5 * width_s


def test_single_class_resamples_are_dropped() -> None:
    # 3 patients, only one has positives: many resamples miss it (or hold it alone).
    y = np.array([0, 0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.9])
    g = np.array(["a", "a", "b", "b", "c", "c"])
    r = classification_metrics(y, s, g, n_boot=200, seed=0)
    assert 0 < r["n_boot_valid"] < 200
    assert r["auc"]["ci_low"] == r["auc"]["ci_high"] == 1.0
    assert np.isnan(classification_metrics(y, s, g, n_boot=0)["auc"]["ci_low"])


def test_aggregate_seeds() -> None:
    y, s, g = _patients()
    single = classification_metrics(y, s, g, n_boot=200, seed=0)
    same = aggregate_seeds(y, [s, s], g, n_boot=200, seed=0)
    assert same["auc"]["std"] == 0.0 and same["n_seeds"] == 2
    # Identical seeds: the seed-mean interval equals the single-seed one.
    assert same["auc"]["ci_low"] == pytest.approx(single["auc"]["ci_low"])
    assert same["auc"]["ci_high"] == pytest.approx(single["auc"]["ci_high"])
    other = np.clip(s + np.random.default_rng(5).normal(0, 0.2, s.size), 0, 1)
    agg = aggregate_seeds(y, [s, other], g, n_boot=200, seed=0)
    aucs = [roc_auc_score(y, s), roc_auc_score(y, other)]
    assert agg["auc"]["per_seed"] == pytest.approx(aucs)
    assert agg["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert agg["auc"]["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert agg["auc"]["ci_low"] <= agg["auc"]["mean"] <= agg["auc"]["ci_high"]


def test_paired_difference_of_identical_scores_is_exactly_zero() -> None:
    y, s, g = _patients()
    other = np.clip(s + np.random.default_rng(5).normal(0, 0.2, s.size), 0, 1)
    r = paired_auc_difference(y, [s, other], [s, other], g, n_boot=200, seed=0)
    assert r["mean"] == r["ci_low"] == r["ci_high"] == 0.0 and r["per_seed"] == [0.0, 0.0]
    assert (r["n_seeds"], r["n_groups"], r["n_boot_valid"], r["resample_unit"]) == (2, 12, 200, "group")


def test_paired_difference_of_perfect_vs_random_is_above_zero_and_matches_sklearn() -> None:
    y, _, g = _patients()
    rng = np.random.default_rng(7)
    perfect = y + 0.01 * rng.random(y.size)  # ranks every positive above every negative
    noise = [rng.random(y.size), rng.random(y.size)]
    r = paired_auc_difference(y, [perfect, perfect], noise, g, n_boot=300, seed=0)
    expected = [1.0 - roc_auc_score(y, n) for n in noise]
    assert r["per_seed"] == pytest.approx(expected, abs=1e-12) and r["mean"] == pytest.approx(np.mean(expected))
    assert 0.0 < r["ci_low"] <= r["mean"] <= r["ci_high"]
    # The same resamples as aggregate_seeds (same seed): the paired difference per resample is
    # the difference of the seed-mean AUCs, so the interval of a perfect model is that of 1 - AUC(b).
    agg = aggregate_seeds(y, noise, g, n_boot=300, seed=0)
    assert r["ci_low"] == pytest.approx(1.0 - agg["auc"]["ci_high"]) and r["ci_high"] == pytest.approx(1.0 - agg["auc"]["ci_low"])


def test_paired_difference_is_narrower_than_the_two_intervals_and_checks_its_input() -> None:
    # b = a plus a little noise: the shared patient effects cancel in the paired difference.
    y, s, g = _patients()
    b = np.clip(s + np.random.default_rng(3).normal(0, 0.05, s.size), 0, 1)
    r = paired_auc_difference(y, [s], [b], g, n_boot=300, seed=0)
    ia, ib = (classification_metrics(y, x, g, n_boot=300, seed=0)["auc"] for x in (s, b))
    assert r["ci_high"] - r["ci_low"] < 0.5 * min(ia["ci_high"] - ia["ci_low"], ib["ci_high"] - ib["ci_low"])
    with pytest.raises(ValueError, match="same seeds"):
        paired_auc_difference(y, [s, s], [b], g)
    with pytest.raises(ValueError, match="only class 0"):
        paired_auc_difference(np.zeros(4, int), [np.ones(4)], [np.ones(4)])
    assert np.isnan(paired_auc_difference(y, [s], [b], g, n_boot=0)["ci_low"])


def _patient_only_interval(y, scores, g, n_boot, seed=0):
    """The seed-mean AUC interval of a bootstrap over patients alone (what the two-stage one replaces)."""
    vals = []
    for idx in bootstrap_group_indices(g, n_boot, seed):
        if y[idx].min() != y[idx].max():
            vals.append(np.mean([roc_auc_score(y[idx], s[idx]) for s in scores]))
    return np.quantile(vals, [0.025, 0.975])


def test_two_stage_interval_widens_when_seeds_disagree_and_not_otherwise() -> None:
    rng = np.random.default_rng(11)
    g = np.repeat(np.arange(40), 5).astype(str)  # 40 patients x 5 slices
    y = np.tile([0, 0, 1, 1, 0], 40)
    good = np.clip(y * 0.6 + rng.normal(0.2, 0.15, y.size), 0, 1)  # AUC ~0.99
    poor = np.clip(y * 0.1 + rng.normal(0.45, 0.15, y.size), 0, 1)  # AUC ~0.67
    width = lambda lo, hi: hi - lo  # noqa: E731
    # Seeds that disagree: the interval must cover the seeds' spread, not only the patients'.
    two = aggregate_seeds(y, [good, poor, good, poor], g, n_boot=1000, seed=0)["auc"]
    only = _patient_only_interval(y, [good, poor, good, poor], g, 1000)
    assert width(two["ci_low"], two["ci_high"]) > 2 * width(*only)
    assert two["ci_low"] < min(two["per_seed"]) + 0.05 and two["ci_high"] > max(two["per_seed"]) - 0.05
    # Seeds that agree exactly: nothing to add; the interval is the patient bootstrap's.
    same = aggregate_seeds(y, [good, good, good], g, n_boot=1000, seed=0)["auc"]
    alone = classification_metrics(y, good, g, n_boot=1000, seed=0)["auc"]
    assert (same["ci_low"], same["ci_high"]) == pytest.approx((alone["ci_low"], alone["ci_high"]))
    # The paired difference too: seed pairs that disagree widen it.
    d = paired_auc_difference(y, [good, poor], [poor, poor], g, n_boot=1000, seed=0)
    assert d["ci_low"] < 0.05 < 0.2 < d["ci_high"]  # pair 1 differs by ~0.3, pair 2 by 0


def test_fewer_than_ten_patients_are_too_few_to_conclude() -> None:
    assert MIN_PATIENTS == 10 and too_few_to_conclude(9) and not too_few_to_conclude(10)
    assert not too_few_to_conclude(None)  # unknown (older results): no claim either way
    for n_patients, expected in ((9, True), (10, False)):
        g = np.repeat(np.arange(n_patients), 4).astype(str)
        y = np.tile([0, 1, 1, 0], n_patients)
        s = np.clip(y * 0.5 + np.random.default_rng(0).random(y.size) * 0.6, 0, 1)
        assert classification_metrics(y, s, g, n_boot=50)["too_few_to_conclude"] is expected
        assert aggregate_seeds(y, [s, s], g, n_boot=50)["too_few_to_conclude"] is expected
        assert paired_auc_difference(y, [s], [1 - s], g, n_boot=50)["too_few_to_conclude"] is expected


def test_seed_weights_draw_seeds_with_replacement() -> None:
    draws = np.stack(list(bootstrap_seed_weights(3, 2000, seed=0)))
    assert draws.shape == (2000, 3) and np.allclose(draws.sum(axis=1), 1.0)
    assert np.allclose(draws.mean(axis=0), 1 / 3, atol=0.02) and (draws == 0).any()
    assert (np.stack(list(bootstrap_seed_weights(1, 5))) == 1.0).all()
    assert np.array_equal(draws, np.stack(list(bootstrap_seed_weights(3, 2000, seed=0))))


# ---------------------------------------------------------------------------- image quality


def test_ssim_identical_is_one_and_pairs_are_checked() -> None:
    x = volumes(2)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ssim(x[0], x[0]) == pytest.approx(1.0, abs=1e-5)  # a single (C, S, S, S) pair
    per = ssim_per_pair(x, np.stack([x[0], volumes(1, seed=9)[0]]))
    assert per[0] == pytest.approx(1.0, abs=1e-5) and per[1] < 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, x[:1])


@pytest.mark.parametrize("size, kernel, n_weights", [(32, 3, 3), (64, 4, 5), (112, 7, 5), (176, 11, 5)])
def test_ms_ssim_settings(size: int, kernel: int, n_weights: int) -> None:
    st = ms_ssim_settings(size)
    assert (st.kernel_size, len(st.weights)) == (kernel, n_weights)
    assert size // (len(st.weights) - 1) ** 2 > st.kernel_size - 1  # MONAI's own size rule


@pytest.mark.parametrize("size", [32, 64])
def test_ms_ssim_diversity(size: int) -> None:
    x = volumes(3, size=size, channels=1)
    same = np.repeat(x[:1], 3, axis=0)
    assert ms_ssim_diversity(same) == pytest.approx(1.0, abs=1e-4)
    assert ms_ssim_diversity(x) < 0.9  # independent noise: diverse
    assert ms_ssim_diversity(x, pair_batch=1) == pytest.approx(ms_ssim_diversity(x), abs=1e-6)
    with pytest.raises(ValueError, match=">= 2"):
        ms_ssim_diversity(x[:1])


def test_mmd_identities() -> None:
    x = volumes(3, size=16)
    n_vox = x[0].size
    const = np.full((3, 2, 16, 16, 16), 0.3, dtype=np.float32)
    assert mmd(const, const) == pytest.approx(0.0, abs=1e-3)
    # Identical sets of different volumes: the unbiased estimator is -2/(B-1) * mean ||x - mean||^2.
    flat = x.reshape(3, -1).astype(np.float64)
    spread = ((flat - flat.mean(0)) ** 2).sum(1).mean()
    assert mmd(x, x) == pytest.approx(-2 / (3 - 1) * spread, rel=1e-4)
    # A constant shift c of one set adds exactly n_voxels * c^2.
    assert mmd(x, x + 0.1) - mmd(x, x) == pytest.approx(n_vox * 0.01, rel=1e-3)
    # Volumes loaded from NIfTI are Fortran-ordered: the same numbers, no crash in MONAI's view().
    fortran = np.asfortranarray(x + 0.1)
    assert mmd(np.asfortranarray(x), fortran) == pytest.approx(mmd(x, x + 0.1), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        mmd(x[:1], x[:1])
    with pytest.raises(ValueError, match="equal-sized"):
        mmd(x, x[:2])


def test_frechet_distance_textbook() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    delta = np.array([1.0, -2.0, 0.5, 0.0])
    # Same covariance, shifted mean: FD = ||delta||^2 exactly.
    assert frechet_distance(a, a + delta) == pytest.approx(float(delta @ delta), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Scaled copy (mean 0 cov S vs cov 4S, centred): FD = tr(S) + tr(4S) - 2 tr(2S) = tr(S).
    c = a - a.mean(0)
    assert frechet_distance(c, 2 * c) == pytest.approx(np.trace(np.cov(c, rowvar=False)), rel=1e-6)
    with pytest.raises(ValueError, match=">= 2"):
        frechet_distance(a[:1], a)


def test_feature_net_is_fixed_and_leaves_global_rng_alone() -> None:
    x = volumes(2, size=32)
    spec = FeatureNetSpec(3, 2)
    state = torch.get_rng_state()
    f1 = extract_features(x, spec)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)
    assert torch.equal(f1, extract_features(x, spec))
    assert f1.shape == (2, 128)
    assert spec.name == FD_3D_NAME and "rand" in spec.name and "Not Inception" in spec.describe()
    assert not torch.equal(f1, extract_features(x, FeatureNetSpec(3, 2, seed=1)))


def test_frechet_distances_zero_for_identical_and_positive_for_shifted() -> None:
    x = volumes(4, size=32)
    shifted = np.clip(x * 0.6 + 0.3, 0, 1)
    assert frechet_distance_3d(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance_3d(x, shifted) > 1e-3
    assert frechet_distance_2d(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance_2d(x, shifted) > 1e-3


def test_axial_slices_and_quality_bundle() -> None:
    x = volumes(2, size=32)
    sl = axial_slices(x)
    assert sl.shape == (64, 2, 32, 32)
    assert torch.equal(sl[5], torch.from_numpy(x[0, :, :, :, 5]))
    # Caps are zero along axis 0 of the grid, not the axial axis: slicing along axis 0 drops them.
    assert axial_slices(x, min_brain_fraction=0.5, axis=0).shape[0] == 2 * 30
    out = image_quality_metrics(x, x)
    assert set(out) == {"ssim", "mmd", "ms_ssim_diversity", FD_2D_NAME, FD_3D_NAME}
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert "ssim" not in image_quality_metrics(x, x, paired=False)


def test_read_only_memory_mapped_inputs(tmp_path: Path) -> None:
    # Cache arrays come memory-mapped read-only; metrics must take them as they are.
    x = volumes(2, size=16)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ssim(mm, mm, win_size=7) == pytest.approx(1.0, abs=1e-5)
        assert mmd(mm, mm) == pytest.approx(mmd(x, x))
