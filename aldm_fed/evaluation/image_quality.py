"""Image quality of a site's synthetic sets: how close each is to the real volumes it stands for.

What `evaluate_site` measures after the anatomical faithfulness, for the same sets (the ALDM set
"aldm" and each baseline's, after the memorisation audit's exclusions), with
`aldm_fed.evaluation.metrics.image_quality_metrics`:

```python
numbers = site_image_quality({it.group: it for it in real}, {"aldm": syn, "gan": gan})
numbers["quality.aldm.ssim"]        # mean SSIM of each volume to its host real case
numbers["quality.real.ms_ssim_diversity"]  # the real cases' own diversity, for comparison
```

A synthetic volume lives in its HOST case's space and anatomy (`items_from_synthesis`:
`source_groups` is (mask source, host), deduplicated, so the host is the last), so it is paired
with that host: SSIM and MMD compare each volume with its host, and the Frechet distances compare
the set with its hosts (a host that received several volumes counts once per volume). A set with a
volume whose host is not among the site's real cases is measured unpaired against all of them
(no SSIM / MMD). The real cases get one reference row: their own MS-SSIM diversity.

`plausible` is the fraction of a set's volumes whose brain, outside the tumour, has intensity
statistics inside the range the site's real cases span (`aldm_fed.evaluation.plausibility`; the
host's brain mask where the host is known, else the volume's non-zero voxels): a blotchy or grey
brain fails it however well the tumour is placed.

The numbers carry fixed names only (`quality.<set>.<metric>`, `quality.<set>.n`,
`metric_key_pattern`): never a case id, so a federated site may send them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aldm_fed.evaluation.metrics import (
    FD_2D_NAME,
    FD_3D_NAME,
    image_quality_metrics,
    ms_ssim_diversity,
    set_metric_pattern,
)
from aldm_fed.evaluation.plausibility import STAT_MARGIN, RealRange, brain_statistics
from aldm_fed.evaluation.tasks import CaseItem

__all__ = ["MIN_SIZE", "QUALITY_NUMBERS", "REAL", "REAL_NUMBERS", "host_of", "metric_key_pattern",
           "site_image_quality"]

PREFIX = "quality"
REAL = "real"  # the reference row: the site's real cases
# Per synthetic set: the metrics (`image_quality_metrics`; ssim / mmd only when paired) and its size.
QUALITY_NUMBERS: tuple[str, ...] = ("ssim", "mmd", "ms_ssim_diversity", FD_2D_NAME, FD_3D_NAME, "plausible", "n")
REAL_NUMBERS: tuple[str, ...] = ("ms_ssim_diversity", "n")
# MS-SSIM needs >= 16 voxels per side (`metrics.ms_ssim_settings`), SSIM's window 11.
MIN_SIZE = 16
# Tumour dilation of the plausibility check: the demo and paper VAEs' downsampling factor (a latent
# voxel touching the tumour covers 4^3 image voxels); `evaluate_site` passes the run's own.
DILATE = 4


def host_of(item: CaseItem) -> str | None:
    """The real case whose brain received a synthetic volume, or None when unknown.

    `items_from_synthesis` fills `source_groups` with (mask source, host) from the record's
    `source_case` and `host_case`, deduplicated in that order, so the host is the last.
    """
    return item.source_groups[-1] if item.source_groups else None


def _stack(items: Sequence[CaseItem]) -> np.ndarray:
    return np.stack([np.asarray(it.image, dtype=np.float32) for it in items])  # a new C-ordered array


def site_image_quality(
    real_items_by_case: Mapping[str, CaseItem],
    sets: Mapping[str, Sequence[CaseItem]],
    *,
    seed: int = 0,
    notes: list[str] | None = None,
    dilate: int = DILATE,
) -> dict[str, float | int]:
    """Image-quality numbers of each synthetic set against the site's real cases.

    Args:
        real_items_by_case: the site's real cases (e.g. its K target cases) by case id; the hosts
            of the synthetic volumes are looked up here.
        sets: set name ("aldm", a baseline) -> its synthetic volumes (after the audit's
            exclusions). Sets of fewer than 2 volumes are left out (no covariance, no pair).
        seed: seed of the random feature networks of the Frechet distances (0 for reported numbers).
        notes: if given, a remark per set left out or measured unpaired is appended (for the
            site's own report; they name no case).
        dilate: voxels around the tumour left out of the plausibility statistics (the VAE's
            downsampling factor).

    Returns:
        `quality.<set>.<metric>` (`QUALITY_NUMBERS`) per measured set and, with >= 2 real cases,
        `quality.real.ms_ssim_diversity` and `quality.real.n`; all finite. Empty when the volumes
        are smaller than `MIN_SIZE` per side.

    Raises:
        ValueError: volumes of a set and the real cases differ in shape.
    """
    notes = notes if notes is not None else []
    real = list(real_items_by_case.values())
    out: dict[str, float | int] = {}
    if not real:
        return out
    shape = tuple(np.shape(real[0].image))
    if min(shape[1:]) < MIN_SIZE:
        notes.append(f"image quality: volumes of {shape[1:]} are below {MIN_SIZE} voxels per side; not measured")
        return out
    real_stack = _stack(real)
    try:
        real_range: RealRange | None = RealRange.from_cases(
            ((np.asarray(it.image), it.brain_mask(), _seg(it)) for it in real), dilate)
    except ValueError:
        real_range = None
        notes.append("image quality: no real case has brain outside its tumour; brain plausibility not measured")
    if len(real) >= 2:
        out |= _named(REAL, {"ms_ssim_diversity": ms_ssim_diversity(real_stack)}, ("ms_ssim_diversity",), len(real))
    for name, items in sets.items():
        if len(items) < 2:
            notes.append(f"image quality: the {name} set has {len(items)} volume(s); at least 2 are needed")
            continue
        bad = [tuple(np.shape(it.image)) for it in items if tuple(np.shape(it.image)) != shape]
        if bad:
            raise ValueError(f"image quality: the {name} set has volumes of shape {bad[0]}, the real cases {shape}")
        hosts = [host_of(it) for it in items]
        paired = all(h in real_items_by_case for h in hosts)
        if not paired:
            notes.append(f"image quality: some {name} volumes have a host outside the site's real cases; "
                         "measured unpaired (no SSIM / MMD)")
        reference = _stack([real_items_by_case[h] for h in hosts]) if paired else real_stack
        values = image_quality_metrics(reference, _stack(items), paired=paired, seed=seed)
        if real_range is not None:  # each volume in its host's brain (unpaired: its own non-zero voxels)
            brains = [real_items_by_case[h].brain_mask() if paired else it.brain_mask()
                      for it, h in zip(items, hosts, strict=True)]
            values["plausible"] = float(np.mean([_plausible(it, b, real_range, dilate)
                                                 for it, b in zip(items, brains, strict=True)]))
        out |= _named(name, values, QUALITY_NUMBERS[:-1], len(items))
    return out


def _seg(item: CaseItem) -> np.ndarray:
    return np.zeros(np.shape(item.image)[1:], np.uint8) if item.seg is None else np.asarray(item.seg)


def _plausible(item: CaseItem, brain: np.ndarray, real: RealRange, dilate: int) -> bool:
    try:
        stats = brain_statistics(np.asarray(item.image), brain, _seg(item), dilate)
    except ValueError:  # no brain left outside the tumour: nothing plausible to show
        return False
    return not real.outside(stats, STAT_MARGIN)


def _named(name: str, values: Mapping[str, float], keep: Sequence[str], n: int) -> dict[str, float | int]:
    out: dict[str, float | int] = {f"{PREFIX}.{name}.{k}": float(values[k]) for k in keep
                                   if k in values and np.isfinite(values[k])}
    out[f"{PREFIX}.{name}.n"] = int(n)
    return out


def metric_key_pattern(set_names: Sequence[str]) -> str:
    """A regular expression (for `re.fullmatch`) accepting exactly the names `site_image_quality`
    gives for synthetic sets named `set_names`, and nothing else.

    Args:
        set_names: the synthetic sets' fixed names (e.g. ("aldm", "noadapt", "concat", "gan")).
    """
    return set_metric_pattern(PREFIX, rf"{REAL}\.({'|'.join(REAL_NUMBERS)})", set_names, QUALITY_NUMBERS)
