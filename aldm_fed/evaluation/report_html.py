"""The self-contained HTML report: `report.html`, next to `report.md`.

One file a reader can open offline or attach to an e-mail: inline CSS, every figure a PNG drawn
with matplotlib in memory and embedded as a base64 `data:` URI, no JavaScript, and a
Content-Security-Policy that forbids the browser to load anything from outside the file. Every
text from the inputs (site names, paths, context values) is HTML-escaped.

It shows what `report.json` holds (the same tables as `report.md`, with intervals) plus the
figures whose data the report's writer can read:

| section | from | who has it |
|---|---|---|
| metric tables, site work, context | `report.json` | every report |
| memorisation audit (when a site ran it) | `sites.<site>.audit` of `report.json` | every report |
| anatomical faithfulness (when a site measured it) | `sites.<site>.faithfulness` of `report.json` | every report |
| image quality of each synthetic set (when a site has one) | `sites.<site>.quality` of `report.json` | every report |
| paired AUC differences with intervals, in the comparison tables | `sites.<site>.differences` of `report.json` | every report |
| ROC curves, one per training seed, per site and regime | `<classifier>/<regime>/seed_<s>/predictions.json` | a site (`aldm-fed evaluate`) |
| real vs synthetic montage | `sites/<site>/synthesis/montage.png` | a site |
| training loss vs step per stage | `metrics.jsonl` of the VAE, backbone, site ControlNet and classifier runs | a site / single-site run |
| federated loss per round and phase | the server's `rounds.jsonl` (`context["rounds"]`) | the federated server |
| any other section | any other top-level entry of `report.json`, as a table | whoever adds it |

A section without data says so and why (e.g. on the federated server: predictions and images
stay at the sites). `write_report` calls `write_html_report` with `discover_sources`:

```python
sources = discover_sources(out_dir, ["A"], context)      # finds the site's runs on disk
write_html_report(out_dir / "report.html", json.loads((out_dir / "report.json").read_text()), sources)
```
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from aldm_fed.evaluation.regimes import PREDICTIONS_FILE, RESULTS_FILE, comparison_pairs, is_regime, order_regimes
from aldm_fed.evaluation.report_format import (
    FAITHFULNESS_HOWTO,
    OWN_SECTIONS,
    QUALITY_HOWTO,
    difference_cell,
    difference_verdicts,
    faithfulness_rows,
    flat_row,
    fmt,
    inline,
    metric_rows,
    quality_rows,
)
from aldm_fed.io import atomic_write_text
from aldm_fed.synthesis.writer import MONTAGE_NAME
from aldm_fed.training.artifacts import SITES_DIR, RunLayout
from aldm_fed.training.loop import METRICS_FILE

__all__ = ["HTML_FILE", "ReportSources", "discover_sources", "render_html", "write_html_report"]

HTML_FILE = "report.html"
# An image larger than this is left out (with a note) rather than bloating the report.
MAX_IMAGE_BYTES = 16 * 2**20
# The same tables, in the same order, as report.md.
_TABLES: tuple[tuple[str, str], ...] = (("auc", "AUC"), ("balanced_accuracy", "Balanced accuracy"), ("f1", "F1"))
_CASE_COLUMNS: dict[str, str] = {"n_source_cases": "source cases", "n_target_cases": "target cases",
                                 "n_test_cases": "test cases", "n_synthetic_cases": "synthetic volumes available",
                                 "n_test_samples": "test samples"}
_WORK_COLUMNS: dict[str, str] = {"adapt.loss": "ControlNet adaptation loss", "synthesis.n_volumes": "synthetic volumes"}
# report.json keys that the fixed sections show; any other top-level key gets a generic section.
_KNOWN_KEYS = frozenset({"version", "title", "created", "context", "regimes", "sites"})
_HEADINGS: dict[str, str] = {"audit": "Memorisation audit"}
_FEDERATED_ABSENT = ("this is the federated server's report: predictions and images stay at the sites, "
                     "only metrics reach the server; each site's own 'aldm-fed evaluate' report shows them")
# No request leaves the file: images only from data: URIs, styles only inline, no scripts.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1b1f24;
 max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:34px 0 10px;border-bottom:2px solid #d8dee4;
 padding-bottom:4px}h3{font-size:16px;margin:22px 0 8px}
.meta{color:#57606a;margin:0 0 12px}nav{margin:14px 0;padding:10px 14px;background:#f6f8fa;border-radius:6px}
nav a{margin-right:14px;color:#0b5cad;text-decoration:none}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f3f6}tbody tr:nth-child(even){background:#fafbfc}td.num{text-align:right;
 font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{color:#57606a;font-size:13px;margin-top:4px}
.absent{color:#6e4a00;background:#fff8e1;border-left:4px solid #e0a800;padding:6px 10px}
code{background:#f0f3f6;padding:1px 4px;border-radius:3px;font-size:13px}
ul.howto li{margin:3px 0}
"""


@dataclass(frozen=True)
class ReportSources:
    """What the HTML report draws beyond `report.json`: files of the run, read where they are.

    Args:
        classifier_dirs: site -> its classifier run folder (`results.json`,
            `<regime>/seed_<s>/predictions.json` and `train/metrics.jsonl`).
        montages: site -> PNG of its synthetic volumes next to real hosts.
        training_logs: panel title -> line label -> `metrics.jsonl` files, concatenated in order
            (a federated site's local rounds are one run per round).
        rounds: the federated rounds (`rounds.jsonl` records: phase, round, metrics).
        absent: why predictions, images and training logs are missing, when known (shown in place
            of those sections).
    """

    classifier_dirs: Mapping[str, Path] = field(default_factory=dict)
    montages: Mapping[str, Path] = field(default_factory=dict)
    training_logs: Mapping[str, Mapping[str, Sequence[Path]]] = field(default_factory=dict)
    rounds: Sequence[Mapping[str, Any]] = ()
    absent: str | None = None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines log; a line cut by a kill (or not an object) is skipped."""
    out: list[dict[str, Any]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _local_rounds(run_root: Path, phase: str) -> list[Path]:
    """A federated site's local runs of one phase (`federation/<phase>/round_0003-<sha>/`), in
    round order."""
    folder = run_root / "federation" / phase
    if not folder.is_dir():
        return []
    runs = [p / METRICS_FILE for p in folder.glob("round_*") if (p / METRICS_FILE).is_file()]
    return sorted(runs, key=lambda p: p.parent.name)


def discover_sources(out_dir: str | os.PathLike[str], sites: Sequence[str],
                     context: Mapping[str, Any]) -> ReportSources:
    """Find the files a report's figures come from, by the run-folder layout (docs/contracts.md).

    Rules: `context["rounds"]` (a list of records, as the federated server passes it) or else
    `out_dir/rounds.jsonl` gives the per-round curves. A report of one site whose classifier run
    folder (`context["runs"]`, as `aldm-fed evaluate` sets it, or `out_dir`) holds
    `results.json` gets its ROC curves and classifier training curves; when that folder is
    `<run>/sites/<site>/classifier`, also `<run>/sites/<site>/synthesis/montage.png` and the loss
    logs of `<run>/{vae,backbone}` (or the site's local federated rounds) and of the site's
    ControlNet. A federated report (`context["mode"] == "federated"`) reads no site files.

    Args:
        out_dir: where the report is written.
        sites: the report's sites.
        context: the report's context.

    Returns:
        The sources found (possibly none, with `absent` saying why).
    """
    out = Path(out_dir)
    rounds: Sequence[Mapping[str, Any]] = ()
    given = context.get("rounds")
    if isinstance(given, (list, tuple)) and all(isinstance(r, Mapping) for r in given):
        rounds = list(given)
    elif (out / "rounds.jsonl").is_file():  # the name of federation.global_models.ROUNDS_LOG
        rounds = _read_jsonl(out / "rounds.jsonl")
    if context.get("mode") == "federated":
        return ReportSources(rounds=rounds, absent=_FEDERATED_ABSENT)
    if len(sites) != 1:
        return ReportSources(rounds=rounds, absent=f"a report of {len(sites)} sites reads no site files; "
                                                   "each site's own 'aldm-fed evaluate' report shows them")
    site = str(sites[0])
    runs = context.get("runs")
    candidates = [Path(runs)] if isinstance(runs, str) and runs else []
    clf = next((c for c in [*candidates, out] if (c / RESULTS_FILE).is_file()), None)
    if clf is None:
        return ReportSources(rounds=rounds, absent=f"no classifier runs ({RESULTS_FILE}) in "
                                                   f"{', '.join(str(c) for c in [*candidates, out])}")
    logs: dict[str, dict[str, list[Path]]] = {}
    site_dir = clf.parent
    montages: dict[str, Path] = {}
    if site_dir.name == site and site_dir.parent.name == SITES_DIR:
        layout = RunLayout(site_dir.parent.parent)
        for stage, title in (("vae", "VAE"), ("backbone", "Backbone + source ControlNet")):
            own = layout.stage_dir(stage) / METRICS_FILE
            local = _local_rounds(layout.root, stage)
            if own.is_file():
                logs[title] = {"loss": [own]}
            elif local:
                kept = f"{len(local)} round{'s' if len(local) > 1 else ''} kept"
                logs[f"{title}\n(this site's local runs, {kept})"] = {"loss": local}
        controlnet = layout.stage_dir("controlnet", site) / METRICS_FILE
        if controlnet.is_file():
            logs[f"ControlNet of site {site}"] = {"loss": [controlnet]}
        montage = site_dir / "synthesis" / MONTAGE_NAME
        if montage.is_file():
            montages[site] = montage
    for regime in _regime_folders(clf):
        seeds = sorted((clf / regime).glob("seed_*/train/" + METRICS_FILE), key=lambda p: _seed(p.parents[1]))
        if seeds:
            logs[f"Classifier {regime}"] = {p.parents[1].name.replace("_", " "): [p] for p in seeds}
    return ReportSources(classifier_dirs={site: clf}, montages=montages, training_logs=logs, rounds=rounds)


def _regime_folders(clf: Path) -> list[str]:
    """The regimes (`regimes.is_regime`: also baselines and domain shift) with a folder in `clf`, in
    report order."""
    return order_regimes({p.name for p in clf.iterdir() if p.is_dir() and is_regime(p.name)}) if clf.is_dir() else []


def _seed(folder: Path) -> int:
    tail = folder.name.removeprefix("seed_")
    return int(tail) if tail.isdigit() else 1 << 30


# ---------------------------------------------------------------------------------------------
# Small HTML pieces
# ---------------------------------------------------------------------------------------------

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric_from: int = 1,
           cls: str = "") -> str:
    """An HTML table; cells from column `numeric_from` on are right-aligned when they look like
    numbers."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = str(cell)
            num = i >= numeric_from and (text[:1].isdigit() or text[:1] in "-+[" and text[1:2].isdigit())
            cells.append(f'<td class="num">{_e(text)}</td>' if num else f"<td>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{_e(cls)}"' if cls else ""
    # Wide tables (5 regimes with intervals) scroll inside their box instead of the page.
    return f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _absent(text: str) -> str:
    return f'<p class="absent">{_e(text)}</p>'


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(src: str, alt: str, caption: str, *, cls: str) -> str:
    return (f'<figure class="{_e(cls)}"><img src="{_e(src)}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _generic(name: str, value: Any) -> str:
    """Any JSON value as HTML: a mapping of mappings or a list of mappings as a table (one row per
    item), a mapping of plain values as a two-column table, anything else inline."""
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else None
    if items is not None and items and all(isinstance(v, Mapping) for v in items):
        rows = ([{name: str(k), **flat_row(v)} for k, v in value.items()] if isinstance(value, Mapping)
                else [flat_row(v) for v in value])
        columns = list(dict.fromkeys(c for row in rows for c in row))
        return _table(columns, [[row.get(c, "-") for c in columns] for row in rows])
    if isinstance(value, Mapping):
        return _table(["name", "value"], [[k, inline(v)] for k, v in value.items()])
    return f"<p>{_e(inline(value))}</p>"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _metric_table(metric: str, data: Mapping[str, Any]) -> str:
    """Sites x regimes: the seed mean (± std over seeds when several), a CI column per regime that
    has an interval at some site; the same layout as report.md."""
    header, rows = metric_rows(metric, data["sites"], list(data.get("regimes", [])))
    return _table(header, rows, cls=f"metric metric-{metric}")


def _results(data: Mapping[str, Any]) -> str:
    sites, regimes = data["sites"], list(data.get("regimes", []))
    ci = data.get("context", {}).get("ci")
    ci_text = f"{float(ci):.0%} " if isinstance(ci, (int, float)) and not isinstance(ci, bool) else ""
    parts = ['<ul class="howto">',
             "<li><b>Test set</b>: each site's own held-out REAL cases, never seen in training and never "
             "synthetic; sites are not pooled.</li>",
             "<li><b>Regimes</b> differ only in their training data, at the same budget: "
             "<code>real_only</code>, <code>real_aug</code> (classic augmentation), <code>real_syn</code> "
             "(K real + synthetic), <code>syn_only</code>, <code>oracle</code> (a larger real pool).</li>",
             "<li><b>Values</b>: means over training seeds (± std over seeds when several). "
             f"<b>CI</b>: {_e(ci_text)}two-stage bootstrap interval of the seed mean (test patients and "
             "training seeds resampled).</li>",
             "<li><b>Small n</b>: with few test patients the intervals are wide; with fewer than 10 a difference "
             "is marked too few to conclude. A difference between two "
             "regimes is judged by its own paired interval (both resampled on the same test patients), not by "
             "whether two separate intervals overlap. <b>-</b>: skipped or not available.</li>",
             "</ul>"]
    for metric, heading in _TABLES:
        parts += [f'<h3 id="t-{metric}">{_e(heading)}</h3>', _metric_table(metric, data)]
    pairs = comparison_pairs(regimes)
    diffs = {name: s.get("differences") or {} for name, s in sites.items()}
    if pairs:  # baselines and domain shift (aldm-fed compare)
        parts.append("<h3>ALDM against the baselines, and the domain-shift gap (AUC)</h3><p>Paired AUC "
                     f"differences a - b (mean over seeds) with their {_e(ci_text)}interval from a paired "
                     "two-stage bootstrap (the same test patients and seeds resampled for both regimes); positive = "
                     "the first regime is better; <b>evidence</b> marks an interval that excludes 0 over at least 10 "
                     "test patients. Baselines "
                     "use sets made from the same masks; <code>shift_from_X</code> trains on site X's real cases "
                     "(single machine only).</p>")
        rows = [[f"{a} - {b}", *(difference_cell(diffs[n], a, b, s["regimes"].get(a, {}).get("auc_mean"),
                                                 s["regimes"].get(b, {}).get("auc_mean")) for n, s in sites.items())]
                for a, b in pairs]
        parts.append(_table(["difference", *sites], rows, cls="comparison"))
        parts.append(_verdicts(difference_verdicts(diffs, pairs, ci_text)))
    parts.append("<h3>Synthetic data effect: real_syn - real_only (AUC)</h3>")
    rows = []
    for name, s in sites.items():
        a, b = (s["regimes"].get(r, {}).get("auc_mean") for r in ("real_syn", "real_only"))
        rows.append([name, fmt(b), fmt(a), difference_cell(diffs[name], "real_syn", "real_only", a, b)])
    parts.append(_table(["site", "real_only AUC", "real_syn AUC", "difference [CI]"], rows, cls="effect"))
    parts.append(_verdicts(difference_verdicts(diffs, [("real_syn", "real_only")], ci_text)))
    parts.append("<h3>Training data</h3><p>Real / synthetic training cases per regime.</p>")
    rows = []
    for name, s in sites.items():
        rows.append([name, *("-" if r not in s["regimes"] else
                             f"{fmt(s['regimes'][r].get('n_train_cases_real'))} / "
                             f"{fmt(s['regimes'][r].get('n_train_cases_syn'))}" for r in regimes)])
    parts.append(_table(["site", *regimes], rows, cls="training-data"))
    parts.append(_site_work(data))
    return "\n".join(parts)


def _site_work(data: Mapping[str, Any]) -> str:
    """Status (where the context lists it), site work numbers and case counts, one row per site."""
    sites = data["sites"]
    listed = data.get("context", {}).get("sites")
    statuses = ({str(k): str(v["status"]) for k, v in listed.items() if isinstance(v, Mapping) and "status" in v}
                if isinstance(listed, Mapping) else {})
    # the audit, faithfulness and paired differences have their own sections
    names = {k for s in sites.values() for k in s.get("work", {}) if not k.startswith(tuple(OWN_SECTIONS))}
    work = [*(k for k in _WORK_COLUMNS if k in names), *sorted(names - set(_WORK_COLUMNS))]
    counts = [k for k in _CASE_COLUMNS if any(k in s["site"] for s in sites.values())]
    if not (work or statuses or counts):
        return ""
    header = ["site", *(["status"] if statuses else []), *(_WORK_COLUMNS.get(k, k) for k in work),
              *(_CASE_COLUMNS[k] for k in counts)]
    rows = []
    for name in sorted(set(sites) | set(statuses)):
        s = sites.get(name, {"site": {}, "work": {}})
        nums = {**s.get("work", {}), **s["site"]}
        rows.append([name, *([statuses.get(name, "-")] if statuses else []), *(fmt(nums.get(k)) for k in [*work, *counts])])
    return "<h3>Site work and cases</h3>" + _table(header, rows, cls="site-work")


def _audit_section(data: Mapping[str, Any]) -> str | None:
    """The sites' memorisation audit (`sites.<site>.audit` of report.json: counts, threshold,
    nearest-neighbour distance ratios), one row per audited site; None when no site sent one."""
    sites = data["sites"]
    audits = {n: s["audit"] for n, s in sites.items() if isinstance(s.get("audit"), Mapping) and s["audit"]}
    if not audits:
        return None
    columns = list(dict.fromkeys(k for a in audits.values() for k in a))
    excluded = any("n_synthetic_excluded" in sites[n]["site"] for n in audits)
    rows = [[n, *(fmt(a.get(k)) for k in columns),
             *([fmt(sites[n]["site"].get("n_synthetic_excluded"))] if excluded else [])] for n, a in audits.items()]
    return ("<p>Each site compared its synthetic volumes with its own real training cases (case ids stay at "
            "the site). A ratio is the distance to the nearest real case over the typical distance between "
            "two real cases (0: a copy; ~1: as far as another patient); a volume below the threshold is "
            "flagged as a near-copy. <code>report.md</code> explains each column.</p>" +
            _table(["site", *columns, *(["excluded from training"] if excluded else [])], rows, cls="audit"))


def _per_site_section(data: Mapping[str, Any], key: str, rows_of: Any, howto: str) -> str | None:
    """One table over the sites from `sites.<site>.<key>` of report.json (`rows_of` makes its
    header and rows, report_format's), under its how-to-read paragraph; None when no site has it."""
    sites = {n: s[key] for n, s in data["sites"].items() if isinstance(s.get(key), Mapping) and s[key]}
    if not sites:
        return None
    header, rows = rows_of(sites)
    return f"<p>{_e(howto)}</p>" + _table(header, rows, numeric_from=2, cls=key)


def _quality_section(data: Mapping[str, Any]) -> str | None:
    """Per site: the image quality of each synthetic set and the real cases' diversity."""
    return _per_site_section(data, "quality", quality_rows, QUALITY_HOWTO)


def _verdicts(lines: Sequence[str]) -> str:
    return "<ul class=\"verdicts\">" + "".join(f"<li>{_e(v)}</li>" for v in lines) + "</ul>" if lines else ""


def _faithfulness_section(data: Mapping[str, Any]) -> str | None:
    """Per site: the segmenter's Dice on the real test cases and on each synthetic set."""
    return _per_site_section(data, "faithfulness", faithfulness_rows, FAITHFULNESS_HOWTO)


def _roc_section(data: Mapping[str, Any], sources: ReportSources) -> str:
    """Per site: one panel per regime, one ROC curve per training seed, on the site's held-out
    real test samples; and a table of each seed's AUC recomputed from its predictions."""
    if not sources.classifier_dirs:
        return _absent(f"No ROC curves: {sources.absent or 'no classifier predictions given'}.")
    parts = ["<p>One curve per training seed (not pooled), on the site's held-out real test samples "
             "(slices for the slice task), from each run's <code>predictions.json</code>. The AUCs "
             "below are recomputed from those predictions; their mean is the table's AUC.</p>"]
    for site, folder in sorted(sources.classifier_dirs.items()):
        panels: list[tuple[str, list[tuple[str, np.ndarray, np.ndarray, float]]]] = []
        rows: list[list[str]] = []
        notes: list[str] = []
        for regime in _regime_folders(folder):
            curves = []
            for pred in sorted((folder / regime).glob(f"seed_*/{PREDICTIONS_FILE}"), key=lambda p: _seed(p.parent)):
                # A damaged file costs its curve (with a note naming it), not the whole report.
                try:
                    rec = json.loads(pred.read_text(encoding="utf-8"))
                    y, s = np.asarray(rec["y_true"], dtype=int), np.asarray(rec["y_score"], dtype=float)
                    if y.shape != s.shape or y.ndim != 1:
                        raise ValueError(f"y_true {y.shape} and y_score {s.shape} differ")
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    notes.append(f"{pred}: unreadable ({type(exc).__name__}: {exc}), no ROC curve")
                    continue
                if y.size == 0 or len(set(y.tolist())) < 2:
                    notes.append(f"{regime} {pred.parent.name}: one class only, no ROC curve")
                    continue
                fpr, tpr, _ = roc_curve(y, s)
                auc = float(roc_auc_score(y, s))
                label = pred.parent.name.replace("_", " ")
                curves.append((label, fpr, tpr, auc))
                n_patients = len(set(rec.get("groups", []))) or "-"
                rows.append([regime, label, f"{auc:.3f}", str(y.size), str(n_patients), str(int(y.sum()))])
            if curves:
                panels.append((regime, curves))
        parts.append(f"<h3>Site {_e(site)}</h3>")
        if not panels:
            parts.append(_absent(f"No predictions ({PREDICTIONS_FILE}) under {folder}."))
            continue
        fig = Figure(figsize=(3.1 * len(panels), 3.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (regime, curves) in zip(axes, panels, strict=True):
            for label, fpr, tpr, auc in curves:
                ax.plot(fpr, tpr, lw=1.4, label=f"{label}: {auc:.3f}")
            ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
            mean_auc = float(np.mean([c[3] for c in curves]))
            ax.set(title=f"{regime}\nmean AUC {mean_auc:.3f}", xlabel="false positive rate",
                   xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
            ax.legend(loc="lower right", fontsize=7, title="seed: AUC", title_fontsize=7)
        axes[0].set_ylabel("true positive rate")
        fig.suptitle(f"ROC curves, site {site} (held-out real test samples)", fontsize=11)
        parts.append(_figure(_png(fig), f"ROC curves of site {site}",
                             f"Site {site}: one panel per regime, one curve per training seed; dashed: chance.",
                             cls="roc"))
        parts.append(_table(["regime", "seed", "AUC", "test samples", "test patients", "positives"], rows,
                            numeric_from=2, cls="roc-auc"))
        parts += [_absent(n) for n in notes]
    return "\n".join(parts)


def _montage_section(data: Mapping[str, Any], sources: ReportSources) -> str:
    sites = sorted(data["sites"])
    if not sources.montages:
        why = sources.absent or f"no {MONTAGE_NAME} found for site {', '.join(sites)} (made by 'aldm-fed synthesize')"
        return _absent(f"No montages: {why}.")
    parts = ["<p>Each row: a synthetic volume (left) next to the real case whose tumour mask it was "
             "made from (right), axial slice through the tumour, as written by "
             "<code>aldm-fed synthesize</code>.</p>"]
    for site in sites:
        path = sources.montages.get(site)
        parts.append(f"<h3>Site {_e(site)}</h3>")
        if path is None:
            parts.append(_absent(f"No synthesis montage for site {site}."))
            continue
        raw = Path(path).read_bytes()
        if len(raw) > MAX_IMAGE_BYTES:
            parts.append(_absent(f"{path}: {len(raw)} bytes, over the {MAX_IMAGE_BYTES} byte limit; "
                                 "left out of the report (open the file itself)."))
            continue
        src = "data:image/png;base64," + base64.b64encode(raw).decode("ascii")
        parts.append(_figure(src, f"real vs synthetic montage of site {site}",
                             f"Site {site}: synthetic vs real ({Path(path).name}).", cls="montage"))
    return "\n".join(parts)


def _series(files: Sequence[Path], key: str = "loss") -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(x, y, starts) of `key` over consecutive logs; each log's steps continue the previous one's
    (starts: the x where each later log begins)."""
    xs: list[float] = []
    ys: list[float] = []
    starts: list[float] = []
    offset = 0.0
    for i, path in enumerate(files):
        recs = [r for r in _read_jsonl(Path(path)) if isinstance(r.get(key), (int, float)) and "step" in r]
        if i:
            starts.append(offset)
        for r in recs:
            xs.append(offset + float(r["step"]))
            ys.append(float(r[key]))
        if recs:
            offset = xs[-1] + 1
    return np.asarray(xs), np.asarray(ys), starts


def _smooth(y: np.ndarray) -> np.ndarray:
    """A centred moving mean over ~2% of the points (the raw loss of a few samples is noisy)."""
    w = max(1, len(y) // 50)
    if w < 2:
        return y
    pad = np.pad(y, (w // 2, w - 1 - w // 2), mode="edge")
    return np.convolve(pad, np.ones(w) / w, mode="valid")


def _training_section(sources: ReportSources) -> str:
    parts: list[str] = []
    panels = []
    for title, lines in sources.training_logs.items():
        series = {label: _series(files) for label, files in lines.items()}
        series = {k: v for k, v in series.items() if v[0].size}
        if series:
            panels.append((title, series))
    if panels:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(4.4 * ncols, 3.1 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (title, series) in zip(axes, panels, strict=False):
            for label, (x, y, starts) in series.items():
                line, = ax.plot(x, y, lw=0.6, alpha=0.35)
                # markers where there are few points (a short run may log a single step)
                ax.plot(x, _smooth(y), lw=1.5, color=line.get_color(), label=label,
                        marker="o" if x.size < 30 else None, ms=3)
                for s in starts:
                    ax.axvline(s, color="0.75", lw=0.6, ls=":")
            if all(np.all(v[1] > 0) for v in series.values()):
                ax.set_yscale("log")
            ax.set(title=title, xlabel="step", ylabel="loss")
            ax.title.set_fontsize(10)
            if len(series) > 1:
                ax.legend(fontsize=7)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        parts.append(_figure(_png(fig), "training loss curves",
                             "Training loss vs step per stage (faint: logged values; bold: moving mean; dotted "
                             "lines: a new local run, e.g. the next federated round).", cls="training"))
    elif sources.absent:
        parts.append(_absent(f"No per-step training curves: {sources.absent}."))
    else:
        parts.append(_absent(f"No training logs ({METRICS_FILE}) of this run were found."))
    parts.append(_rounds_section(sources.rounds))
    return "\n".join(parts)


def _rounds_section(rounds: Sequence[Mapping[str, Any]]) -> str:
    """Per phase: the sites' mean training loss of each FedAvg round (as the server logged it)."""
    if not rounds:
        return "<h3>Federated rounds</h3>" + _absent("No federated rounds: not a federated run's report.")
    by_phase: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        metrics = r.get("metrics") if isinstance(r.get("metrics"), Mapping) else {}
        loss = metrics.get("loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            by_phase.setdefault(str(r.get("phase", "?")), []).append((int(r.get("round", 0)), float(loss)))
    if not by_phase:
        return "<h3>Federated rounds</h3>" + _absent("The federated rounds logged no loss.")
    fig = Figure(figsize=(4.2 * len(by_phase), 3.0), layout="constrained")
    axes = fig.subplots(1, len(by_phase), squeeze=False)[0]
    for ax, (phase, points) in zip(axes, by_phase.items(), strict=True):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set(title=f"{phase}: loss per round", xlabel="round", ylabel="mean local training loss")
        ax.title.set_fontsize(10)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return ("<h3>Federated rounds</h3>" +
            _figure(_png(fig), "federated loss per round",
                    "The sites' mean local training loss of each FedAvg round, per phase (rounds.jsonl).",
                    cls="rounds"))


def _context_section(context: Mapping[str, Any]) -> str:
    if not context:
        return _absent("No context given.")
    items, tables = [], []
    for key, value in context.items():
        values = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else None
        if values and all(isinstance(v, Mapping) for v in values):
            tables.append(f"<h3>{_e(str(key).replace('_', ' ').capitalize())}</h3>" + _generic(str(key), value))
        else:
            items.append(f"<tr><th>{_e(key)}</th><td>{_e(inline(value))}</td></tr>")
    return (f'<table class="context"><tbody>{"".join(items)}</tbody></table>' if items else "") + "".join(tables)


def render_html(data: Mapping[str, Any], sources: ReportSources | None = None) -> str:
    """The report page for `report.json`'s content and the figures of `sources`.

    Args:
        data: what `write_report` wrote to `report.json` (title, created, context, regimes, sites,
            and any further top-level sections).
        sources: where predictions, montages and training logs are (None: tables only).

    Returns:
        The whole HTML document.

    Raises:
        ValueError: `data` without `sites` (not a report).
    """
    if not isinstance(data.get("sites"), Mapping):
        raise ValueError("render_html: the report data has no 'sites' mapping (expected report.json's content)")
    sources = sources or ReportSources(absent="the report was written without its run's files")
    title = str(data.get("title", "aldm-fed report"))
    extra = [k for k in data if k not in _KNOWN_KEYS]
    sections = [("results", "Results", _results(data))]
    faith = _faithfulness_section(data)
    if faith is not None:
        sections.append(("faithfulness", "Anatomical faithfulness", faith))
    quality = _quality_section(data)
    if quality is not None:
        sections.append(("quality", "Image quality", quality))
    audit = _audit_section(data)
    if audit is not None:
        sections.append(("audit", "Memorisation audit", audit))
    sections += [("roc", "ROC curves", _roc_section(data, sources)),
                 ("montages", "Real vs synthetic", _montage_section(data, sources)),
                 ("training", "Training curves", _training_section(sources))]
    sections += [(f"x-{k}", _HEADINGS.get(k, str(k).replace("_", " ").capitalize()), _generic(str(k), data[k]))
                 for k in extra]
    sections.append(("context", "Context", _context_section(data.get("context", {}))))
    nav = "".join(f'<a href="#{_e(sid)}">{_e(heading)}</a>' for sid, heading, _ in sections)
    body = "\n".join(f'<section id="{_e(sid)}"><h2>{_e(heading)}</h2>\n{content}</section>'
                     for sid, heading, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n<p class=\"meta\">Written {_e(data.get('created', '-'))}; every number is "
        "also in <code>report.json</code> (and <code>report.csv</code>, <code>report.md</code>) next to "
        f"this file.</p>\n<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


def write_html_report(path: str | os.PathLike[str], data: Mapping[str, Any],
                      sources: ReportSources | None = None) -> Path:
    """Write the self-contained `report.html` (atomically).

    Args:
        path: the file to write.
        data: `report.json`'s content.
        sources: the run's files for the figures (see `discover_sources`).

    Returns:
        The written path.
    """
    out = Path(path)
    atomic_write_text(out, render_html(data, sources))
    return out
