"""The downstream-classification report of one or many sites: `report.json`, `.csv`, `.md` and
the self-contained `report.html` (with ROC curves, montages and training curves where the run's
files are at hand: `aldm_fed.evaluation.report_html`).

Input is what each site's `SiteEvaluation.metrics()` returns (flat numbers: `<regime>.<name>` and
site-level `n_*`), so the federated server writes it from the metrics the sites sent, and the
single-site `aldm-fed evaluate` from one site's. Only regime names (`regimes.is_regime`: `REGIMES`,
the baselines' `real_syn_<b>` / `syn_only_<b>` and the domain-shift `shift_from_<X>`) make regime columns;
other dotted keys a federated site sends (`adapt.loss`, `synthesis.n_volumes`) go, with the case
counts, into a "Site work" table, except three groups with sections of their own (and, prefix
removed, `sites.<s>.{audit,faithfulness,quality,differences}` in the JSON; `report_format.OWN_SECTIONS`):
the memorisation audit's `audit.*` numbers (`aldm_fed.synthesis.audit`), the segmenter's Dice per
set `faithfulness.*` ("Anatomical faithfulness", `aldm_fed.evaluation.faithfulness`), the image
quality of each synthetic set `quality.*` ("Image quality", `aldm_fed.evaluation.image_quality`) and the paired
AUC differences `diff.<a>__<b>.*` (`regimes.paired_differences`), which the comparison tables show
as "difference [CI]", with "evidence" only where the interval excludes 0:

```python
paths = write_report(out_dir, {"A": metrics_a, "C": metrics_c}, title="Federated run demo",
                     context={**config_summary(cfg), "rounds": 3})
paths["md"]   # the readable report: one table per metric, sites x regimes
```

A regime missing at a site (skipped there) and a metric missing in a regime (or not finite) show
as "-" in the Markdown, an empty cell in the CSV and no key in the JSON; nothing is inferred.

The context is shown generically: scalars (and lists of them) as `- **key**: value`, a mapping of
scalars as a short nested list, and a mapping of mappings (e.g. site -> counts and status) or a
list of mappings (e.g. federated rounds) as a table, nested mappings flattened one level
(`metrics.loss`). A site listed in `context["sites"]` with a `status` but without metrics (it did
not finish) still gets its row, with that status, in the Site work table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aldm_fed.evaluation.regimes import (
    REGIMES,
    SHIFT_PREFIX,
    SYNTHETIC_BASELINES,
    comparison_pairs,
    is_regime,
    order_regimes,
)
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
    interval_text,
    metric_rows,
    quality_rows,
    section_numbers,
    seed_mean_text,
)
from aldm_fed.evaluation.report_html import HTML_FILE, ReportSources, discover_sources, write_html_report
from aldm_fed.io import atomic_write_json, atomic_write_text

__all__ = ["REPORT_FILES", "config_summary", "write_report"]

REPORT_FILES: dict[str, str] = {"json": "report.json", "csv": "report.csv", "md": "report.md", "html": HTML_FILE}
# The tables of report.md: metric name (as in `<m>_mean`) -> heading.
_TABLES: tuple[tuple[str, str], ...] = (("auc", "AUC"), ("balanced_accuracy", "Balanced accuracy"), ("f1", "F1"))
# Column order of the CSV and the training-data table; other names follow, sorted.
_COUNTS = ("n_seeds", "n_train_cases_real", "n_train_cases_syn", "n_boot_valid")
# Columns of the Site work table (in this order; other non-regime dotted keys follow, sorted).
_WORK_COLUMNS: dict[str, str] = {"adapt.loss": "ControlNet adaptation loss", "synthesis.n_volumes": "synthetic volumes"}
_CASE_COLUMNS: dict[str, str] = {"n_source_cases": "source cases", "n_target_cases": "target cases",
                                 "n_test_cases": "test cases"}
_AUDIT_PREFIX = "audit."  # the memorisation audit's numbers (aldm_fed.synthesis.audit.SUMMARY_NAMES)
_FAITH_PREFIX = "faithfulness."  # the segmenter's Dice per set (aldm_fed.evaluation.faithfulness)
_QUALITY_PREFIX = "quality."  # image quality per set (aldm_fed.evaluation.image_quality)
_DIFF_PREFIX = "diff."  # paired AUC differences (aldm_fed.evaluation.regimes.paired_differences)
Numbers = dict[str, float | int]  # name -> value, of a site or of one regime at a site


@dataclass(frozen=True)
class _Split:
    """The sites' flat metrics sorted out, each by site name.

    Args:
        site_level: undotted keys (`n_test_cases`, ...).
        by_regime: regime (`regimes.is_regime`) -> `<name>` -> value.
        work: the other dotted keys, whole (`adapt.loss`, `synthesis.n_volumes`).
    """

    site_level: dict[str, Numbers]
    by_regime: dict[str, dict[str, Numbers]]
    work: dict[str, Numbers]


def config_summary(cfg: Any) -> dict[str, Any]:
    """The settings a reader of a report needs (run, task, classifier budget, bootstrap), for the
    `context` of `write_report`.

    Args:
        cfg: the composed config (reads `run_name`, `seed`, `data.size`, `classifier`).
    """
    c = cfg.classifier
    ev = c.get("eval") or {}
    return {
        "run_name": str(cfg.run_name),
        "task": str(c.task),
        "network": str(c.network.name),
        "data_size": int(cfg.data.size),
        "classifier_steps": int(c.train.steps),
        "classifier_batch_size": int(c.train.batch_size),
        "seeds": [int(s) for s in c.get("seeds", [0])],
        "syn_ratio": float(c.get("syn_ratio", 1.0)),
        "n_boot": int(ev.get("n_boot", 1000)),
        "ci": float(ev.get("ci", 0.95)),
        "threshold": float(ev.get("threshold", 0.5)),
        # Which split made each choice (issue #17): none is made from this run's results; the
        # settings above are the config's, and candidates are compared on the val split.
        "settings_chosen_on": "none of this run's cases: config values; compare candidates with "
                              "`aldm-fed evaluate --split val` (docs/evaluation.md)",
    }


def _number(site: str, key: str, value: Any) -> float | int | None:
    # The server passes what sites sent: refuse anything but numbers; NaN/inf read as missing.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"site {site!r}: metric {key!r} must be a number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if math.isfinite(value) else None


def _split(sites: Mapping[str, Mapping[str, float]]) -> _Split:
    """Site-level numbers, `<regime>.<name>` numbers by regime, and the other dotted keys."""
    if not sites:
        raise ValueError("no site metrics to report")
    out = _Split({}, {}, {})
    for site, flat in sites.items():
        name = str(site)
        out.site_level[name], out.by_regime[name], out.work[name] = {}, {}, {}
        for key, raw in flat.items():
            value = _number(name, key, raw)
            if value is None:
                continue
            prefix, dot, rest = str(key).partition(".")
            if dot and is_regime(prefix):
                out.by_regime[name].setdefault(prefix, {})[rest] = value
            elif dot:
                out.work[name][str(key)] = value
            else:
                out.site_level[name][prefix] = value
    return out


def _ordered(names: set[str], first: Sequence[str]) -> list[str]:
    return [n for n in first if n in names] + sorted(names - set(first))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _metric_table(metric: str, sites: list[str], regimes: list[str], site_level: dict[str, Numbers],
                  by_regime: dict[str, dict[str, Numbers]]) -> list[str]:
    """Sites x regimes: the seed mean (± std over seeds when there are several), and a CI column
    for each regime that has an interval at some site."""
    header, rows = metric_rows(metric, {s: {"site": site_level[s], "regimes": by_regime[s]} for s in sites}, regimes)
    return _table(header, rows)


def _metric_table_by_regime(metric: str, sites: list[str], regimes: list[str], site_level: dict[str, Numbers],
                            by_regime: dict[str, dict[str, Numbers]]) -> list[str]:
    """Regimes x sites (for many regimes): per site the seed mean (± std over seeds) and its CI."""
    header = ["regime"]
    for site in sites:
        header += [f"{site} (n test {fmt(site_level[site].get('n_test_cases'))})", f"{site} CI"]
    rows = [[r, *(text for site in sites for v in [by_regime[site].get(r, {})]
                  for text in (seed_mean_text(v, metric), interval_text(v, metric)))] for r in regimes]
    return _table(header, rows)


def _comparison_howto(regimes: Sequence[str]) -> list[str]:
    """How-to-read lines for the baselines and domain-shift rows present."""
    lines = []
    if any(r.endswith(tuple(f"_{b}" for b in SYNTHETIC_BASELINES)) for r in regimes):
        lines.append("- **Baselines** (`real_syn_<b>`, `syn_only_<b>`): the same regime with another "
                     "generator's synthetic set, made from the same masks, hosts and noise seeds as the ALDM "
                     "set: `noadapt` = the backbone with the source ControlNet (no site adaptation), "
                     "`concat` = the backbone with mask concatenation only (no ControlNet), `gan` = a "
                     "mask-conditioned 3D GAN trained on the same K cases.")
    if any(r.startswith(SHIFT_PREFIX) for r in regimes):
        lines.append("- **Domain shift** (`shift_from_<X>`): the same classifier trained on site X's real "
                     "cases and tested on this site's held-out real cases; `real_only` - `shift_from_<X>` is "
                     "the gap of training elsewhere. It reads other sites' data: a single-machine research "
                     "evaluation, never part of a federated run.")
    return lines


def _ci_text(context: Mapping[str, Any]) -> str:
    ci = context.get("ci")
    return f"{float(ci):.0%} " if isinstance(ci, (int, float)) and not isinstance(ci, bool) else ""


def _differences(split: _Split, site: str) -> dict[str, float | int]:
    return section_numbers(split.work.get(site, {}), _DIFF_PREFIX)


def _comparison_section(sites: list[str], regimes: list[str], split: _Split, ci_text: str) -> list[str]:
    """ALDM minus each baseline (same regime) and the domain-shift gaps per site: the paired AUC
    difference with its interval (the difference of seed means where a site sent no paired one),
    and which regime wins where the interval excludes 0; nothing when no baseline or shift row ran."""
    pairs = comparison_pairs(regimes)
    if not pairs:
        return []
    by_regime = split.by_regime
    rows = []
    for a, b in pairs:
        rows.append([f"{a} - {b}", *(difference_cell(_differences(split, site), a, b,
                                                      by_regime[site].get(a, {}).get("auc_mean"),
                                                      by_regime[site].get(b, {}).get("auc_mean")) for site in sites)])
    verdicts = difference_verdicts({s: _differences(split, s) for s in sites}, pairs, ci_text)
    return ["## ALDM against the baselines, and the domain-shift gap (AUC)", "",
            f"Paired AUC differences a - b at each site (mean over seeds) with their {ci_text}interval from a paired "
            "two-stage bootstrap: each resample draws the test patients once for both regimes, which were "
            "tested on the same cases, and the training seeds. Positive = the first regime is better. **evidence** "
            "marks an interval that excludes 0 over at least 10 test patients; with fewer the cell says **too few "
            "to conclude**; any other difference is within the sampling of test patients and seeds.", "",
            *_table(["difference", *sites], rows), "", *(f"- {v}" for v in verdicts), *([""] if verdicts else [])]


def _faithfulness_section(split: _Split) -> list[str]:
    """Per site: Dice of the segmenter on the real test cases and on each synthetic set; nothing
    when no site measured it."""
    sites = {s: nums for s in sorted(split.work) if (nums := section_numbers(split.work[s], _FAITH_PREFIX))}
    if not sites:
        return []
    header, rows = faithfulness_rows(sites)
    return ["## Anatomical faithfulness", "", FAITHFULNESS_HOWTO, "", *_table(header, rows), ""]


def _quality_section(split: _Split) -> list[str]:
    """Per site: SSIM to host, MMD, MS-SSIM diversity and Frechet distances of each synthetic set,
    with the real cases' diversity as reference; nothing when no site measured it."""
    sites = {s: nums for s in sorted(split.work) if (nums := section_numbers(split.work[s], _QUALITY_PREFIX))}
    if not sites:
        return []
    header, rows = quality_rows(sites)
    return ["## Image quality", "", QUALITY_HOWTO, "", *_table(header, rows), ""]


def _auc_difference(by_regime: dict[str, dict[str, Numbers]], site: str) -> float | None:
    a = by_regime[site].get("real_syn", {}).get("auc_mean")
    b = by_regime[site].get("real_only", {}).get("auc_mean")
    return None if a is None or b is None else float(a - b)


def _is_table(value: Any) -> bool:
    """A non-empty mapping of mappings or list of mappings: shown as a table."""
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return bool(items) and all(isinstance(v, Mapping) for v in items)


def _context(context: Mapping[str, Any]) -> list[str]:
    """The Context section: scalars and plain mappings as a list, in the given order; then a table
    for each mapping of mappings (one row per key, first column named after it) and each list of
    mappings (one row per item), columns in first-seen order."""
    items: list[str] = []
    tables: list[str] = []
    for key, value in context.items():
        if _is_table(value):
            rows = ([{str(key): str(k), **flat_row(v)} for k, v in value.items()] if isinstance(value, Mapping)
                    else [flat_row(v) for v in value])
            columns = list(dict.fromkeys(c for row in rows for c in row))
            tables += [f"### {str(key).replace('_', ' ').capitalize()}", ""]
            tables += _table(columns, [[row.get(c, "-") for c in columns] for row in rows]) + [""]
        elif isinstance(value, Mapping) and value:
            items += [f"- **{key}**:"] + [f"  - {k}: {inline(v)}" for k, v in value.items()]
        else:
            items.append(f"- **{key}**: {inline(value)}")
    return ["## Context", "", *items, "", *tables]


def _statuses(context: Mapping[str, Any]) -> dict[str, str]:
    """site -> status from `context["sites"][site]["status"]`, where given (the federated server
    lists every site there, also those that sent no metrics)."""
    listed = context.get("sites")
    if not isinstance(listed, Mapping):
        return {}
    return {str(s): str(v["status"]) for s, v in listed.items() if isinstance(v, Mapping) and "status" in v}


def _site_work(split: _Split, statuses: Mapping[str, str]) -> list[str]:
    """One row per site (also one listed only with a status): status, the non-regime dotted
    numbers (ControlNet adaptation, synthesis) and the case counts; nothing when no site has
    either a status or such numbers."""
    # the audit, faithfulness, image quality and paired differences have their own sections
    work = _ordered({k for v in split.work.values() for k in v if not k.startswith(tuple(OWN_SECTIONS))},
                    list(_WORK_COLUMNS))
    if not work and not statuses:
        return []
    counts = [k for k in _CASE_COLUMNS if any(k in v for v in split.site_level.values())]
    header = ["site", *(["status"] if statuses else []), *(_WORK_COLUMNS.get(k, k) for k in work),
              *(_CASE_COLUMNS[k] for k in counts)]
    rows = []
    for site in sorted(set(split.site_level) | set(statuses)):
        numbers = {**split.work.get(site, {}), **split.site_level.get(site, {})}
        rows.append([site, *([statuses.get(site, "-")] if statuses else []),
                     *(fmt(numbers.get(k)) for k in [*work, *counts])])
    return ["## Site work", "", "What each site did besides the classifier: status (as the server saw "
            "it), ControlNet adaptation, synthetic volumes made, and its cases.", "",
            *_table(header, rows), ""]


def _audit_section(split: _Split) -> list[str]:
    """One row per site whose memorisation audit sent numbers (`audit.*`, aldm_fed.synthesis.audit):
    counts, the threshold and the distribution of nearest-neighbour ratios; nothing when none did."""
    sites = sorted(s for s, v in split.work.items() if any(k.startswith(_AUDIT_PREFIX) for k in v))
    if not sites:
        return []
    rows = []
    for site in sites:
        numbers = section_numbers(split.work[site], _AUDIT_PREFIX)
        excluded = split.site_level.get(site, {}).get("n_synthetic_excluded")
        rows.append([site, *(fmt(numbers.get(k)) for k in ("n_audited", "n_flagged")), fmt(excluded),
                     *(fmt(numbers.get(k), 2) for k in ("threshold", "ratio_min", "ratio_q25", "ratio_median",
                                                         "ratio_q75", "ratio_max", "feature_ratio_median",
                                                         "real_ratio_min")),
                     fmt(numbers.get("n_real_below"))])
    header = ["site", "audited", "flagged", "excluded from training", "threshold", "ratio min", "q25", "median",
              "q75", "max", "feature ratio median", "closest real pair", "real cases below threshold"]
    return ["## Memorisation audit", "",
            "Each site compared every synthetic volume with its own real training cases (ids stay at the site; "
            "its `audit.json` lists the flagged volumes and their nearest real case). **ratio** = distance to "
            "the nearest real case / the typical distance between two different real cases (~1: as far as "
            "another patient; 0: a copy; smaller = closer to a copy). A volume whose ratio is below the "
            "threshold is flagged as a near-copy and, by default, left out of classifier training. "
            "**closest real pair**: the smallest such ratio between two different real cases, and how many "
            "real cases fall below the threshold (false alarms of the rule on real patients). Image distance: "
            "1 - NCC inside the shared brain; feature ratio: the fixed random ResNet-10 of "
            "`fd_rand_resnet10_3d`.", "",
            *_table(header, rows), ""]


def _markdown(title: str, created: str, context: Mapping[str, Any], sites: list[str], regimes: list[str],
              split: _Split) -> str:
    site_level, by_regime = split.site_level, split.by_regime
    lines = [f"# {title}", "", f"Written {created}.", ""]
    if context:
        lines += _context(context)
    ci_text = _ci_text(context)
    lines += [
        "## How to read this",
        "",
        "- **Test set**: each site's own held-out REAL cases, never seen in training and never "
        "synthetic. Sites are not pooled: every row is one site's classifier on one site's cases.",
        "- **Regimes** differ only in their training data, at the same budget: `real_only` (the K "
        "real few-shot cases), `real_aug` (the same with classic augmentation), `real_syn` (K real + "
        "synthetic), `syn_only` (synthetic only), `oracle` (a larger real pool of the site, where it "
        "has one).",
        *_comparison_howto(regimes),
        "- **Values** are means over training seeds (± the std over seeds when there are several).",
        f"- **CI**: {ci_text}two-stage bootstrap interval of the seed mean: test patients resampled with all "
        "their slices, and training seeds resampled, so seeds that disagree widen it.",
        "- **Small n**: with a few test patients per site the intervals are wide; with fewer than 10 a "
        "difference is marked too few to conclude. A difference between "
        "two regimes is judged by its own paired interval (both regimes resampled on the same test "
        "patients, in the comparison tables), not by whether two separate intervals overlap.",
        "- **-**: the regime was skipped at that site (e.g. no synthetic volumes, no larger real "
        "pool) or the number is not available.",
        "",
    ]
    wide = len(regimes) > len(REGIMES)  # baselines / shift rows: regimes down, sites across
    for metric, heading in _TABLES:
        table = (_metric_table_by_regime(metric, sites, regimes, site_level, by_regime) if wide
                 else _metric_table(metric, sites, regimes, site_level, by_regime))
        lines += [f"## {heading}", ""] + table + [""]
    lines += _comparison_section(sites, regimes, split, ci_text)
    lines += ["## Synthetic data effect: real_syn - real_only (AUC)", "",
              f"The paired difference with its {ci_text}interval (the same test patients and seeds resampled for "
              "both regimes); **evidence** only where the interval excludes 0 over at least 10 test patients.", ""]
    rows = []
    for site in sites:
        a, b = (by_regime[site].get(r, {}).get("auc_mean") for r in ("real_syn", "real_only"))
        rows.append([site, fmt(b), fmt(a), difference_cell(_differences(split, site), "real_syn", "real_only", a, b)])
    lines += _table(["site", "real_only AUC", "real_syn AUC", "difference [CI]"], rows) + [""]
    verdicts = difference_verdicts({s: _differences(split, s) for s in sites}, [("real_syn", "real_only")], ci_text)
    lines += [f"- {v}" for v in verdicts] + ([""] if verdicts else [])
    lines += ["## Training data", "", "Real / synthetic training cases per regime.", ""]
    rows = []
    for site in sites:
        row = [site]
        for r in regimes:
            v = by_regime[site].get(r)
            row.append("-" if v is None else f"{fmt(v.get('n_train_cases_real'))} / "
                                              f"{fmt(v.get('n_train_cases_syn'))}")
        rows.append(row)
    lines += _table(["site", *regimes], rows) + [""]
    lines += _faithfulness_section(split)
    lines += _quality_section(split)
    lines += _audit_section(split)
    lines += _site_work(split, _statuses(context))
    return "\n".join(lines)


def write_report(
    out_dir: str | os.PathLike[str],
    sites: Mapping[str, Mapping[str, float]],
    *,
    title: str,
    context: Mapping[str, Any],
    sources: ReportSources | None = None,
) -> dict[str, Path]:
    """Write `report.json`, `report.csv`, `report.md` and `report.html` into `out_dir` (each
    atomically).

    Args:
        out_dir: the folder (created if missing).
        sites: site -> flat metrics, as returned by `SiteEvaluation.metrics()` (or received from
            the sites): `<regime>.<name>` (`regimes.is_regime`), other dotted keys (site work:
            `adapt.<x>`, `synthesis.n_volumes`) and site-level `n_*` keys, numeric values.
        title: the report's heading.
        context: what the run was (e.g. `config_summary(cfg)` plus run-specific items such as
            rounds); shown as a list and tables in the Markdown and kept in the JSON. A
            `"sites"` mapping of site -> {..., "status"} adds the status to the Site work table,
            with a row for each listed site, metrics or not.
        sources: the run's files that report.html draws (predictions, montages, training logs,
            rounds); None = `report_html.discover_sources(out_dir, sites, context)`.

    Returns:
        {"json", "csv", "md", "html"} -> the written path.

    Raises:
        ValueError: no sites, or a value that is not a number (site and key named).
    """
    out = Path(out_dir)
    split = _split(sites)
    site_level, by_regime, work = split.site_level, split.by_regime, split.work
    names = sorted(site_level)
    regimes = order_regimes({r for s in names for r in by_regime[s]})
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}

    # report.json: everything (non-finite values left out, as JSON has no NaN).
    atomic_write_json(paths["json"], {
        "version": 1,
        "title": title,
        "created": created,
        "context": json.loads(json.dumps(dict(context), default=str)),
        "regimes": regimes,
        "sites": {s: {"site": site_level[s], "regimes": by_regime[s], "work": work[s],
                      **{key: section_numbers(work[s], prefix) for prefix, key in OWN_SECTIONS.items()},
                      "auc_diff_real_syn_minus_real_only": _auc_difference(by_regime, s)} for s in names},
    })

    # report.csv: one row per (site, regime that ran there); site-level and site-work numbers
    # repeated per row.
    metric_cols = _ordered({k for s in names for v in by_regime[s].values() for k in v},
                           [*_COUNTS, *(f"{m}_{x}" for m, _ in _TABLES for x in ("mean", "std", "ci_low", "ci_high"))])
    site_cols = _ordered({k for s in names for k in site_level[s]}, ["n_test_cases", "n_test_samples"])
    work_cols = _ordered({k for s in names for k in work[s]}, list(_WORK_COLUMNS))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["site", "regime", *metric_cols, *site_cols, *work_cols])
    for s in names:
        for r in regimes:
            if r in by_regime[s]:
                v = by_regime[s][r]
                writer.writerow([s, r, *(v.get(k, "") for k in metric_cols),
                                 *(site_level[s].get(k, "") for k in site_cols),
                                 *(work[s].get(k, "") for k in work_cols)])
    atomic_write_text(paths["csv"], buf.getvalue())

    atomic_write_text(paths["md"], _markdown(title, created, context, names, regimes, split))

    # report.html: rendered from report.json as written (so every section it holds is shown), plus
    # the figures of the run's files.
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    write_html_report(paths["html"], data, sources if sources is not None else discover_sources(out, names, context))
    return paths
