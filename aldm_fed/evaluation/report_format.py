"""What `report.md` (`aldm_fed.evaluation.report`) and `report.html`
(`aldm_fed.evaluation.report_html`) write alike: values as text, context rows, and the contents of
the sections both show (anatomical faithfulness, image quality, paired AUC differences). Each renderer only lays
these out as Markdown or HTML, so the two reports cannot drift apart.

A site's flat numbers hold these sections under fixed prefixes (`OWN_SECTIONS`): `audit.<name>`,
`faithfulness.<set>.<name>`, `quality.<set>.<name>` and `diff.<a>__<b>.<name>`
(`aldm_fed.evaluation.site`); `report.json` keeps each, prefix removed, as
`sites.<site>.{audit,faithfulness,quality,differences}`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aldm_fed.evaluation.metrics import FD_2D_NAME, FD_3D_NAME, MIN_PATIENTS, too_few_to_conclude
from aldm_fed.evaluation.regimes import SYNTHETIC_BASELINES, difference_name

__all__ = [
    "FAITHFULNESS_HOWTO",
    "OWN_SECTIONS",
    "QUALITY_HOWTO",
    "PairedDifference",
    "difference_cell",
    "difference_verdicts",
    "faithfulness_rows",
    "flat_row",
    "fmt",
    "inline",
    "interval_text",
    "metric_rows",
    "paired_difference",
    "quality_rows",
    "section_numbers",
    "seed_mean_text",
]

# Prefix of a site's numbers -> the report.json key of their section; none of them is a Site work column.
OWN_SECTIONS: dict[str, str] = {"audit.": "audit", "faithfulness.": "faithfulness", "quality.": "quality",
                                 "diff.": "differences"}
FAITHFULNESS_HOWTO = (
    "A tumour segmenter (MONAI 3D UNet, whole tumour) trained at each site on its K real target cases "
    "segments the site's held-out real test cases and every synthetic set; Dice is taken against the real "
    "masks and, for synthetic volumes, against the masks that conditioned them. A synthetic Dice close to the "
    "real Dice means the tumour appears where the mask says; a much lower one means the generator draws it "
    "elsewhere, blurred or not at all (gap = real - synthetic). The segmenter learns from only K cases, so "
    "absolute Dice is modest: compare the sets with each other and with the real row, not with published "
    "segmentation scores."
)
QUALITY_HOWTO = (
    "Each synthetic volume is placed in a real host case's brain, so it is compared with that host. "
    "SSIM to host (0-1): higher = closer to the host's anatomy. MMD (MONAI, unbiased linear-kernel "
    "estimate, may be slightly negative) and the Frechet distances FD 2D (axial slices) / FD 3D (volumes), "
    "in the features of fixed random ResNet-10s (not Inception: not comparable with published FID): lower "
    "= closer to the real distribution. MS-SSIM diversity is the mean MS-SSIM between pairs of volumes of "
    "a set: lower = more diverse; compare it with the real cases' row. MMD and FD depend on the number of "
    "volumes (FD is biased upwards at small n): compare them only between sets of equal n at the same site. "
    "A set whose hosts are unknown is compared with all real cases, without SSIM / MMD. Brain plausible: "
    "the fraction of the set's volumes whose brain outside the tumour has, per modality, a mean and a "
    "standard deviation within 0.05 of the range the site's real cases span (1 = every volume; a blotchy or "
    "uniformly grey brain fails however well its tumour is placed)."
)
_REAL = "real"


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ints as they are, floats to `digits` decimals; None or a
    non-finite float as "-", anything else as its text."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "-" if value is None else str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def inline(value: Any, nested: bool = False) -> str:
    """A context value on one line: floats to 4 significant digits, strings (paths) as given (a
    newline as a space), lists joined by ", ", mappings as `k=v`; inner containers in parentheses."""
    if isinstance(value, Mapping):
        text = ", ".join(f"{k}={inline(v, True)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = ", ".join(inline(v, True) for v in value)
    elif isinstance(value, float) and math.isfinite(value):
        return repr(float(f"{value:.4g}"))
    else:
        return str(value).replace("\n", " ")
    return f"({text})" if nested else text or "-"


def flat_row(item: Mapping[str, Any]) -> dict[str, str]:
    """One table row: nested mappings flattened one level (`metrics.loss`), the rest inline."""
    out: dict[str, str] = {}
    for key, value in item.items():
        if isinstance(value, Mapping):
            out |= {f"{key}.{k}": inline(v) for k, v in value.items()}
        else:
            out[str(key)] = inline(value)
    return out


def section_numbers(numbers_: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The numbers under `prefix` (a key of `OWN_SECTIONS`), prefix removed."""
    return {k.removeprefix(prefix): v for k, v in numbers_.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Metric tables
# ---------------------------------------------------------------------------------------------

def seed_mean_text(numbers_: Mapping[str, Any], metric: str) -> str:
    """A regime's seed mean of `metric`, with "± std" over seeds when there are several."""
    mean, std = numbers_.get(f"{metric}_mean"), numbers_.get(f"{metric}_std")
    text = fmt(mean)
    if mean is not None and std is not None and numbers_.get("n_seeds", 1) > 1:
        text += f" ± {std:.3f}"
    return text


def interval_text(numbers_: Mapping[str, Any], metric: str) -> str:
    """A regime's interval of `metric` as "[lo, hi]", "-" without one."""
    lo, hi = numbers_.get(f"{metric}_ci_low"), numbers_.get(f"{metric}_ci_high")
    return "-" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def metric_rows(metric: str, sites: Mapping[str, Mapping[str, Any]],
                regimes: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a sites x regimes table: the seed mean (± std), and a CI column for each
    regime that has an interval at some site.

    Args:
        metric: e.g. "auc".
        sites: site -> `{"site": site-level numbers, "regimes": regime -> numbers}` (report.json's shape).
        regimes: the columns, in order.
    """
    with_ci = [r for r in regimes if any(f"{metric}_ci_low" in s["regimes"].get(r, {}) for s in sites.values())]
    header = ["site", "n test"]
    for r in regimes:
        header += [r, f"{r} CI"] if r in with_ci else [r]
    rows = []
    for name, s in sites.items():
        row = [str(name), fmt(s["site"].get("n_test_cases"))]
        for r in regimes:
            v = s["regimes"].get(r, {})
            row += [seed_mean_text(v, metric), interval_text(v, metric)] if r in with_ci else [seed_mean_text(v, metric)]
        rows.append(row)
    return header, rows


# ---------------------------------------------------------------------------------------------
# Anatomical faithfulness
# ---------------------------------------------------------------------------------------------

def _set_label(name: str, n_train: Any) -> str:
    if name == _REAL:
        return f"real test cases (segmenter trained on K = {fmt(n_train)})"
    if name == "aldm":
        return "ALDM synthetic"
    return f"{name} baseline synthetic" if name in SYNTHETIC_BASELINES else f"{name} synthetic"


def faithfulness_rows(sites: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the faithfulness table: per site, the real test cases first, then the ALDM
    set and each baseline's, with Dice mean, n and the gap to the real Dice.

    Args:
        sites: site -> its faithfulness numbers, prefix removed (`real.dice_mean`, `aldm.n`,
            `gan.dice_gap`, `n_train`, ...); sites without any are left out.
    """
    rows = []
    for site, nums in sites.items():
        sets = {k.split(".", 1)[0] for k in nums if "." in k}
        order = [_REAL, "aldm", *SYNTHETIC_BASELINES]
        for name in [*(s for s in order if s in sets), *sorted(sets - set(order))]:
            rows.append([str(site), _set_label(name, nums.get("n_train")), fmt(nums.get(f"{name}.dice_mean")),
                         fmt(nums.get(f"{name}.n")),
                         "-" if name == _REAL else _signed(nums.get(f"{name}.dice_gap"))])
    return ["site", "set", "Dice mean", "n", "gap (real - set)"], rows


def _signed(value: Any) -> str:
    return "-" if value is None else f"{value:+.3f}"


# ---------------------------------------------------------------------------------------------
# Image quality
# ---------------------------------------------------------------------------------------------

_QUALITY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ssim", "SSIM to host"), ("mmd", "MMD"), ("ms_ssim_diversity", "MS-SSIM diversity"),
    (FD_2D_NAME, "FD 2D"), (FD_3D_NAME, "FD 3D"), ("plausible", "brain plausible"), ("n", "n"),
)


def quality_rows(sites: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the image-quality table: per site, the real cases' reference row first,
    then the ALDM set and each baseline's, with SSIM to host, MMD, MS-SSIM diversity, FD 2D, FD 3D,
    the fraction of volumes with a plausible brain, n.

    Args:
        sites: site -> its image-quality numbers, prefix removed (`aldm.ssim`, `real.n`, ...);
            sites without any are left out.
    """
    rows = []
    for site, nums in sites.items():
        sets = {k.split(".", 1)[0] for k in nums if "." in k}
        order = [_REAL, "aldm", *SYNTHETIC_BASELINES]
        for name in [*(s for s in order if s in sets), *sorted(sets - set(order))]:
            label = "real cases (reference)" if name == _REAL else _set_label(name, None)
            rows.append([str(site), label, *(fmt(nums.get(f"{name}.{k}")) for k, _ in _QUALITY_COLUMNS)])
    return ["site", "set", *(title for _, title in _QUALITY_COLUMNS)], rows


# ---------------------------------------------------------------------------------------------
# Paired AUC differences
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedDifference:
    """AUC(a) - AUC(b) at one site with its paired bootstrap interval (bounds None: no interval).

    Args:
        mean: seed-mean difference.
        ci_low: lower bound.
        ci_high: upper bound.
    """

    mean: float
    ci_low: float | None
    ci_high: float | None
    n_patients: int | None = None

    @property
    def too_few(self) -> bool:
        """Fewer test patients than `metrics.MIN_PATIENTS`: the interval supports no conclusion."""
        return too_few_to_conclude(self.n_patients)

    @property
    def evidence(self) -> bool:
        """The interval excludes 0, over enough test patients."""
        return (not self.too_few and self.ci_low is not None and self.ci_high is not None
                and (self.ci_low > 0 or self.ci_high < 0))


def paired_difference(differences: Mapping[str, Any], a: str, b: str) -> PairedDifference | None:
    """The paired difference a - b from a site's `differences` numbers (`<a>__<b>.auc_mean`, ...),
    or None when the site sent none for the pair."""
    name = difference_name(a, b)
    mean = differences.get(f"{name}.auc_mean")
    if mean is None:
        return None
    n = differences.get(f"{name}.n_patients")
    return PairedDifference(float(mean), differences.get(f"{name}.auc_ci_low"), differences.get(f"{name}.auc_ci_high"),
                            int(n) if n is not None else None)


def difference_cell(differences: Mapping[str, Any], a: str, b: str, mean_a: Any, mean_b: Any) -> str:
    """A table cell for a - b: the paired difference with its interval ("+0.052 [-0.010, +0.110]",
    followed by "evidence" when the interval excludes 0); without a paired difference, the difference
    of the seed means marked "(no paired CI)"; "-" when a regime is missing."""
    d = paired_difference(differences, a, b)
    if d is not None:
        if d.ci_low is None or d.ci_high is None:
            return f"{d.mean:+.3f} (no valid resample)"
        verdict = f" too few to conclude ({d.n_patients} test patients)" if d.too_few else (
            " evidence" if d.evidence else "")
        return f"{d.mean:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]{verdict}"
    if mean_a is None or mean_b is None:
        return "-"
    return f"{mean_a - mean_b:+.3f} (no paired CI)"


def difference_verdicts(sites: Mapping[str, Mapping[str, Any]], pairs: Sequence[tuple[str, str]],
                        ci_text: str) -> list[str]:
    """One sentence per site and pair whose paired interval excludes 0 (which regime wins, and by
    how much); one sentence saying so when none does; nothing when no site has paired differences.

    Args:
        sites: site -> its `differences` numbers (prefix removed).
        pairs: the (a, b) pairs shown.
        ci_text: the interval's coverage as text ("95% "), or "".
    """
    found = [(site, a, b, d) for site, diffs in sites.items() for a, b in pairs
             if (d := paired_difference(diffs, a, b)) is not None]
    if not found:
        return []
    lines = []
    few = {site: d.n_patients for site, _, _, d in found if d.too_few}
    for site, n in few.items():
        lines.append(f"Site {site}: {n} test patients, too few to conclude (fewer than {MIN_PATIENTS}).")
    for site, a, b, d in found:
        if d.evidence:
            win, lose = (a, b) if d.mean > 0 else (b, a)
            lines.append(f"Site {site}: {win} beats {lose} by {abs(d.mean):.3f} AUC "
                         f"({ci_text}CI of {a} - {b}: [{d.ci_low:+.3f}, {d.ci_high:+.3f}]).")
    if len(lines) == len(few):
        enough = f" over at least {MIN_PATIENTS} test patients" if few else ""
        lines.append(f"No paired {ci_text}interval{enough} excludes 0: at these test sizes, no regime of a pair is "
                     "shown to be better than the other.")
    return lines
