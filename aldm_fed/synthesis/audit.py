"""Memorisation audit of a synthesis run: is a synthetic volume a near-copy of a real training case?

A ControlNet fine-tuned on ~16 scans can memorise them, and a "synthetic" volume that is a near-copy
of a patient's scan defeats the purpose of keeping scans at the site. Every synthesis run is
therefore audited at the site (`synthesize_site` calls `audit_site` at its end; `evaluate_site`
reads the result back to leave flagged volumes out of classifier training):

```python
result = audit_site(cfg, "C")        # runs/<run>/sites/C/synthesis/audit.{json,csv}
result.flagged_ids                   # ["SYN-C-00003"]  (ids stay at the site)
result.summary()                     # {"audit.n_flagged": 1, "audit.ratio_median": 1.7, ...}: shareable
```

What is measured, per synthetic volume, against the site's REFERENCE cases (the real cases its
models were trained on: the K `target` cases and, where the site has them, its `source` cases;
`audit.reference`):

1. **Image distance** `d = 1 - NCC`: Pearson correlation of the intensities (per modality, then
   averaged) inside the voxels that are brain in BOTH volumes (same cached grid). Only the shared
   brain counts because a synthetic volume is zeroed outside its host's brain (it shares the host's
   outline by construction, not by memorisation); the correlation ignores intensity scale and
   offset, so a rescaled copy still counts as a copy. 0 = identical up to scale, 1 = uncorrelated.
2. **Feature distance**: Euclidean distance between the 128 global features of the fixed,
   randomly initialised MONAI ResNet-10 of the `fd_rand_resnet10_3d` metric
   (`aldm_fed.evaluation.metrics.FeatureNetSpec`; not trained, not Inception).
3. The **nearest** reference case in each space, and the **ratio** of that nearest distance to the
   TYPICAL distance between two different real cases: the median, over the reference cases, of each
   one's distance to its nearest OTHER reference case (leave-one-out). A synthetic volume as far from
   the training set as real patients are from each other has a ratio near 1; **smaller = closer to a
   copy**; 0 = an exact copy (up to intensity scale).

With `audit.mirror` (default on), every reference case is also compared in its left-right MIRRORED
form (`mirror_volume`: image and brain mask mirrored across the brain's mid-sagittal plane, along
voxel axis 0 of the RAS cache), because the mask augmentation mirrors tumour masks
(`aldm_fed.synthesis.masks`) and a model that memorised a patient may return that patient mirrored.
The nearest case is then the best over both forms in each space (`SampleAudit.nearest_mirrored`
says which form won), and the typical distance is taken over both forms of the OTHER cases, never
a case's own mirror (see `audit_volumes`).

A volume is **flagged as a near-copy when its ratio is BELOW `audit.threshold`** (default 0.5: closer
to a training case than half the typical distance between two different patients), in the image
space by default (`audit.flag_on`: image | features | either). The same ratio of each reference case
(its leave-one-out nearest distance over the typical one) shows how close genuinely different
patients come: the report gives its minimum and how many reference cases would be flagged at the
threshold (`audit.n_real_below`, the rule's false-alarm count on real patients).

Files, in the synthesis folder (written atomically, never sent anywhere):

```
audit.json   settings, reference cases and their nearest-neighbour distances, one entry per volume
             (nearest real case id, distances, ratios, flagged), the list of flagged ids, summary
audit.csv    one row per synthetic volume
```

The audit is recomputed only when its inputs change (the synthetic cases' records, the reference
cases and their preprocessing, the audit settings); otherwise `audit.json` is read back. Only
`AuditResult.summary()` (counts and ratio statistics under the fixed names `SUMMARY_NAMES`) may leave
a site, never an id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm_fed.io import atomic_write_json, atomic_write_text
from aldm_fed.models._cfg import as_plain_dict, check_keys, get_bool, get_float, get_int, get_str

__all__ = [
    "AUDIT_CSV",
    "AUDIT_JSON",
    "AUDIT_KEY_PATTERN",
    "FLAG_ON",
    "SUMMARY_NAMES",
    "AuditResult",
    "AuditSettings",
    "AuditVolume",
    "SampleAudit",
    "audit_site",
    "audit_synthesis",
    "audit_volumes",
    "feature_distances",
    "image_distances",
    "mirror_volume",
    "read_audit",
    "reference_cases",
]

log = logging.getLogger(__name__)

GROUP = "audit"
AUDIT_VERSION = 2  # 2: `mirror` setting, `nearest_mirrored` per sample
AUDIT_JSON = "audit.json"
AUDIT_CSV = "audit.csv"
FLAG_ON: tuple[str, ...] = ("image", "features", "either")
_SPLITS: tuple[str, ...] = ("target", "source")
_KEYS = ("enabled", "threshold", "reference", "max_shift", "mirror", "features", "flag_on", "exclude_flagged")
# The numbers a site may share (as `audit.<name>`): counts and ratio statistics, never an id.
SUMMARY_NAMES: tuple[str, ...] = (
    "n_audited", "n_flagged", "n_reference", "threshold",
    "ratio_min", "ratio_q25", "ratio_median", "ratio_q75", "ratio_max",
    "feature_ratio_min", "feature_ratio_median",
    "real_ratio_min", "n_real_below",
)
AUDIT_KEY_PATTERN = re.compile(rf"audit\.({'|'.join(SUMMARY_NAMES)})")
# Bytes of float64 reference data held at once by `image_distances` (the rest is streamed).
_CHUNK_BYTES = 256 * 2**20
# Reference cases per query searched over shifts (`image_distances`): the nearest on the same grid.
_SHIFT_CANDIDATES = 3
# The left-right voxel axis of the cached grid: the cache is RAS (`data.brats` reorients every scan
# with `nibabel.as_closest_canonical`; `data.preprocess` maps cube to source voxels by a positive
# diagonal, so no axis is swapped or reversed). `audit_synthesis` checks it on the cached affine.
_LR_AXIS = 0


# ============================================================================================
# Settings and results
# ============================================================================================


@dataclass(frozen=True)
class AuditSettings:
    """The `audit` config group, validated (configs/audit/default.yaml).

    Attributes:
        enabled: audit every synthesis run (and exclude flagged volumes when `exclude_flagged`).
        threshold: a volume is flagged when its nearest-distance ratio is BELOW this (smaller
            ratio = closer to a copy); > 0.
        reference: manifest splits of the site whose real cases the volumes are compared with
            (`target`, `source`); a split the site does not have is skipped.
        max_shift: the image distance is the best over integer shifts of up to this many voxels
            per axis (0 = the same grid only).
        mirror: also compare every reference case in its left-right mirrored form.
        features: also measure in the fixed random ResNet-10 feature space.
        flag_on: which ratio flags: image | features (needs `features`) | either.
        exclude_flagged: leave flagged volumes out of classifier training.
    """

    enabled: bool = True
    threshold: float = 0.5
    reference: tuple[str, ...] = _SPLITS
    max_shift: int = 1
    mirror: bool = True
    features: bool = True
    flag_on: str = "image"
    exclude_flagged: bool = True

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> AuditSettings:
        """Validate the `audit` group; every key must be present (the YAML holds the defaults).

        Args:
            cfg: mapping or DictConfig (e.g. `cfg.audit`), or settings (returned as they are).

        Raises:
            ValueError: unknown, missing or invalid keys, named as `audit.<key>`.
        """
        if isinstance(cfg, AuditSettings):
            return cfg
        c = as_plain_dict(cfg, GROUP)
        check_keys(c, GROUP, _KEYS)
        reference = c["reference"]
        if (isinstance(reference, str) or not isinstance(reference, Sequence) or not reference
                or any(r not in _SPLITS for r in reference) or len(set(reference)) != len(reference)):
            raise ValueError(f"{GROUP}.reference: expected a non-empty list of distinct splits from "
                             f"{list(_SPLITS)}, got {reference!r}")
        features = get_bool(c, "features", GROUP)
        flag_on = get_str(c, "flag_on", GROUP, FLAG_ON)
        if flag_on != "image" and not features:
            raise ValueError(f"{GROUP}.flag_on: {flag_on!r} needs {GROUP}.features=true")
        return cls(
            enabled=get_bool(c, "enabled", GROUP),
            threshold=get_float(c, "threshold", GROUP, minimum=0.0, inclusive_min=False),
            reference=tuple(str(r) for r in reference),
            max_shift=get_int(c, "max_shift", GROUP, minimum=0),
            mirror=get_bool(c, "mirror", GROUP),
            features=features,
            flag_on=flag_on,
            exclude_flagged=get_bool(c, "exclude_flagged", GROUP),
        )

    def identity(self) -> dict[str, Any]:
        """The settings that change the audit's numbers or flags (not `enabled`/`exclude_flagged`)."""
        return {"threshold": self.threshold, "reference": list(self.reference), "max_shift": self.max_shift,
                "mirror": self.mirror, "features": self.features, "flag_on": self.flag_on}


@dataclass(frozen=True)
class AuditVolume:
    """One volume entering the audit.

    Args:
        case_id: the real case id or synthetic id.
        image: (C, S, S, S) intensities, 0 outside the brain.
        brain: (S, S, S) brain mask; None = voxels above 0 in any channel.
    """

    case_id: str
    image: np.ndarray = field(repr=False)
    brain: np.ndarray | None = field(default=None, repr=False)

    def mask(self) -> np.ndarray:
        """The brain as a boolean (S, S, S) array."""
        if self.brain is not None:
            return np.asarray(self.brain) > 0
        return (np.asarray(self.image) > 0).any(axis=0)


@dataclass(frozen=True)
class SampleAudit:
    """The audit of one synthetic volume.

    Args:
        synth_id: its id.
        nearest_case: the nearest reference case in image space.
        distance: 1 - NCC to that case inside the shared brain.
        ratio: `distance` / the typical real-real nearest distance (smaller = closer to a copy).
        nearest_mirrored: the nearest form of `nearest_case` was its left-right mirror (`mirror`).
        feature_nearest_case: the nearest reference case in feature space (None: features off).
        feature_distance: Euclidean feature distance to it.
        feature_ratio: `feature_distance` / the typical real-real nearest feature distance.
        feature_nearest_mirrored: the same for `feature_nearest_case` (None: features off).
        flagged: a near-copy by `AuditSettings.flag_on` and `threshold`.
    """

    synth_id: str
    nearest_case: str
    distance: float
    ratio: float
    nearest_mirrored: bool
    feature_nearest_case: str | None
    feature_distance: float | None
    feature_ratio: float | None
    feature_nearest_mirrored: bool | None
    flagged: bool


@dataclass
class AuditResult:
    """What `audit_volumes` found (and `audit_synthesis` wrote to `audit.json`).

    Args:
        samples: one entry per synthetic volume, in the order given.
        reference_cases: the real cases compared with.
        real_nn_distance: each reference case's image distance to its nearest OTHER reference case
            (either form of it with `mirror`).
        typical_distance: the median of `real_nn_distance` (the ratios' denominator).
        feature_real_nn_distance: the same in feature space (None: features off).
        feature_typical_distance: its median (None: features off).
        settings: the audit settings.
        site: the site, when known.
        inputs_hash: hash of what the audit depends on (`audit_synthesis`).
        seconds: wall time of the computation (of the run that computed it, when read back).
        reused: read back from `audit.json` rather than computed by this call.
        path: the `audit.json` written or read.
    """

    samples: list[SampleAudit]
    reference_cases: list[str]
    real_nn_distance: list[float]
    typical_distance: float
    feature_real_nn_distance: list[float] | None
    feature_typical_distance: float | None
    settings: AuditSettings
    site: str | None = None
    inputs_hash: str | None = None
    seconds: float = 0.0
    reused: bool = False
    path: Path | None = None

    @property
    def flagged_ids(self) -> list[str]:
        """The synthetic ids flagged as near-copies, in sample order."""
        return [s.synth_id for s in self.samples if s.flagged]

    @property
    def real_ratios(self) -> np.ndarray:
        """Each reference case's leave-one-out nearest distance over the typical one."""
        return _ratio(np.asarray(self.real_nn_distance, dtype=np.float64), self.typical_distance)

    def summary(self) -> dict[str, float | int]:
        """The shareable numbers: `audit.<name>` for `SUMMARY_NAMES`, finite values only.

        Counts are ints; ratio statistics floats (quartiles of the image-space ratios over the
        synthetic volumes); no id, no path.
        """
        ratios = np.asarray([s.ratio for s in self.samples], dtype=np.float64)
        real = self.real_ratios
        out: dict[str, float | int] = {
            "n_audited": len(self.samples),
            "n_flagged": len(self.flagged_ids),
            "n_reference": len(self.reference_cases),
            "threshold": float(self.settings.threshold),
            "n_real_below": int((real < self.settings.threshold).sum()),
        }
        finite = ratios[np.isfinite(ratios)]
        if finite.size:
            q = np.quantile(finite, [0.0, 0.25, 0.5, 0.75, 1.0])
            out |= dict(zip(("ratio_min", "ratio_q25", "ratio_median", "ratio_q75", "ratio_max"),
                            (float(v) for v in q), strict=True))
        feats = np.asarray([s.feature_ratio for s in self.samples if s.feature_ratio is not None], dtype=np.float64)
        feats = feats[np.isfinite(feats)]
        if feats.size:
            out["feature_ratio_min"] = float(feats.min())
            out["feature_ratio_median"] = float(np.median(feats))
        if np.isfinite(real).any():
            out["real_ratio_min"] = float(real[np.isfinite(real)].min())
        return {f"{GROUP}.{k}": v for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content of `audit.json` (non-finite numbers as null)."""
        return _jsonable({
            "version": AUDIT_VERSION,
            "site": self.site,
            "inputs_hash": self.inputs_hash,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": self.seconds,
            "settings": asdict(self.settings),
            "how_to_read": (
                "ratio = distance to the nearest real reference case / median leave-one-out nearest "
                "distance between two different reference cases; smaller = closer to a copy, 0 = a copy. "
                f"flagged when the {self.settings.flag_on} ratio is below {self.settings.threshold}. "
                "distance = 1 - NCC inside the shared brain (image); Euclidean (features of the fixed "
                "random ResNet-10 of fd_rand_resnet10_3d). "
                + ("Each reference case also counts in its left-right mirrored form (nearest_mirrored: "
                   "that form was nearest); a case's own mirror never counts in its leave-one-out distance."
                   if self.settings.mirror else "Mirrored copies are not searched (mirror: false).")
            ),
            "summary": self.summary(),
            "reference": {
                "cases": list(self.reference_cases),
                "real_nn_distance": list(self.real_nn_distance),
                "typical_distance": self.typical_distance,
                "feature_real_nn_distance": self.feature_real_nn_distance,
                "feature_typical_distance": self.feature_typical_distance,
            },
            "flagged": self.flagged_ids,
            "samples": [asdict(s) for s in self.samples],
        })

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: Path | None = None) -> AuditResult:
        """Read back `to_dict()` (as stored in `audit.json`).

        Raises:
            ValueError: a document of another version or with missing fields.
        """
        try:
            if doc["version"] != AUDIT_VERSION:
                raise ValueError(f"version {doc['version']!r}, expected {AUDIT_VERSION}")
            ref = doc["reference"]
            settings = AuditSettings(**{**doc["settings"], "reference": tuple(doc["settings"]["reference"])})
            return cls(
                samples=[SampleAudit(**{k: (_nan(v) if k in ("distance", "ratio") else v) for k, v in s.items()})
                         for s in doc["samples"]],
                reference_cases=[str(c) for c in ref["cases"]],
                real_nn_distance=[_nan(v) for v in ref["real_nn_distance"]],
                typical_distance=_nan(ref["typical_distance"]),
                feature_real_nn_distance=ref["feature_real_nn_distance"],
                feature_typical_distance=ref["feature_typical_distance"],
                settings=settings,
                site=doc.get("site"),
                inputs_hash=doc.get("inputs_hash"),
                seconds=float(doc.get("seconds", 0.0)),
                reused=True,
                path=path,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path or 'audit document'}: not a readable memorisation audit ({exc})") from None


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _ratio(distances: np.ndarray, typical: float) -> np.ndarray:
    # typical == 0 (two identical reference cases): a positive distance is "far", 0 is a copy.
    if typical > 0:
        return distances / typical
    return np.where(distances > 0, np.inf, 0.0)


# ============================================================================================
# Distances
# ============================================================================================


def _flat(volume: AuditVolume, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, *grid) float64 image, zero outside the brain, and the (*grid) float64 brain mask."""
    image = np.asarray(volume.image, dtype=np.float64)
    if image.shape != shape:
        raise ValueError(f"{volume.case_id}: image shape {image.shape} differs from the other volumes {shape}; "
                         "the audit compares volumes on one grid")
    brain = torch.from_numpy(volume.mask().astype(np.float64))
    return torch.from_numpy(image) * brain, brain


def _shifts(max_shift: int) -> list[tuple[int, int, int]]:
    r = range(-max_shift, max_shift + 1)
    return [(a, b, c) for a in r for b in r for c in r]


def _shifted(image: torch.Tensor, brain: torch.Tensor, shift: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The volume moved by `shift` voxels; the slabs that wrap around leave the brain."""
    if not any(shift):
        return image, brain
    dims = (1, 2, 3)
    image = torch.roll(image, shift, dims)
    brain = torch.roll(brain, shift, (0, 1, 2)).clone()
    for axis, k in enumerate(shift):
        index = [slice(None)] * 3
        if k > 0:
            index[axis] = slice(0, k)
        elif k < 0:
            index[axis] = slice(k, None)
        else:
            continue
        brain[tuple(index)] = 0.0
    return image * brain, brain


def _ncc_distances(
    queries: Sequence[AuditVolume], reference: Sequence[AuditVolume], shifts: Sequence[tuple[int, int, int]],
    pairs: np.ndarray | None, bar: Any,
) -> np.ndarray:
    """min over `shifts` of 1 - NCC for every (query, reference) pair, or only where `pairs` is True
    (inf elsewhere). The reference is held in float64 chunks of `_CHUNK_BYTES`."""
    shape = tuple(np.asarray(reference[0].image).shape)
    channels = int(shape[0])
    chunk = max(1, _CHUNK_BYTES // (2 * int(np.prod(shape)) * 8))
    best = np.full((len(queries), len(reference)), np.inf)
    for start in range(0, len(reference), chunk):
        cols = np.arange(start, min(start + chunk, len(reference)))
        flat = [_flat(reference[j], shape) for j in cols]
        r_all = torch.stack([f[0].reshape(channels, -1) for f in flat])   # (n, C, V), 0 outside each brain
        rb_all = torch.stack([f[1].reshape(-1) for f in flat])            # (n, V)
        r2_all = r_all * r_all                                            # once per chunk, not per query
        for qi, q_vol in enumerate(queries):
            keep = np.ones(len(cols), bool) if pairs is None else pairs[qi, cols]
            if not keep.any():
                continue
            # Most pairs wanted (all but a case's own forms): compute the whole chunk and keep those,
            # cheaper than copying the chunk; a few (the shift search): copy just those.
            dense = 2 * int(keep.sum()) > len(cols)
            if dense:
                r, rb, r2 = r_all, rb_all, r2_all
            else:
                idx = torch.from_numpy(np.flatnonzero(keep))
                r, rb, r2 = r_all[idx], rb_all[idx], r2_all[idx]
            q0, qb0 = _flat(q_vol, shape)
            for shift in shifts:
                q, qb = _shifted(q0, qb0, shift)
                q, qb = q.reshape(channels, -1), qb.reshape(-1)           # q is 0 outside its brain
                n = rb @ qb                                              # shared brain voxels per pair
                sq, sqq = rb @ q.T, rb @ (q * q).T                       # (n, C) sums over the shared brain
                sr, srr = r @ qb, r2 @ qb
                sqr = torch.einsum("ncv,cv->nc", r, q)
                nn = n.clamp(min=1.0)[:, None]
                cov = sqr / nn - sq * sr / nn**2
                var_q = (sqq / nn - (sq / nn) ** 2).clamp(min=0.0)
                var_r = (srr / nn - (sr / nn) ** 2).clamp(min=0.0)
                denom = torch.sqrt(var_q * var_r)
                ok = (denom > 1e-12) & (n[:, None] >= 2)
                corr = torch.where(ok, cov / denom.clamp(min=1e-300), torch.zeros_like(cov)).clamp(-1.0, 1.0)
                dist = (1.0 - corr.mean(dim=1)).clamp(min=0.0).numpy()
                if dense:
                    dist = dist[keep]
                sel = cols[keep]
                best[qi, sel] = np.minimum(best[qi, sel], dist)
            bar.update(1)
    return best


def image_distances(
    queries: Sequence[AuditVolume], reference: Sequence[AuditVolume], *, max_shift: int = 0,
    exclude: np.ndarray | None = None, progress: bool = False, desc: str = "audit: image distances",
) -> np.ndarray:
    """`1 - NCC` of every query to every reference volume inside the voxels that are brain in both.

    NCC is Pearson's correlation per channel (a channel constant in the shared brain counts as 0),
    averaged over channels; the distance lies in [0, 2]: 0 = identical up to a positive scale and
    offset per channel, 1 = uncorrelated. With `max_shift` > 0, each query is also moved by every
    integer shift up to that many voxels per axis against its `_SHIFT_CANDIDATES` nearest reference
    cases on the same grid, keeping the smallest distance: a copy displaced by a voxel still reads
    as a copy, at a fraction of the cost of shifting against every case.

    Args:
        queries: the volumes to place (synthetic, or the reference itself for real-real distances).
        reference: the real cases; same channels and grid as the queries.
        max_shift: largest shift per axis, in voxels.
        exclude: bool (len(queries), len(reference)): pairs not computed (inf), e.g. a reference case
            against itself; they take no shift-search place.
        progress: a progress bar over the queries.
        desc: its label.

    Returns:
        float64 (len(queries), len(reference)).

    Raises:
        ValueError: volumes on different grids or with different channels (named).
    """
    from tqdm.auto import tqdm

    if not queries or not reference:
        return np.zeros((len(queries), len(reference)))
    keep: np.ndarray | None = None
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (len(queries), len(reference)):
            raise ValueError(f"image_distances: exclude has shape {exclude.shape}, expected "
                             f"{(len(queries), len(reference))} (queries, reference)")
        keep = ~exclude
    passes = 1 if max_shift == 0 else 2
    n_chunks = math.ceil(len(reference) / max(1, _CHUNK_BYTES // (2 * np.asarray(reference[0].image).size * 8)))
    with tqdm(total=passes * len(queries) * n_chunks, desc=desc, unit="vol", disable=not progress) as bar:
        d = _ncc_distances(queries, reference, [(0, 0, 0)], keep, bar)
        if max_shift > 0:
            k = min(_SHIFT_CANDIDATES, len(reference))
            pairs = np.zeros_like(d, dtype=bool)
            np.put_along_axis(pairs, np.argsort(d, axis=1)[:, :k], True, axis=1)
            if keep is not None:
                pairs &= keep
            shifted = [s for s in _shifts(max_shift) if any(s)]
            d = np.minimum(d, _ncc_distances(queries, reference, shifted, pairs, bar))
    return d


def feature_distances(
    queries: Sequence[AuditVolume], reference: Sequence[AuditVolume], *, batch_size: int = 4
) -> np.ndarray:
    """Euclidean distances between the fixed random ResNet-10 features of queries and reference.

    The network is the one of `fd_rand_resnet10_3d` (`aldm_fed.evaluation.metrics.FeatureNetSpec`,
    seed 0): untrained, so the space is reproducible but weaker than a trained one.

    Args:
        queries: volumes to place.
        reference: the real cases (same channels and grid).
        batch_size: volumes per forward pass.

    Returns:
        float64 (len(queries), len(reference)).
    """
    from sklearn.metrics import pairwise_distances

    if not queries or not reference:
        return np.zeros((len(queries), len(reference)))
    return pairwise_distances(_features(queries, batch_size), _features(reference, batch_size), metric="euclidean")


def _features(volumes: Sequence[AuditVolume], batch_size: int = 4) -> np.ndarray:
    """(n, 128) fixed random ResNet-10 features of `fd_rand_resnet10_3d` (seed 0)."""
    from aldm_fed.evaluation.metrics import FeatureNetSpec, extract_features

    spec = FeatureNetSpec(3, int(np.asarray(volumes[0].image).shape[0]), seed=0)
    parts = [extract_features(np.stack([np.asarray(v.image, dtype=np.float32)
                                        for v in volumes[i : i + batch_size]]), spec, batch_size=batch_size)
             for i in range(0, len(volumes), batch_size)]
    return torch.cat(parts).numpy()


def mirror_volume(volume: AuditVolume, axis: int = _LR_AXIS) -> AuditVolume:
    """The volume mirrored left-right across its brain's mid-sagittal plane (x -> lo + hi - x).

    The plane is the middle of the brain's extent along `axis`, as the mask augmentation mirrors a
    tumour (`aldm_fed.synthesis.masks`), so the mirrored brain keeps its place on the grid (on a
    cache cropped to the brain box, lo + hi = S - 1 and this is a plain flip of the grid). lo + hi
    is an integer, so voxel centres map onto voxel centres. An empty brain is flipped on the grid.

    Args:
        volume: the volume (its brain mask is mirrored with it).
        axis: the left-right spatial axis (0 in the RAS cache).

    Returns:
        An `AuditVolume` with id `<case_id>~mirrored` and an explicit brain mask.
    """
    image, brain = np.asarray(volume.image), volume.mask()
    other_axes = tuple(a for a in range(brain.ndim) if a != axis)
    extent = np.flatnonzero(brain.any(axis=other_axes))
    # flip: x -> S-1-x; the roll then moves the mirrored brain back onto [lo, hi] (nothing of the
    # brain wraps around; whatever image wraps lies outside the brain, which the distances ignore).
    shift = int(extent[0] + extent[-1] - (brain.shape[axis] - 1)) if extent.size else 0
    mirrored_image = np.roll(np.flip(image, axis=axis + 1), shift, axis=axis + 1)
    mirrored_brain = np.roll(np.flip(brain, axis=axis), shift, axis=axis)
    return AuditVolume(f"{volume.case_id}~mirrored", np.ascontiguousarray(mirrored_image),
                       np.ascontiguousarray(mirrored_brain.astype(np.uint8)))


def _own_forms(n: int, forms: int) -> np.ndarray:
    """bool (n, forms * n): True where a reference case meets one of its own forms (itself, its mirror)."""
    return np.tile(np.eye(n, dtype=bool), (1, forms))


def _loo_nearest(d: np.ndarray, forms: int = 1) -> np.ndarray:
    """Each reference case's distance to its nearest OTHER reference case, in any of its `forms`
    (`d` is (n, forms * n), form-major columns; the case's own forms are left out)."""
    return np.where(_own_forms(d.shape[0], forms), np.inf, d).min(axis=1)


def audit_volumes(
    synthetic: Sequence[AuditVolume],
    reference: Sequence[AuditVolume],
    settings: AuditSettings | Mapping[str, Any] | Any = None,
    *,
    site: str | None = None,
    lr_axis: int = _LR_AXIS,
    progress: bool = False,
) -> AuditResult:
    """Audit synthetic volumes against the real reference cases (no files; see `audit_synthesis`).

    Args:
        synthetic: the synthetic volumes (ids unique).
        reference: the real training cases (>= 2: the typical distance needs pairs), same grid.
        settings: the `audit` group or `AuditSettings`; None = the defaults.
        site: recorded in the result.
        lr_axis: the left-right spatial axis the mirror flips (`audit.mirror`; 0 in the RAS cache).
        progress: progress bars.

    Returns:
        An `AuditResult` (not written anywhere).

    Raises:
        ValueError: fewer than 2 reference cases, repeated ids, or volumes on different grids.
    """
    s = AuditSettings() if settings is None else AuditSettings.from_mapping(settings)
    t0 = time.perf_counter()
    ref_ids = [v.case_id for v in reference]
    if len(reference) < 2:
        raise ValueError(f"the memorisation audit needs >= 2 real reference cases to know how far apart "
                         f"different patients are; got {ref_ids} (set audit.enabled=false to skip it)")
    for what, ids in (("reference", ref_ids), ("synthetic", [v.case_id for v in synthetic])):
        if len(set(ids)) != len(ids):
            raise ValueError(f"audit: repeated {what} ids in {ids}")
    # 1. The candidate forms of the reference: column j of every distance matrix is case j % n, in
    # its original form (j < n) or mirrored (j >= n). The mirrors are made once and serve both spaces.
    n = len(reference)
    forms = [list(reference)] + ([[mirror_volume(v, lr_axis) for v in reference]] if s.mirror else [])
    candidates = [v for form in forms for v in form]
    # Leave-one-out over the OTHER cases in both forms, never a case's own mirror: a brain is nearly
    # symmetric, so its own mirror is almost itself and would shrink the typical distance (and
    # inflate every ratio). The own pairs are not computed at all (nor take a shift-search place).
    own = _own_forms(n, len(forms))
    # 2. Image space: synthetic -> reference forms, and reference -> the other cases' forms.
    d_ref = image_distances(reference, candidates, max_shift=s.max_shift, exclude=own, progress=progress,
                            desc="audit: real-real")
    d_syn = image_distances(synthetic, candidates, max_shift=s.max_shift, progress=progress,
                            desc="audit: synthetic-real")
    real_nn = _loo_nearest(d_ref, len(forms))
    typical = float(np.median(real_nn))
    # 3. Feature space (optional): each volume's features once (synthetic, then every candidate).
    f_real_nn: np.ndarray | None = None
    f_typical: float | None = None
    f_syn: np.ndarray | None = None
    if s.features:
        from sklearn.metrics import pairwise_distances

        vectors = _features([*synthetic, *candidates])
        f_cand = vectors[len(synthetic):]
        f_syn = (pairwise_distances(vectors[: len(synthetic)], f_cand, metric="euclidean") if synthetic
                 else np.zeros((0, len(candidates))))
        f_real_nn = _loo_nearest(pairwise_distances(f_cand[:n], f_cand, metric="euclidean"), len(forms))
        f_typical = float(np.median(f_real_nn))
    # 4. Nearest case (best over both forms), ratio and flag per synthetic volume.
    samples = []
    for i, vol in enumerate(synthetic):
        j = int(np.argmin(d_syn[i]))  # ties go to the original form (its columns come first)
        dist = float(d_syn[i, j])
        ratio = float(_ratio(np.asarray([dist]), typical)[0])
        f_case = f_dist = f_ratio = f_mirrored = None
        if f_syn is not None and f_typical is not None:
            k = int(np.argmin(f_syn[i]))
            f_case, f_dist, f_mirrored = ref_ids[k % n], float(f_syn[i, k]), k >= n
            f_ratio = float(_ratio(np.asarray([f_dist]), f_typical)[0])
        below_image = ratio < s.threshold
        below_features = f_ratio is not None and f_ratio < s.threshold
        flagged = {"image": below_image, "features": below_features, "either": below_image or below_features}[s.flag_on]
        samples.append(SampleAudit(
            synth_id=vol.case_id, nearest_case=ref_ids[j % n], distance=dist, ratio=ratio, nearest_mirrored=j >= n,
            feature_nearest_case=f_case, feature_distance=f_dist, feature_ratio=f_ratio,
            feature_nearest_mirrored=f_mirrored, flagged=bool(flagged)))
    return AuditResult(
        samples=samples,
        reference_cases=ref_ids,
        real_nn_distance=[float(x) for x in real_nn],
        typical_distance=typical,
        feature_real_nn_distance=None if f_real_nn is None else [float(x) for x in f_real_nn],
        feature_typical_distance=f_typical,
        settings=s,
        site=site,
        seconds=time.perf_counter() - t0,
    )


# ============================================================================================
# A synthesis folder
# ============================================================================================


def read_audit(out_dir: str | Path) -> AuditResult | None:
    """The `audit.json` of a synthesis folder, or None when there is none.

    Args:
        out_dir: the synthesis folder.

    Raises:
        ValueError: an unreadable `audit.json` (named).
    """
    path = Path(out_dir) / AUDIT_JSON
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); delete it and rerun `aldm-fed synthesize`") from None
    return AuditResult.from_dict(doc, path)


def _synthetic_samples(out_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(modalities, records) of a complete synthesis folder."""
    from aldm_fed.synthesis.writer import MANIFEST_NAME, read_record

    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{out_dir}: no readable {MANIFEST_NAME} ({exc}); run `aldm-fed synthesize` first") from None
    if not manifest.get("complete"):
        raise ValueError(f"{out_dir}: the synthesis run is not complete; rerun `aldm-fed synthesize` to finish it")
    modalities = [str(m) for m in manifest["model"]["modalities"]]
    records = []
    for sample in manifest["samples"]:
        sid = str(sample["synth_id"])
        record = read_record(out_dir / sid, sid, modalities)
        if record is None:
            raise ValueError(f"{out_dir / sid}: missing, incomplete or without a readable record.json")
        records.append(record)
    return modalities, records


def _load_synthetic(out_dir: Path, record: Mapping[str, Any], modalities: Sequence[str]) -> AuditVolume:
    import nibabel as nib

    folder = out_dir / str(record["synth_id"])
    files = record["files"]
    image = np.stack([np.asarray(nib.load(str(folder / files[m])).dataobj, dtype=np.float32) for m in modalities])
    return AuditVolume(str(record["synth_id"]), image)  # brain: its nonzero voxels (the host's brain)


def _inputs_hash(settings: AuditSettings, records: Sequence[Mapping[str, Any]], reference: Sequence[str],
                 prep_hash: str, modalities: Sequence[str]) -> str:
    # A synthetic case is identified by its record (settings hash, seed, mask transforms), as the
    # classifier's run identity does; a reference case by its id and the cache's preprocessing.
    doc = {
        "version": AUDIT_VERSION,
        "settings": settings.identity(),
        "synthetic": [[str(r["synth_id"]), hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()]
                      for r in records],
        "reference": list(reference),
        "prep_hash": prep_hash,
        "modalities": list(modalities),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _write_csv(path: Path, result: AuditResult) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = [f.name for f in SampleAudit.__dataclass_fields__.values()]
    writer.writerow(names)
    for s in result.samples:
        row = asdict(s)
        writer.writerow(["" if row[n] is None else (int(row[n]) if isinstance(row[n], bool) else row[n]) for n in names])
    atomic_write_text(path, buf.getvalue())


def audit_synthesis(
    out_dir: str | Path,
    cache: Any,
    reference_cases: Sequence[str],
    settings: AuditSettings | Mapping[str, Any] | Any = None,
    *,
    site: str | None = None,
    progress: bool = False,
) -> AuditResult:
    """Audit a complete synthesis folder against cached real cases; write `audit.json` + `audit.csv`.

    Resumable: when `audit.json` holds the same inputs hash (same synthetic records, reference
    cases, preprocessing and audit settings), it is read back instead of recomputed.

    Args:
        out_dir: the synthesis folder (`synthesis.json`, case folders).
        cache: the `CaseCache` holding the reference cases (their `brain.npy` masks are used).
        reference_cases: the real training cases to compare with (>= 2).
        settings: the `audit` group or `AuditSettings`; None = defaults.
        site: recorded in the result.
        progress: progress bars.

    Returns:
        The `AuditResult` (`reused` when read back).

    Raises:
        ValueError: an incomplete synthesis folder, a reference case missing from the cache,
            synthetic volumes on another grid than the cache, or fewer than 2 reference cases.
    """
    s = AuditSettings() if settings is None else AuditSettings.from_mapping(settings)
    out = Path(out_dir)
    modalities, records = _synthetic_samples(out)
    if list(modalities) != list(cache.modalities):
        raise ValueError(f"{out}: synthetic modalities {modalities} differ from the cache's "
                         f"{list(cache.modalities)} ({cache.root}); the audit compares like with like")
    reference = list(dict.fromkeys(str(c) for c in reference_cases))
    inputs_hash = _inputs_hash(s, records, reference, str(cache.prep_hash), modalities)
    try:
        previous = read_audit(out)
    except ValueError as exc:
        log.warning("%s; recomputing the audit", exc)
        previous = None
    if previous is not None and previous.inputs_hash == inputs_hash:
        return previous

    ref_volumes = []
    for case_id in reference:
        case = cache.load(case_id)
        ref_volumes.append(AuditVolume(case_id, case.image, case.brain))
        lr_axis = int(np.argmax(np.abs(np.asarray(case.affine, dtype=np.float64)[0, :3])))
        if s.mirror and lr_axis != _LR_AXIS:  # the cache is RAS by construction (see _LR_AXIS)
            raise ValueError(f"{cache.root}: case {case_id} has world x along voxel axis {lr_axis}, not "
                             f"{_LR_AXIS} (the cache is not RAS); the audit's mirror (audit.mirror) would "
                             "flip the wrong axis. Prepare the cache again")
    synthetic = [_load_synthetic(out, r, modalities) for r in records]
    if synthetic and ref_volumes and synthetic[0].image.shape != ref_volumes[0].image.shape:
        raise ValueError(f"{out}: synthetic volumes are {synthetic[0].image.shape}, the cached cases "
                         f"{ref_volumes[0].image.shape}; synthesize again with this data config")
    result = audit_volumes(synthetic, ref_volumes, s, site=site, progress=progress)
    result.inputs_hash = inputs_hash
    result.path = out / AUDIT_JSON
    atomic_write_json(result.path, result.to_dict())
    _write_csv(out / AUDIT_CSV, result)
    if result.flagged_ids:
        log.warning("memorisation audit%s: %d of %d synthetic volumes are near-copies of a real case (ratio < %s): "
                    "%s", f" at site {site}" if site else "", len(result.flagged_ids), len(result.samples),
                    s.threshold, ", ".join(result.flagged_ids))
    return result


def reference_cases(manifest: Any, settings: AuditSettings) -> list[str]:
    """The site's real cases of the `settings.reference` splits, in split then manifest order.

    Args:
        manifest: the site's `SiteManifest`.
        settings: the audit settings.
    """
    return list(dict.fromkeys(c for split in settings.reference for c in manifest.cases(split)))


def audit_site(cfg: Any, site: str | None = None, *, out: Path | None = None,
               progress: bool = True) -> AuditResult | None:
    """Audit a site's synthesis folder from a composed config (what `synthesize_site` and
    `evaluate_site` call); the reference cases are prepared into the cache if needed.

    Args:
        cfg: the composed config (reads `audit`, `paths`, `data`).
        site: the site; None = `cfg.site`.
        out: the synthesis folder; None = `cfg.paths.synthesis` of the site.
        progress: progress bars.

    Returns:
        The `AuditResult`, or None when `audit.enabled` is false.

    Raises:
        ValueError: no site, a bad `audit` group, an incomplete synthesis folder, or fewer than 2
            reference cases at the site.
    """
    from aldm_fed.data.cache import CaseCache
    from aldm_fed.data.volumes import load_split, site_manifests
    from aldm_fed.synthesis.site import site_config

    s = AuditSettings.from_mapping(cfg.audit)
    if not s.enabled:
        return None
    cfg, site_name = site_config(cfg, site, needed_for="its synthetic volumes are audited")
    path, manifest = site_manifests(str(cfg.paths.cohort), [site_name])[site_name]
    reference = reference_cases(manifest, s)
    if len(reference) < 2:
        raise ValueError(f"{path}: site {site_name} has {len(reference)} real case(s) in {list(s.reference)}; the "
                         "memorisation audit needs >= 2 (set audit.enabled=false to skip it)")
    for split in s.reference:
        if manifest.cases(split):
            load_split(cfg, split, sites=[site_name], progress=progress)
    folder = Path(out if out is not None else str(cfg.paths.synthesis))
    return audit_synthesis(folder, CaseCache(str(cfg.paths.cache)), reference, s, site=site_name, progress=progress)
