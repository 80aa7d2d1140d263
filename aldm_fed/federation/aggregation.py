"""How the server combines the sites' updates: the norm-outlier rule and the aggregators.

1. Outlier rule (`norm_outliers`): for each parameter group, the L2 norm of every valid update
   (the site's weights minus the global weights the server sent that round). An update whose norm
   in some group is more than `fed.robust.norm_factor` x the median of that group's norms in the
   round is rejected. The median is robust to one wild update only when at least 3 updates are
   compared (`MIN_UPDATES_FOR_NORM_CHECK`): with 2 the median is their mean, and a x100 update is
   then only ~2x "the median", so nothing can say which of the two is the outlier. With fewer than
   3 updates the rule therefore accepts both (the caller logs a warning when their norms differ by
   more than the factor); the checks that need no comparison (allow-list, keys, shapes, NaN/Inf,
   `sharing.check_reply`) still apply.
2. Aggregators (`aggregate_arrays`, `fed.aggregation`):
   - `fedavg`: weighted by `num-examples`, Flower's own `aggregate_arrayrecords`;
   - `median`: coordinate-wise median, unweighted (Yin et al. 2018, as Flower's `FedMedian`);
     with an even number of updates the mean of the two middle values (2 updates: their mean);
   - `trimmed_mean`: coordinate-wise mean after cutting floor(`trim_fraction` x n) values from each
     end, unweighted (Flower's `trim_mean`, as in `FedTrimmedAvg`); with n=3 and a fraction of at
     least 1/3 it equals the median, with a smaller fraction it trims nothing.

Flower 1.42 ships `FedMedian` and `FedTrimmedAvg` strategies for the Message API, but as whole
strategies (they would replace our `PhaseFedAvg` and they consume the replies' arrays); we reuse
their arithmetic (`np.median` over stacked updates, `fedtrimmedavg.trim_mean`) per tensor here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from aldm_fed.federation.records import group_of

__all__ = [
    "AGGREGATIONS",
    "MIN_UPDATES_FOR_NORM_CHECK",
    "RobustSettings",
    "aggregate_arrays",
    "norm_outliers",
    "trimmed_count",
    "update_norms",
]

log = logging.getLogger(__name__)

AGGREGATIONS: tuple[str, ...] = ("fedavg", "median", "trimmed_mean")
MIN_UPDATES_FOR_NORM_CHECK = 3


@dataclass(frozen=True)
class RobustSettings:
    """`fed.aggregation` and `fed.robust` of the config.

    Args:
        aggregation: one of `AGGREGATIONS`.
        norm_factor: reject an update whose norm exceeds this x the round's median norm (per
            group); None or 0 turns the rule off.
        trim_fraction: for `trimmed_mean`, the fraction cut from each end, in [0, 0.5).
    """

    aggregation: str = "fedavg"
    norm_factor: float | None = 5.0
    trim_fraction: float = 0.34

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"fed.aggregation={self.aggregation!r}: expected one of {AGGREGATIONS}")
        if self.norm_factor is not None and (not math.isfinite(self.norm_factor) or
                                             (self.norm_factor != 0 and self.norm_factor <= 1)):
            raise ValueError(f"fed.robust.norm_factor={self.norm_factor!r}: expected a number above 1 "
                             f"(or null / 0 to turn the norm check off)")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"fed.robust.trim_fraction={self.trim_fraction!r}: expected a value in [0, 0.5)")

    @classmethod
    def from_cfg(cls, fed: Any) -> RobustSettings:
        """Read `fed.aggregation` and `fed.robust.{norm_factor,trim_fraction}` (absent: defaults).

        Args:
            fed: the `fed` config node (a DictConfig or a mapping).
        """
        robust = fed.get("robust") or {}
        default = cls()
        factor = robust.get("norm_factor", default.norm_factor)
        return cls(
            aggregation=str(fed.get("aggregation") or default.aggregation),
            norm_factor=None if factor is None else float(factor),
            trim_fraction=float(robust.get("trim_fraction", default.trim_fraction)),
        )

    @property
    def norm_check(self) -> bool:
        return bool(self.norm_factor)


def update_norms(arrays: ArrayRecord, reference: ArrayRecord) -> dict[str, float]:
    """L2 norm of (arrays - reference) per parameter group, over the floating tensors.

    Args:
        arrays: a site's weights (keys "<group>.<name>", already checked against `reference`).
        reference: the global weights the server sent that round.
    """
    squares: dict[str, float] = {}
    for key, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind != "f":
            continue  # integer buffers (step counters) are no direction of an update
        diff = values.astype(np.float64) - reference[key].numpy().astype(np.float64)
        group = group_of(key)
        squares[group] = squares.get(group, 0.0) + float(np.dot(diff.ravel(), diff.ravel()))
    return {group: math.sqrt(s) for group, s in squares.items()}


def norm_outliers(norms: Mapping[str, Mapping[str, float]], factor: float) -> dict[str, str]:
    """The updates whose norm in some group exceeds `factor` x that group's median norm.

    Args:
        norms: site -> group -> update norm (`update_norms`), the round's valid updates.
        factor: the rule's factor (`fed.robust.norm_factor`).

    Returns:
        site -> why it is an outlier; empty with fewer than `MIN_UPDATES_FOR_NORM_CHECK` updates
        (see the module docstring).
    """
    if len(norms) < MIN_UPDATES_FOR_NORM_CHECK:
        return {}
    groups = sorted({g for per_site in norms.values() for g in per_site})
    out: dict[str, str] = {}
    for group in groups:
        values = {site: per_site[group] for site, per_site in norms.items() if group in per_site}
        median = float(np.median(list(values.values())))
        for site, norm in sorted(values.items()):
            if norm > factor * median and site not in out:
                out[site] = (f"update norm {norm:.4g} of group {group!r} is more than fed.robust.norm_factor="
                             f"{factor:g} x the round's median {median:.4g} (over {len(values)} updates)")
    return out


def trimmed_count(n: int, trim_fraction: float) -> int:
    """How many updates `trimmed_mean` cuts from each end of n (Flower's `trim_mean` rule)."""
    return int(trim_fraction * n)


def aggregate_arrays(
    contents: Sequence[RecordDict],
    method: str,
    *,
    weighted_by_key: str = "num-examples",
    trim_fraction: float = 0.34,
    arrays_key: str = "arrays",
) -> ArrayRecord:
    """Combine the sites' weights into the new global weights.

    Args:
        contents: the valid replies' contents (each an ArrayRecord `arrays_key` with the same keys
            and shapes, and a MetricRecord holding `weighted_by_key`).
        method: one of `AGGREGATIONS` (see the module docstring).
        weighted_by_key: the metric FedAvg weights by.
        trim_fraction: for `trimmed_mean`.
        arrays_key: the name of the ArrayRecord in each content.

    Raises:
        ValueError: unknown method, no contents, or a trim fraction outside [0, 0.5).
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"fed.aggregation={method!r}: expected one of {AGGREGATIONS}")
    if not contents:
        raise ValueError("nothing to aggregate: no valid update")
    if method == "fedavg":
        return aggregate_arrayrecords(list(contents), weighted_by_key)
    records = [content[arrays_key] for content in contents]
    out = ArrayRecord()
    for key in records[0]:
        stacked = np.stack([record[key].numpy() for record in records])
        if method == "median":
            value = np.median(stacked, axis=0)
        else:
            value = trim_mean(stacked, trim_fraction)
        out[key] = Array(np.asarray(value))
    return out
