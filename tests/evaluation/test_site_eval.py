"""`evaluate_site` and `aldm-fed evaluate` on the tiny phantom: every regime on a site's own cases,
tested on its held-out real ones; the shareable metrics are plain numbers under fixed names.

A hand-made synthesis folder (flipped copies of site A's few-shot cases, written with the synthesis
writer) stands in for the generative chain, which tests/test_cli.py covers; a tiny CNN trains for a
few steps (plumbing, not quality).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aldm_fed.cli import main
from aldm_fed.config import compose
from aldm_fed.data.manifest import read_manifest, write_manifest
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.data.volumes import load_split
from aldm_fed.evaluation.site import METRIC_KEY_PATTERN, SiteEvaluation, evaluate_site
from aldm_fed.synthesis import case_files, synthesize_site, write_labels_csv, write_synthetic_case
from aldm_fed.synthesis import write_manifest as write_syn_manifest

TINY_CLASSIFIER = [
    "classifier.train.steps=3", "classifier.train.batch_size=8", "classifier.train.progress=false",
    "classifier.seeds=[0]", "classifier.eval.n_boot=20",
    "classifier.network.alexlite.channels=[4,8,8,8]", "classifier.network.alexlite.hidden=8",
    "classifier.network.alexlite.dropout=0.0", "classifier.network.alexlite.stem_kernel=3",
    "classifier.regimes=[real_only,real_syn,syn_only,oracle]",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny phantom sites A (2 source, 2 target, 2 test cases) and C (no source cases)."""
    root = tmp_path_factory.mktemp("site_eval")
    cfg = compose(["experiment=tiny", "~phantom.sites.B"])
    make_cohort(root / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    return root


def overrides(root: Path, *extra: str) -> list[str]:
    # The stand-in synthetic volumes (`fake_synthesis`) ARE mirrored real cases, which the audit rightly
    # flags (`audit.mirror`); these tests are about the regimes, so flagged volumes stay in training.
    return ["experiment=tiny", "device=cpu", f"paths.cohort={root / 'cohort'}", f"paths.cache={root / 'cache'}",
            f"paths.runs={root / 'runs'}", "audit.exclude_flagged=false", *TINY_CLASSIFIER, *extra]


def site_cfg(root: Path, *extra: str) -> Any:
    return compose(overrides(root, *extra))


def fake_synthesis(cfg: Any, site: str, n: int) -> Path:
    """`n` synthetic cases in the site's synthesis folder: left-right flipped copies of its target
    cases (mask and host = that case), in the layout `aldm-fed synthesize` writes."""
    target = load_split(cfg, "target", sites=[site], progress=False)
    out = Path(str(cfg.paths.runs)) / "sites" / site / "synthesis"
    modalities = list(target.modalities)
    records = []
    for i in range(n):
        j = i % len(target)
        sid, case = f"SYN-{site}-{i:05d}", target.case_ids[j]
        record = {"synth_id": sid, "index": i, "site": site, "source_case": case, "host_case": case,
                  "label": None, "files": case_files(sid, modalities)}
        write_synthetic_case(out, sid, np.flip(target.images[j], 1), np.flip(target.segs[j], 0),
                             np.eye(4), modalities, record)
        records.append(record)
    write_syn_manifest(out, {"complete": True, "site": site, "model": {"modalities": modalities},
                             "settings": {"label_column": "grade"}}, records)
    write_labels_csv(out, records)
    return out


@pytest.fixture(scope="module")
def site_a(root: Path) -> tuple[SiteEvaluation, float]:
    cfg = site_cfg(root, "site=A")
    fake_synthesis(cfg, "A", 3)
    t0 = time.perf_counter()
    result = evaluate_site(cfg, progress=False)
    return result, time.perf_counter() - t0


def test_evaluate_site_runs_every_regime_on_the_sites_cases(site_a, root):
    result, _ = site_a
    rows = {r["regime"]: r for r in result.rows}
    assert [r["regime"] for r in result.rows] == ["real_only", "real_syn", "syn_only", "oracle"]
    assert all(r["status"] == "ok" for r in result.rows), result.rows
    assert (rows["real_only"]["n_train_cases_real"], rows["real_only"]["n_train_cases_syn"]) == (2, 0)
    assert (rows["real_syn"]["n_train_cases_real"], rows["real_syn"]["n_train_cases_syn"]) == (2, 2)  # syn_ratio 1
    assert (rows["syn_only"]["n_train_cases_real"], rows["syn_only"]["n_train_cases_syn"]) == (0, 3)
    assert rows["oracle"]["n_train_cases_real"] == 4  # target + source cases of site A
    assert all(r["n_test_cases"] == 2 for r in result.rows)
    assert result.run_dir == root / "runs" / "sites" / "A" / "classifier"
    assert (result.run_dir / "results.json").is_file() and (result.run_dir / "oracle" / "seed_0").is_dir()
    assert (result.n_target_cases, result.n_synthetic_cases, result.n_test_cases) == (2, 3, 2)
    assert result.notes == []


def saved_auc(classifier_dir: Path, regime: str) -> float:
    """Mean over seeds of sklearn's AUC of each seed's saved predictions."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for path in sorted((classifier_dir / regime).glob("seed_*/predictions.json")):
        preds = json.loads(path.read_text())
        aucs.append(roc_auc_score(preds["y_true"], preds["y_score"]))
    assert aucs, f"no predictions of {regime} in {classifier_dir}"
    return float(np.mean(aucs))


def test_metrics_are_finite_numbers_under_fixed_names(site_a):
    result, _ = site_a
    metrics = result.metrics()
    for key, value in metrics.items():
        assert METRIC_KEY_PATTERN.fullmatch(key), key
        assert type(value) in (int, float) and math.isfinite(value), (key, value)
    assert metrics["n_test_cases"] == 2 and metrics["n_target_cases"] == 2 and metrics["n_synthetic_cases"] == 3
    assert metrics["real_syn.n_train_cases_syn"] == 2 and metrics["oracle.n_train_cases_real"] == 4
    for regime in ("real_only", "real_syn", "syn_only", "oracle"):
        # The number sent is the seed mean of the AUCs of the predictions each seed saved.
        assert metrics[f"{regime}.auc_mean"] == pytest.approx(saved_auc(Path(result.run_dir), regime))
        assert isinstance(metrics[f"{regime}.n_seeds"], int)
    # A NaN (an interval without valid resamples) is left out, never sent.
    row = {**result.rows[0], "auc_ci_low": float("nan")}
    nan_result = SiteEvaluation(result.site, [row], result.run_dir, 2, 0, 2)
    assert "real_only.auc_ci_low" not in nan_result.metrics() and "real_only.auc_mean" in nan_result.metrics()


def test_faithfulness_and_paired_differences_are_measured_and_shareable(site_a, root):
    result, _ = site_a
    metrics = result.metrics()
    faith = {k: v for k, v in metrics.items() if k.startswith("faithfulness.")}
    assert set(faith) == {"faithfulness.n_train", "faithfulness.real.dice_mean", "faithfulness.real.n",
                          "faithfulness.aldm.dice_mean", "faithfulness.aldm.dice_gap", "faithfulness.aldm.n"}
    assert (faith["faithfulness.n_train"], faith["faithfulness.real.n"], faith["faithfulness.aldm.n"]) == (2, 2, 3)
    for key in ("faithfulness.real.dice_mean", "faithfulness.aldm.dice_mean"):
        assert 0.0 <= faith[key] <= 1.0, (key, faith[key])
    assert faith["faithfulness.aldm.dice_gap"] == pytest.approx(
        faith["faithfulness.real.dice_mean"] - faith["faithfulness.aldm.dice_mean"])
    folder = root / "runs" / "sites" / "A" / "faithfulness"
    written = json.loads((folder / "faithfulness.json").read_text())
    assert written["synthetic"]["aldm"]["case_ids"] == [f"SYN-A-{i:05d}" for i in range(3)]
    assert (folder / "segmenter" / "run.json").is_file()
    # real_syn - real_only, paired over the same test patients; its file beside the runs.
    diff = {k: v for k, v in metrics.items() if k.startswith("diff.")}
    assert set(diff) <= {f"diff.real_syn__real_only.{n}" for n in ("auc_mean", "auc_ci_low", "auc_ci_high", "n_boot_valid", "n_patients")}
    assert diff["diff.real_syn__real_only.auc_mean"] == pytest.approx(
        metrics["real_syn.auc_mean"] - metrics["real_only.auc_mean"])
    if "diff.real_syn__real_only.auc_ci_low" in diff:  # 2 test patients: resamples may all hold one class
        assert diff["diff.real_syn__real_only.auc_ci_low"] <= diff["diff.real_syn__real_only.auc_ci_high"]
    pairs = json.loads((result.run_dir / "differences.json").read_text())["pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [("real_syn", "real_only")]
    # The allow-list takes these names, and no name that carries a case id or another set.
    for key in [*faith, *diff]:
        assert METRIC_KEY_PATTERN.fullmatch(key), key
    for key in ("faithfulness.PH-A-0001.dice_mean", "faithfulness.aldm.dice_per_case", "faithfulness.other.n",
                "diff.real_syn__PH-A-0001.auc_mean", "diff.real_only__shift_from_A.auc_mean"):
        assert not METRIC_KEY_PATTERN.fullmatch(key), key


def test_image_quality_of_the_synthetic_set_against_its_hosts_is_shareable(site_a):
    result, _ = site_a
    metrics = result.metrics()
    quality = {k: v for k, v in metrics.items() if k.startswith("quality.")}
    assert set(quality) == {"quality.real.ms_ssim_diversity", "quality.real.n", "quality.aldm.ssim",
                            "quality.aldm.mmd", "quality.aldm.ms_ssim_diversity", "quality.aldm.fd_rand_resnet10_2d",
                            "quality.aldm.fd_rand_resnet10_3d", "quality.aldm.plausible", "quality.aldm.n"}
    assert (quality["quality.real.n"], quality["quality.aldm.n"]) == (2, 3)
    assert quality["quality.aldm.plausible"] in (0.0, 1 / 3, 2 / 3, 1.0)  # a fraction of the 3 volumes
    # The fake set is its hosts flipped left-right: similar, but not a copy.
    assert 0.0 < quality["quality.aldm.ssim"] < 1.0
    assert quality["quality.aldm.fd_rand_resnet10_3d"] > 0.0
    for key in quality:
        assert METRIC_KEY_PATTERN.fullmatch(key), key
    for key in ("quality.PH-A-0001.ssim", "quality.aldm.ssim_per_case", "quality.other.n", "quality.real.ssim"):
        assert not METRIC_KEY_PATTERN.fullmatch(key), key


def test_a_finished_evaluation_is_read_back_not_retrained(site_a, root, monkeypatch):
    # Equal metrics alone would not show it (a deterministic retrain reproduces them): no training
    # function may be called, and no file of the site's runs may be rewritten.
    from aldm_fed.evaluation import faithfulness, regimes

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished evaluation trained again")

    monkeypatch.setattr(regimes, "train_classifier", refuse)
    monkeypatch.setattr(faithfulness, "train_segmenter", refuse)
    site_dir = root / "runs" / "sites" / "A"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in site_dir.rglob("*") if p.is_file()}
    first, _ = site_a
    again = evaluate_site(site_cfg(root), "A", progress=False)  # site as an argument this time
    assert again.metrics() == first.metrics()
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in site_dir.rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(site_dir)) for p in before if after.get(p) != before[p])
    assert not changed, changed


def test_site_without_synthesis_or_source_cases_skips_those_regimes(root):
    result = evaluate_site(site_cfg(root, "site=C"), progress=False)
    status = {r["regime"]: r["status"] for r in result.rows}
    assert status == {"real_only": "ok", "real_syn": "skipped", "syn_only": "skipped", "oracle": "skipped"}
    assert any("no synthetic volumes" in n and "aldm-fed synthesize --site C" in n for n in result.notes)
    assert any("oracle skipped" in n for n in result.notes)
    assert any("no synthetic set to measure" in n for n in result.notes)
    metrics = result.metrics()
    assert metrics["n_synthetic_cases"] == 0 and "real_only.auc_mean" in metrics
    assert not any(k.startswith(("real_syn.", "syn_only.", "oracle.", "diff.")) for k in metrics)
    # Faithfulness without a synthetic set: the real Dice only.
    assert {k for k in metrics if k.startswith("faithfulness.")} == {
        "faithfulness.n_train", "faithfulness.real.dice_mean", "faithfulness.real.n"}
    assert not any(k.startswith("quality.") for k in metrics)  # no synthetic set: no image quality


def test_no_site_is_a_clear_error(root):
    for run in (evaluate_site, synthesize_site):
        with pytest.raises(ValueError, match="--site"):
            run(site_cfg(root))


def test_cli_evaluate_writes_the_report(root, capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--site", "C", "--no-progress", *overrides(root)])
    out = capsys.readouterr().out
    assert info.value.code == 0, out
    folder = root / "runs" / "sites" / "C" / "classifier"
    assert f"report: {folder / 'report.html'}" in out and (folder / "report.md").is_file() and "real_syn: skipped" in out
    md = (folder / "report.md").read_text()
    assert "Downstream classification, site C" in md and "| C |" in md
    assert (folder / "report.csv").read_text().splitlines()[1].startswith("C,real_only,")


def test_cli_evaluate_without_test_cases_names_the_manifest(root, tmp_path, capsys):
    # Site A's manifest with an empty test split, in a cohort of its own.
    manifest = read_manifest(root / "cohort" / "manifests" / "A.json")
    manifest.data_root = str(root / "cohort" / "A")
    manifest.splits["test"] = []
    path = write_manifest(manifest, tmp_path / "cohort" / "manifests" / "A.json")
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--site", "A", "--no-progress", *overrides(root, f"paths.cohort={tmp_path / 'cohort'}")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert str(path) in err and "no 'test' cases" in err and "Traceback" not in err


def test_val_split_and_oracle_pool(tmp_path):
    """`split="val"` tests every regime on the validation cases, in folders of its own; at a site with
    no source cases the `oracle` split is the oracle's larger real pool."""
    cfg = compose(["experiment=tiny", "~phantom.sites.A", "~phantom.sites.B", "phantom.sites.C.n_val=2",
                   "phantom.sites.C.n_oracle=2"])
    make_cohort(tmp_path / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    manifest = read_manifest(tmp_path / "cohort" / "manifests" / "C.json")
    assert [len(manifest.cases(s)) for s in ("target", "val", "test", "oracle")] == [2, 2, 2, 2]
    cfg = site_cfg(tmp_path, "site=C", "classifier.regimes=[real_only,oracle]")
    val = evaluate_site(cfg, progress=False, split="val")
    rows = {r["regime"]: r for r in val.rows}
    assert rows["oracle"]["status"] == "ok" and rows["oracle"]["n_train_cases_real"] == 4  # target + oracle
    assert val.split == "val" and val.run_dir == tmp_path / "runs" / "sites" / "C" / "classifier-val"
    tested = set(json.loads((val.run_dir / "real_only" / "seed_0" / "predictions.json").read_text())["groups"])
    assert tested == set(manifest.cases("val"))
    assert any("val cases, for choosing settings" in n for n in val.notes)
    assert not (tmp_path / "runs" / "sites" / "C" / "classifier").exists()  # no test result was written
    test = evaluate_site(cfg, progress=False)
    tested = set(json.loads((test.run_dir / "real_only" / "seed_0" / "predictions.json").read_text())["groups"])
    assert test.split == "test" and tested == set(manifest.cases("test"))
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate_site(cfg, progress=False, split="oracle")


def test_cli_evaluate_on_the_val_split_with_the_domain_gap(root, capsys):
    with pytest.raises(SystemExit) as info:  # refused before any config or data is read
        main(["evaluate", "--site", "C", "--split", "oracle", "--no-progress", *overrides(root)])
    assert info.value.code == 2 and "--split: expected one of test, val, got 'oracle'" in capsys.readouterr().err
    # The tiny cohort has no val cases: a clear error naming the manifest and the flag.
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--site", "C", "--split", "val", "--no-progress", *overrides(root)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no 'val' cases" in err and "--n-val N" in err and "C.json" in err
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--site", "C", "--shift-from", "A", "--no-progress",
              *overrides(root, "classifier.regimes=[real_only]", "faithfulness.enabled=false")])
    out = capsys.readouterr().out
    assert info.value.code == 0, out
    assert "real_only: AUC" in out and "shift_from_A: AUC" in out
    md = (root / "runs" / "sites" / "C" / "classifier" / "report.md").read_text()
    assert "tested_on" in md and "test split" in md and "real_only - shift_from_A" in md
