"""`write_report` from hand-made site metrics (the flat dicts `SiteEvaluation.metrics()` returns):
tables of sites x regimes, "-" for what a site skipped, CSV rows, JSON, clear errors; a federated
run's site work (`adapt.*`, `synthesis.*`), context tables and failed sites."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from aldm_fed.config import compose
from aldm_fed.evaluation.regimes import REGIMES
from aldm_fed.evaluation.report import config_summary, write_report


def regime(prefix: str, auc: float, *, n_real: int = 4, n_syn: int = 0, ci: bool = True) -> dict[str, float]:
    out: dict[str, float] = {f"{prefix}.n_seeds": 3, f"{prefix}.n_train_cases_real": n_real,
                             f"{prefix}.n_train_cases_syn": n_syn}
    for metric, value in (("auc", auc), ("balanced_accuracy", auc - 0.1), ("f1", auc - 0.2)):
        out[f"{prefix}.{metric}_mean"] = value
        out[f"{prefix}.{metric}_std"] = 0.02
        if ci:
            out[f"{prefix}.{metric}_ci_low"] = value - 0.1
            out[f"{prefix}.{metric}_ci_high"] = value + 0.05
    return out


SITES = {
    # A: every regime but real_aug; C: no synthetic volumes, no oracle pool, one metric NaN.
    "A": {"n_test_cases": 8, "n_test_samples": 400, **regime("real_only", 0.70), **regime("real_syn", 0.78, n_syn=4),
          **regime("syn_only", 0.61, n_real=0, n_syn=12), **regime("oracle", 0.90, n_real=20)},
    "C": {"n_test_cases": 4, **regime("real_only", 0.65), "real_only.f1_mean": float("nan")},
}
CONTEXT = {"run_name": "tiny", "rounds": 3, "ci": 0.95, "seeds": [0, 1, 2]}
# What a federated site sends besides its classifier numbers (sharing.ALLOW_LIST["local"]).
WORK = {"adapt.loss": 0.9981, "adapt.grad_norm": 0.0044, "synthesis.n_volumes": 4,
        "n_source_cases": 2, "n_target_cases": 4}
# As the coordinator's `_report` builds it; site D did not finish, so it sent no metrics.
FED_CONTEXT = {
    "run": "tiny",
    "mode": "federated",
    "sites": {"A": {"source": 2, "target": 4, "test": 8, "status": "ok"},
              "C": {"source": 0, "target": 4, "test": 4, "status": "ok"},
              "D": {"source": 2, "target": 2, "test": 2, "status": "failed: CUDA out of memory"}},
    "phases": {"vae": {"rounds": 1, "local_steps": 2}, "scale": {}, "local": {"adapt": True}},
    "rounds": [{"phase": "vae", "round": 1, "time": "2026-01-01T00:00:00+00:00", "sites": ["A", "C"],
                "metrics": {"loss": 0.33742867, "kl": 0.15346881}},
               {"phase": "backbone", "round": 1, "time": "2026-01-01T00:01:00+00:00", "sites": ["A"],
                "metrics": {"loss": 1.0278966, "grad_norm": 0.6765452}}],
    "seconds": 25.7,
    "global_models": {"vae": "/runs/x|y/vae/final", "backbone": "/runs/x|y/backbone/final"},
}


@pytest.fixture
def report(tmp_path: Path) -> dict[str, Path]:
    return write_report(tmp_path / "out", SITES, title="Federated run tiny", context=CONTEXT)


@pytest.fixture
def federated(tmp_path: Path) -> dict[str, Path]:
    sites = {name: {**metrics, **WORK} for name, metrics in SITES.items()}
    return write_report(tmp_path / "fed", sites, title="aldm-fed federated run tiny", context=FED_CONTEXT)


def table(md: str, heading: str) -> list[list[str]]:
    """The rows of the Markdown table under `## heading` (or `### heading`), cells stripped."""
    block = md.split(f"## {heading}\n", 1)[1].split("\n#", 1)[0]
    cells = [line.replace("\\|", "\0").strip("|").split("|") for line in block.splitlines() if line.startswith("|")]
    return [[c.replace("\0", "|").strip() for c in row] for row in cells]


def test_markdown_has_a_table_per_metric_with_sites_and_regimes(report):
    md = report["md"].read_text()
    assert md.startswith("# Federated run tiny\n")
    assert "- **rounds**: 3" in md and "- **seeds**: 0, 1, 2" in md
    assert "held-out REAL cases" in md and "95% two-stage bootstrap" in md and "Small n" in md
    auc = table(md, "AUC")
    assert auc[0] == ["site", "n test", "real_only", "real_only CI", "real_syn", "real_syn CI",
                      "syn_only", "syn_only CI", "oracle", "oracle CI"]  # no column for real_aug: never ran
    assert auc[2] == ["A", "8", "0.700 ± 0.020", "[0.600, 0.750]", "0.780 ± 0.020", "[0.680, 0.830]",
                      "0.610 ± 0.020", "[0.510, 0.660]", "0.900 ± 0.020", "[0.800, 0.950]"]
    assert auc[3][:4] == ["C", "4", "0.650 ± 0.020", "[0.550, 0.700]"] and set(auc[3][4:]) == {"-"}
    assert table(md, "Balanced accuracy")[2][2] == "0.600 ± 0.020"
    assert table(md, "F1")[3][2] == "-"  # NaN at C: missing, not "nan"
    diff = table(md, "Synthetic data effect: real_syn - real_only (AUC)")
    # no paired difference sent: the difference of seed means, said to be without a paired interval
    assert diff[2] == ["A", "0.700", "0.780", "+0.080 (no paired CI)"] and diff[3] == ["C", "0.650", "-", "-"]
    assert table(md, "Training data")[2] == ["A", "4 / 0", "4 / 4", "0 / 12", "20 / 0"]


def test_csv_has_one_row_per_site_and_regime_that_ran(report):
    with open(report["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["site"], r["regime"]) for r in rows] == [
        ("A", "real_only"), ("A", "real_syn"), ("A", "syn_only"), ("A", "oracle"), ("C", "real_only")]
    assert float(rows[1]["auc_mean"]) == 0.78 and rows[1]["n_train_cases_syn"] == "4"
    assert rows[4]["n_test_cases"] == "4" and rows[4]["f1_mean"] == "" and rows[4]["n_test_samples"] == ""


def test_json_keeps_everything(report):
    doc = json.loads(report["json"].read_text())
    assert doc["title"] == "Federated run tiny" and doc["context"] == CONTEXT
    assert doc["regimes"] == ["real_only", "real_syn", "syn_only", "oracle"]
    assert doc["sites"]["A"]["regimes"]["oracle"]["auc_mean"] == 0.90
    assert doc["sites"]["A"]["auc_diff_real_syn_minus_real_only"] == pytest.approx(0.08)
    assert doc["sites"]["C"]["auc_diff_real_syn_minus_real_only"] is None
    assert "f1_mean" not in doc["sites"]["C"]["regimes"]["real_only"]
    assert doc["sites"]["C"]["site"] == {"n_test_cases": 4}


def test_no_interval_means_no_ci_column_and_nothing_left_behind(tmp_path):
    paths = write_report(tmp_path, {"B": regime("real_only", 0.5, ci=False)}, title="t", context={})
    auc = table(paths["md"].read_text(), "AUC")
    assert auc[0] == ["site", "n test", "real_only"] and auc[2] == ["B", "-", "0.500 ± 0.020"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv", "report.html", "report.json", "report.md"]
    assert "## Site work" not in paths["md"].read_text()  # a single site's evaluation: no site work


def test_site_work_keys_never_become_regime_columns(federated):
    md = federated["md"].read_text()
    for heading in ("AUC", "Balanced accuracy", "F1", "Training data"):
        header = table(md, heading)[0]
        assert not any(c.startswith(("adapt", "synthesis")) for c in header), (heading, header)
    assert table(md, "AUC")[0][2::2] == ["real_only", "real_syn", "syn_only", "oracle"]
    work = table(md, "Site work")
    assert work[0] == ["site", "status", "ControlNet adaptation loss", "synthetic volumes", "adapt.grad_norm",
                       "source cases", "target cases", "test cases"]
    assert work[2] == ["A", "ok", "0.998", "4", "0.004", "2", "4", "8"]
    doc = json.loads(federated["json"].read_text())
    assert doc["regimes"] == ["real_only", "real_syn", "syn_only", "oracle"] and set(doc["regimes"]) <= set(REGIMES)
    assert set(doc["sites"]["A"]["regimes"]) <= set(REGIMES)
    assert doc["sites"]["A"]["work"] == {"adapt.loss": 0.9981, "adapt.grad_norm": 0.0044, "synthesis.n_volumes": 4}
    with open(federated["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["regime"] for r in rows} <= set(REGIMES) and len(rows) == 5
    assert rows[0]["adapt.loss"] == "0.9981" and rows[0]["synthesis.n_volumes"] == "4"


def test_federated_context_is_tables_not_json(federated):
    md = federated["md"].read_text()
    context = md.split("## Context\n", 1)[1].split("\n## ", 1)[0]
    assert "{" not in context and "[" not in context  # no inline JSON
    assert "- **run**: tiny" in context and "- **seconds**: 25.7" in context
    assert "- **global_models**:\n  - vae: /runs/x|y/vae/final\n  - backbone: /runs/x|y/backbone/final" in context
    assert table(md, "Sites") == [["sites", "source", "target", "test", "status"], ["---"] * 5,
                                  ["A", "2", "4", "8", "ok"], ["C", "0", "4", "4", "ok"],
                                  ["D", "2", "2", "2", "failed: CUDA out of memory"]]
    phases = table(md, "Phases")
    assert phases[0] == ["phases", "rounds", "local_steps", "adapt"]
    assert phases[2:] == [["vae", "1", "2", "-"], ["scale", "-", "-", "-"], ["local", "-", "-", "True"]]
    rounds = table(md, "Rounds")
    assert rounds[0] == ["phase", "round", "time", "sites", "metrics.loss", "metrics.kl", "metrics.grad_norm"]
    assert rounds[2] == ["vae", "1", "2026-01-01T00:00:00+00:00", "A, C", "0.3374", "0.1535", "-"]
    assert rounds[3] == ["backbone", "1", "2026-01-01T00:01:00+00:00", "A", "1.028", "-", "0.6765"]
    assert json.loads(federated["json"].read_text())["context"] == FED_CONTEXT


def test_failed_site_is_listed_with_its_status(federated):
    md = federated["md"].read_text()
    work = table(md, "Site work")
    assert [row[0] for row in work[2:]] == ["A", "C", "D"]
    assert work[4] == ["D", "failed: CUDA out of memory", "-", "-", "-", "-", "-", "-"]
    assert "D" not in [row[0] for row in table(md, "AUC")]  # no metrics, no made-up numbers


# What a site's evaluation adds: the segmenter's Dice per set and the paired AUC differences.
FAITH = {"faithfulness.n_train": 4, "faithfulness.real.dice_mean": 0.80, "faithfulness.real.n": 8,
         "faithfulness.aldm.dice_mean": 0.71, "faithfulness.aldm.dice_gap": 0.09, "faithfulness.aldm.n": 16,
         "faithfulness.gan.dice_mean": 0.55, "faithfulness.gan.dice_gap": 0.25, "faithfulness.gan.n": 16}


def paired(a: str, b: str, mean: float, lo: float, hi: float, n_patients: int = 16) -> dict[str, float]:
    return {f"diff.{a}__{b}.auc_mean": mean, f"diff.{a}__{b}.auc_ci_low": lo, f"diff.{a}__{b}.auc_ci_high": hi,
            f"diff.{a}__{b}.n_boot_valid": 2000, f"diff.{a}__{b}.n_patients": n_patients}


QUALITY = {"quality.real.ms_ssim_diversity": 0.40, "quality.real.n": 4, "quality.aldm.ssim": 0.62,
           "quality.aldm.mmd": 1.5, "quality.aldm.ms_ssim_diversity": 0.45, "quality.aldm.fd_rand_resnet10_2d": 0.12,
           "quality.aldm.fd_rand_resnet10_3d": 0.3, "quality.aldm.plausible": 0.875, "quality.aldm.n": 8,
           "quality.gan.ms_ssim_diversity": 0.7,
           "quality.gan.fd_rand_resnet10_2d": 0.5, "quality.gan.fd_rand_resnet10_3d": 0.9, "quality.gan.n": 8}


def test_image_quality_gets_its_own_section_and_json_group(tmp_path):
    paths = write_report(tmp_path, {"A": {**SITES["A"], **QUALITY}, "C": SITES["C"]}, title="t", context={})
    md = paths["md"].read_text()
    quality = table(md, "Image quality")
    assert quality[0] == ["site", "set", "SSIM to host", "MMD", "MS-SSIM diversity", "FD 2D", "FD 3D",
                          "brain plausible", "n"]
    assert quality[2:] == [["A", "real cases (reference)", "-", "-", "0.400", "-", "-", "-", "4"],
                           ["A", "ALDM synthetic", "0.620", "1.500", "0.450", "0.120", "0.300", "0.875", "8"],
                           ["A", "gan baseline synthetic", "-", "-", "0.700", "0.500", "0.900", "-", "8"]]
    assert "higher = closer to the host's anatomy" in md and "lower = more diverse" in md
    assert "blotchy or uniformly grey brain fails" in md
    assert "equal n at the same site" in md
    assert "quality." not in md.split("## Image quality")[0]  # not Site work columns
    data = json.loads(paths["json"].read_text())
    assert data["sites"]["A"]["quality"]["aldm.ssim"] == 0.62 and not data["sites"]["C"].get("quality")


def test_faithfulness_and_paired_differences_get_their_own_sections(tmp_path):
    sites = {
        "A": {**SITES["A"], **regime("real_syn_gan", 0.60, n_syn=4), **FAITH, **WORK,
              **paired("real_syn", "real_only", 0.08, 0.02, 0.15), **paired("real_syn", "real_syn_gan", 0.18, 0.05, 0.30)},
        "C": {**SITES["C"], **regime("real_syn", 0.66, n_syn=4), **paired("real_syn", "real_only", 0.01, -0.08, 0.1),
              "faithfulness.n_train": 4, "faithfulness.real.dice_mean": 0.7, "faithfulness.real.n": 4},
    }
    paths = write_report(tmp_path, sites, title="t", context={"ci": 0.95})
    md = paths["md"].read_text()
    faith = table(md, "Anatomical faithfulness")
    assert faith[0] == ["site", "set", "Dice mean", "n", "gap (real - set)"]
    assert faith[2:] == [["A", "real test cases (segmenter trained on K = 4)", "0.800", "8", "-"],
                         ["A", "ALDM synthetic", "0.710", "16", "+0.090"],
                         ["A", "gan baseline synthetic", "0.550", "16", "+0.250"],
                         ["C", "real test cases (segmenter trained on K = 4)", "0.700", "4", "-"]]
    assert "tumour appears where the mask says" in md and "only K cases" in md
    effect = table(md, "Synthetic data effect: real_syn - real_only (AUC)")
    assert effect[2] == ["A", "0.700", "0.780", "+0.080 [+0.020, +0.150] evidence"]
    assert effect[3] == ["C", "0.650", "0.660", "+0.010 [-0.080, +0.100]"]  # the interval holds 0: no "evidence"
    assert "- Site A: real_syn beats real_only by 0.080 AUC (95% CI of real_syn - real_only: [+0.020, +0.150])." in md
    comparison = table(md, "ALDM against the baselines, and the domain-shift gap (AUC)")
    assert comparison[2] == ["real_syn - real_syn_gan", "+0.180 [+0.050, +0.300] evidence", "-"]
    assert "- Site A: real_syn beats real_syn_gan by 0.180 AUC" in md
    # Neither group becomes a Site work column; the JSON keeps each, prefix removed.
    work = table(md, "Site work")[0]
    assert not any(c.startswith(("faithfulness", "diff", "audit")) for c in work), work
    doc = json.loads(paths["json"].read_text())
    assert doc["sites"]["A"]["faithfulness"]["gan.dice_mean"] == 0.55
    assert doc["sites"]["A"]["differences"]["real_syn__real_only.auc_ci_low"] == 0.02
    assert doc["sites"]["C"]["differences"] == {f"real_syn__real_only.{k}": v for k, v in
                                                (("auc_mean", 0.01), ("auc_ci_low", -0.08), ("auc_ci_high", 0.1),
                                                 ("n_boot_valid", 2000), ("n_patients", 16))}


def test_no_interval_excluding_zero_is_said_plainly(tmp_path):
    sites = {"A": {**SITES["A"], **paired("real_syn", "real_only", 0.08, -0.02, 0.15)}}
    md = write_report(tmp_path, sites, title="t", context={"ci": 0.95})["md"].read_text()
    assert "No paired 95% interval excludes 0" in md
    assert table(md, "Synthetic data effect: real_syn - real_only (AUC)")[2][3] == "+0.080 [-0.020, +0.150]"
    assert "## Anatomical faithfulness" not in md  # nobody measured it


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no site metrics"):
        write_report(tmp_path, {}, title="t", context={})
    with pytest.raises(ValueError, match=r"site 'A': metric 'real_only.auc_mean' must be a number"):
        write_report(tmp_path, {"A": {"real_only.auc_mean": "0.7"}}, title="t", context={})


def test_config_summary_is_plain():
    summary = config_summary(compose(["experiment=tiny", "classifier.seeds=[0]"]))
    assert summary["run_name"] == "tiny" and summary["task"] == "slice" and summary["seeds"] == [0]
    assert json.loads(json.dumps(summary)) == summary


def test_fewer_than_ten_test_patients_claim_no_evidence(tmp_path):
    """An interval over 9 test patients that excludes 0 is marked, not called evidence; 10 are enough."""
    sites = {
        "A": {**SITES["A"], **paired("real_syn", "real_only", 0.08, 0.02, 0.15, n_patients=9)},
        "C": {**SITES["C"], **regime("real_syn", 0.66, n_syn=4), **paired("real_syn", "real_only", 0.08, 0.02, 0.15,
                                                                         n_patients=10)},
    }
    md = write_report(tmp_path, sites, title="t", context={"ci": 0.95})["md"].read_text()
    effect = table(md, "Synthetic data effect: real_syn - real_only (AUC)")
    assert effect[2][-1] == "+0.080 [+0.020, +0.150] too few to conclude (9 test patients)"
    assert effect[3][-1] == "+0.080 [+0.020, +0.150] evidence"
    assert "- Site A: 9 test patients, too few to conclude (fewer than 10)." in md
    assert "Site A: real_syn beats" not in md and "- Site C: real_syn beats real_only by 0.080 AUC" in md
