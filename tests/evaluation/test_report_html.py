"""`report.html`: the renderer on a small but structurally real run folder (predictions, training
logs, a montage PNG), through the real `write_report`, and opened in headless Chromium: every
image must decode and the tables must be in the DOM. The browser tests are skipped, with the
reason, where no Chromium is installed (`apt-get install chromium`; `.ci/run` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from aldm_fed.evaluation.metrics import aggregate_seeds, paired_auc_difference
from aldm_fed.evaluation.report import write_report
from aldm_fed.evaluation.report_html import ReportSources, discover_sources, render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium, chromium-browser or google-chrome on PATH: the headless-browser check of "
           "report.html is skipped (install it with `apt-get install chromium`)",
)
REGIMES_RUN = ("real_only", "real_syn")
SEEDS = (0, 1)


class _Dom(HTMLParser):
    """Tags and attributes of a page, in document order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "lo', encoding="utf-8")  # + a cut line


def _loss_log(path: Path, n: int, start: float) -> None:
    _jsonl(path, [{"step": i, "loss": start * 0.97**i, "grad_norm": 0.1} for i in range(n)])


@pytest.fixture
def run(tmp_path: Path) -> dict:
    """runs/tiny laid out as `aldm-fed evaluate` leaves it for site A: classifier runs of two
    regimes x two seeds (predictions of 6 patients x 5 slices), stage logs, a montage PNG; and the
    flat metrics `SiteEvaluation.metrics()` would return, computed from those predictions."""
    root = tmp_path / "runs" / "tiny"
    site = root / "sites" / "A"
    clf = site / "classifier"
    rng = np.random.default_rng(0)
    groups = [f"PH-A-{i:04d}" for i in range(6) for _ in range(5)]
    y = np.array([i % 2 for i in range(6) for _ in range(5)])
    metrics: dict[str, float | int] = {"n_target_cases": 4, "n_synthetic_cases": 4, "n_test_cases": 6,
                                       "n_test_samples": len(y)}
    for regime in REGIMES_RUN:
        scores = []
        for seed in SEEDS:
            s = np.clip(0.5 * y + rng.normal(0.25, 0.25, y.size), 0, 1)
            scores.append(s)
            run_dir = clf / regime / f"seed_{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "predictions.json").write_text(json.dumps(
                {"y_true": y.tolist(), "y_score": s.tolist(), "groups": groups}))
            _loss_log(run_dir / "train" / "metrics.jsonl", 12, 0.7)
        agg = aggregate_seeds(y, scores, groups, n_boot=50, seed=0)
        metrics |= {f"{regime}.n_seeds": len(SEEDS), f"{regime}.n_train_cases_real": 4,
                    f"{regime}.n_train_cases_syn": 4 if regime == "real_syn" else 0}
        for m in ("auc", "balanced_accuracy", "f1"):
            metrics |= {f"{regime}.{m}_{k}": agg[m][k] for k in ("mean", "std", "ci_low", "ci_high")}
    (clf / "results.json").write_text("{}")
    _loss_log(root / "vae" / "metrics.jsonl", 30, 0.5)
    _loss_log(root / "backbone" / "metrics.jsonl", 30, 1.0)
    _loss_log(site / "controlnet" / "metrics.jsonl", 20, 0.2)
    fig = Figure(figsize=(3, 1.5))
    for i, ax in enumerate(fig.subplots(1, 2)):
        ax.imshow(rng.random((16, 16)), cmap="gray")
        ax.set_title(["synthetic", "real host"][i])
    (site / "synthesis").mkdir(parents=True)
    fig.savefig(site / "synthesis" / "montage.png")
    return {"root": root, "clf": clf, "metrics": metrics}


@pytest.fixture
def site_report(run: dict) -> dict[str, Path]:
    """What `aldm-fed evaluate` writes (its context names the classifier folder as `runs`)."""
    return write_report(run["clf"], {"A": run["metrics"]}, title="Downstream classification, site A",
                        context={"run_name": "tiny", "site": "A", "runs": str(run["clf"]), "ci": 0.95})


FED_DATA = {
    "title": "aldm-fed federated run tiny", "created": "2026-01-01T00:00:00+00:00", "regimes": ["real_only"],
    "context": {"mode": "federated", "sites": {"A": {"test": 6, "status": "ok"}, "B": {"test": 4, "status": "failed"}}},
    "sites": {"A": {"site": {"n_test_cases": 6}, "regimes": {"real_only": {"n_seeds": 2, "auc_mean": 0.75,
                                                                         "auc_std": 0.01}},
                    "work": {"adapt.loss": 0.5}, "auc_diff_real_syn_minus_real_only": None}},
}
ROUNDS = [{"phase": "vae", "round": r, "metrics": {"loss": 1.0 / r}} for r in (1, 2, 3)]


def _sections(text: str) -> dict[str, str]:
    """section id -> its HTML."""
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', text, flags=re.DOTALL))


# ---------------------------------------------------------------------------------------------
# The renderer
# ---------------------------------------------------------------------------------------------

def test_site_report_has_tables_roc_montage_and_training_curves(site_report, run):
    text = site_report["html"].read_text()
    assert site_report["html"].name == "report.html" and site_report["html"].parent == run["clf"]
    sec = _sections(text)
    assert list(sec) == ["results", "roc", "montages", "training", "context"]
    dom = _Dom(text)
    assert len(dom.find("table", "metric")) == 3  # AUC, balanced accuracy, F1
    auc_table = sec["results"].split('id="t-auc"', 1)[1].split("</table>", 1)[0]
    mean, lo = run["metrics"]["real_syn.auc_mean"], run["metrics"]["real_syn.auc_ci_low"]
    assert f"{mean:.3f} ± " in auc_table and f"[{lo:.3f}, " in auc_table
    assert [len(dom.find("figure", c)) for c in ("roc", "montage", "training", "rounds")] == [1, 1, 1, 0]
    assert "No federated rounds" in sec["training"] and 'class="absent"' not in sec["roc"]
    # Every image is inline PNG data, and nothing points outside the file.
    srcs = [a["src"] for a in dom.find("img")]
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(a["href"].startswith("#") for a in dom.find("a"))
    assert "http://" not in text and "https://" not in text and "<script" not in text


def test_roc_aucs_recomputed_from_predictions_match_the_metric_table(site_report, run):
    """The ROC section recomputes each seed's AUC from predictions.json; their mean must be the
    seed-mean AUC the metrics code reported."""
    sec = _sections(site_report["html"].read_text())["roc"]
    rows = re.findall(r"<tr><td>(\w+)</td><td>seed (\d)</td><td class=\"num\">([\d.]+)</td>", sec)
    assert len(rows) == len(REGIMES_RUN) * len(SEEDS)
    for regime in REGIMES_RUN:
        aucs = [float(a) for r, _, a in rows if r == regime]
        assert np.mean(aucs) == pytest.approx(run["metrics"][f"{regime}.auc_mean"], abs=1e-3)


def test_discover_sources_follows_the_run_layout(run, tmp_path):
    src = discover_sources(tmp_path / "elsewhere", ["A"], {"runs": str(run["clf"])})
    assert src.classifier_dirs == {"A": run["clf"]}
    assert src.montages == {"A": run["clf"].parent / "synthesis" / "montage.png"}
    assert list(src.training_logs) == ["VAE", "Backbone + source ControlNet", "ControlNet of site A",
                                       "Classifier real_only", "Classifier real_syn"]
    assert list(src.training_logs["Classifier real_syn"]) == ["seed 0", "seed 1"]
    # Without the runs folder in the context or at out_dir: nothing, and it says where it looked.
    none = discover_sources(tmp_path / "elsewhere", ["A"], {})
    assert not none.classifier_dirs and "elsewhere" in (none.absent or "")


def test_federated_report_shows_rounds_and_says_why_images_are_absent(tmp_path):
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROUNDS))
    src = discover_sources(tmp_path, ["A"], FED_DATA["context"])
    assert len(src.rounds) == 3 and not src.classifier_dirs
    sec = _sections(render_html(FED_DATA, src))
    assert "predictions and images stay at the sites" in sec["roc"]
    assert "predictions and images stay at the sites" in sec["montages"]
    assert sec["training"].count('<figure class="rounds">') == 1
    assert "0.750 ± 0.010" in sec["results"]
    assert "<td>B</td><td>failed</td>" in sec["results"]  # a site without metrics keeps its row


def test_every_text_is_escaped(tmp_path):
    evil = '<script>alert("x")</script>&'
    data = {**FED_DATA, "title": evil, "context": {"note": evil, "sites": {evil: {"status": evil}}},
            "sites": {evil: FED_DATA["sites"]["A"]}}
    text = render_html(data, ReportSources(rounds=[{"phase": evil, "round": 1, "metrics": {"loss": 0.1}}]))
    assert "<script" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in text


def test_other_report_sections_render_as_tables():
    data = {**FED_DATA, "audit": {"A": {"nn_distance_p5": 0.12, "flagged": 0}, "B": {"nn_distance_p5": 0.2}}}
    sec = _sections(render_html(data, None))
    assert "<h2>Memorisation audit</h2>" in sec["x-audit"]
    assert "<th>nn_distance_p5</th>" in sec["x-audit"] and "<td>B</td>" in sec["x-audit"]
    assert "0.12" in sec["x-audit"] and list(sec)[-1] == "context"


def test_a_damaged_predictions_file_costs_its_curve_with_a_note(run):
    bad = run["clf"] / "real_syn" / "seed_1" / "predictions.json"
    bad.write_text('{"y_true": [0, 1], "y_score": [0.5]}')
    sec = _sections(render_html(json.loads(json.dumps(FED_DATA)), discover_sources(run["clf"], ["A"], {})))["roc"]
    assert f"{bad}: unreadable (ValueError" in sec
    assert sec.count("<td>seed ") == len(REGIMES_RUN) * len(SEEDS) - 1


def test_site_audit_numbers_get_their_own_section_not_site_work_columns(run, tmp_path):
    audit = {"audit.n_audited": 4, "audit.n_flagged": 1, "audit.threshold": 0.25, "audit.ratio_median": 0.61}
    paths = write_report(tmp_path, {"A": {**run["metrics"], **audit, "n_synthetic_excluded": 1}}, title="t",
                         context={})
    sec = _sections(paths["html"].read_text())
    assert list(sec)[:2] == ["results", "audit"]
    header = re.findall(r"<th>([^<]*)</th>", sec["audit"].split("<tbody>")[0])
    assert header == ["site", "n_audited", "n_flagged", "threshold", "ratio_median", "excluded from training"]
    assert "<tr><td>A</td>" + "".join(f'<td class="num">{v}</td>' for v in ("4", "1", "0.250", "0.610", "1")) \
        in sec["audit"]
    assert "audit." not in sec["results"]


def test_faithfulness_section_and_paired_differences_with_their_interval(run, tmp_path):
    # The paired difference of the fixture's two regimes, from their predictions, as evaluate_site sends it.
    preds = {r: [json.loads((run["clf"] / r / f"seed_{s}" / "predictions.json").read_text()) for s in SEEDS]
             for r in REGIMES_RUN}
    first = preds["real_syn"][0]
    d = paired_auc_difference(first["y_true"], [p["y_score"] for p in preds["real_syn"]],
                              [p["y_score"] for p in preds["real_only"]], first["groups"], n_boot=50, seed=0)
    diff = {f"diff.real_syn__real_only.auc_{k}": d[x] for k, x in (("mean", "mean"), ("ci_low", "ci_low"),
                                                                   ("ci_high", "ci_high"))}
    faith = {"faithfulness.n_train": 4, "faithfulness.real.dice_mean": 0.8, "faithfulness.real.n": 6,
             "faithfulness.aldm.dice_mean": 0.71, "faithfulness.aldm.dice_gap": 0.09, "faithfulness.aldm.n": 4,
             "faithfulness.gan.dice_mean": 0.55, "faithfulness.gan.dice_gap": 0.25, "faithfulness.gan.n": 4}
    paths = write_report(tmp_path, {"A": {**run["metrics"], **faith, **diff}}, title="t", context={"ci": 0.95})
    sec = _sections(paths["html"].read_text())
    assert list(sec)[:2] == ["results", "faithfulness"]
    assert "tumour appears where the mask says" in sec["faithfulness"]
    header = re.findall(r"<th>([^<]*)</th>", sec["faithfulness"].split("<tbody>")[0])
    assert header == ["site", "set", "Dice mean", "n", "gap (real - set)"]
    rows = [re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", sec["faithfulness"])][1:]
    assert rows == [["A", "real test cases (segmenter trained on K = 4)", "0.800", "6", "-"],
                    ["A", "ALDM synthetic", "0.710", "4", "+0.090"],
                    ["A", "gan baseline synthetic", "0.550", "4", "+0.250"]]
    effect = sec["results"].split("Synthetic data effect")[1]
    cell = f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" + (
        " evidence" if d["ci_low"] > 0 or d["ci_high"] < 0 else "")
    assert f">{cell}</td>" in effect
    assert ("beats" in effect) == cell.endswith("evidence") and ("No paired 95% interval" in effect) != ("beats" in effect)
    assert "faithfulness." not in sec["results"] and "diff." not in sec["results"]  # no Site work columns


def test_image_quality_section(run, tmp_path):
    quality = {"quality.real.ms_ssim_diversity": 0.4, "quality.real.n": 4, "quality.aldm.ssim": 0.62,
               "quality.aldm.mmd": 1.5, "quality.aldm.ms_ssim_diversity": 0.45, "quality.aldm.fd_rand_resnet10_2d": 0.12,
               "quality.aldm.fd_rand_resnet10_3d": 0.3, "quality.aldm.plausible": 1.0, "quality.aldm.n": 8}
    paths = write_report(tmp_path, {"A": {**run["metrics"], **quality}}, title="t", context={})
    sec = _sections(paths["html"].read_text())
    assert list(sec)[:2] == ["results", "quality"]
    assert "lower = more diverse" in sec["quality"]
    header = re.findall(r"<th>([^<]*)</th>", sec["quality"].split("<tbody>")[0])
    assert header == ["site", "set", "SSIM to host", "MMD", "MS-SSIM diversity", "FD 2D", "FD 3D",
                      "brain plausible", "n"]
    rows = [re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", sec["quality"])][1:]
    assert rows == [["A", "real cases (reference)", "-", "-", "0.400", "-", "-", "-", "4"],
                    ["A", "ALDM synthetic", "0.620", "1.500", "0.450", "0.120", "0.300", "1.000", "8"]]
    assert "quality." not in sec["results"]


def test_not_a_report_is_a_clear_error():
    with pytest.raises(ValueError, match="no 'sites' mapping"):
        render_html({"title": "x"})


# ---------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------

# Marks each image once the page has loaded; inserted (with a CSP nonce) into a copy of the report
# only: the report itself has no script.
_PROBE = ("<script nonce=\"probe\">window.addEventListener('load', () => { for (const i of document.images) "
          "i.dataset.decoded = (i.complete && i.naturalWidth > 0) ? 'yes' : 'no'; });</script>")
# A control the probe must flag: not a PNG.
_BROKEN = '<img id="control" src="data:image/png;base64,AAAA" alt="control">'


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@needs_chromium
def test_chromium_decodes_every_image_and_builds_the_tables(site_report, tmp_path):
    text = site_report["html"].read_text()
    csp = "default-src 'none';"
    assert text.count(csp) == 1
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace(csp, csp + " script-src 'nonce-probe';").replace("</body>", _BROKEN + _PROBE + "</body>"))
    dom = _Dom(_chromium(tmp_path, "--dump-dom", probe.as_uri()).stdout)
    images = dom.find("img")
    assert len(images) == 4
    assert {a.get("id", ""): a.get("data-decoded") for a in images}["control"] == "no"  # the probe can fail
    assert [a.get("data-decoded") for a in images if a.get("id") != "control"] == ["yes"] * 3
    assert len(dom.find("table", "metric")) == 3 and len(dom.find("table", "roc-auc")) == 1
    assert [a["id"] for a in dom.find("section")] == ["results", "roc", "montages", "training", "context"]


@needs_chromium
def test_chromium_screenshot_of_the_report_is_not_blank(site_report, tmp_path):
    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", site_report["html"].as_uri())
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    ink = (pixels.mean(axis=-1) < 0.9).mean()  # text, table rules, figures
    assert 0.02 < ink < 0.8, ink
