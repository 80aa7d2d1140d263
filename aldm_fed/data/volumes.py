"""Cached volumes of a manifest split, ready for training (memory-mapped, never copied whole).

The training stages never read NIfTI files: they ask for a split of some sites and get a
`VolumeSet` of memory-mapped cache arrays. Cases the cache lacks (or holds with other
preprocessing settings) are prepared first, from the folder the site's manifest points at:

```python
source = load_split(cfg, "source")             # every source site (cfg.source_sites or all)
target = load_split(cfg, "target", sites=["C"])
x = source.images_batch([0, 1])                # (2, C, S, S, S) float32 tensor
labels = source.segs_batch([0, 1])             # (2, S, S, S) uint8 tensor
```

Manifests live in `COHORT/manifests/<site>.json` (docs/contracts.md); the cache is `cfg.paths.cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm_fed.data.brats import DataConfig
from aldm_fed.data.cache import CaseCache
from aldm_fed.data.manifest import SPLITS, ManifestError, SiteManifest, read_manifest

__all__ = [
    "VolumeSet",
    "load_split",
    "load_volumes",
    "site_manifests",
    "source_sites",
    "split_cases",
]

log = logging.getLogger(__name__)

MANIFEST_DIR = "manifests"


@dataclass
class VolumeSet:
    """Cached volumes of some cases, in a fixed order (the order batches index into).

    Args:
        case_ids: the cases, in order.
        images: per case, float32 (C, S, S, S) in [0, 1] (read-only memory maps).
        segs: per case, uint8 (S, S, S) canonical labels 0..3.
        sites: per case, the site it belongs to ("" when unknown).
        modalities: channel names, in order.
        size: S.
        prep_hash: the preprocessing hash of the cache the arrays come from.
    """

    case_ids: list[str]
    images: list[np.ndarray]
    segs: list[np.ndarray]
    sites: list[str] = field(default_factory=list)
    modalities: tuple[str, ...] = ()
    size: int = 0
    prep_hash: str = ""

    def __post_init__(self) -> None:
        if not self.sites:
            self.sites = [""] * len(self.case_ids)
        n = len(self.case_ids)
        if not (len(self.images) == len(self.segs) == len(self.sites) == n):
            raise ValueError(
                f"VolumeSet: {n} case ids but {len(self.images)} images, {len(self.segs)} masks, "
                f"{len(self.sites)} sites"
            )

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def channels(self) -> int:
        """Image channels (= number of modalities)."""
        return len(self.modalities) if self.modalities else int(self.images[0].shape[0])

    def images_batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, C, S, S, S) float32 images of the cases at `indices`.

        Args:
            indices: positions in this set (e.g. from `batch_indices`).
            device: where the tensor goes.
        """
        batch = np.stack([np.asarray(self.images[i], dtype=np.float32) for i in indices])
        return torch.from_numpy(batch).to(device)

    def segs_batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, S, S, S) uint8 label maps of the cases at `indices`.

        Args:
            indices: positions in this set.
            device: where the tensor goes.
        """
        batch = np.stack([np.asarray(self.segs[i], dtype=np.uint8) for i in indices])
        return torch.from_numpy(batch).to(device)

    def subset(self, indices: Sequence[int]) -> VolumeSet:
        """The cases at `indices`, in that order (arrays are shared, not copied).

        Args:
            indices: positions in this set.
        """
        idx = list(indices)
        return VolumeSet(
            case_ids=[self.case_ids[i] for i in idx],
            images=[self.images[i] for i in idx],
            segs=[self.segs[i] for i in idx],
            sites=[self.sites[i] for i in idx],
            modalities=self.modalities,
            size=self.size,
            prep_hash=self.prep_hash,
        )

    def identity(self) -> dict[str, Any]:
        """What makes this set this set (case ids in order, preprocessing hash, modalities):
        recorded in checkpoints and hashed into a training run's identity."""
        digest = hashlib.sha256(json.dumps(self.case_ids).encode()).hexdigest()[:16]
        return {
            "n_cases": len(self),
            "case_ids_sha256": digest,
            "prep_hash": self.prep_hash,
            "modalities": list(self.modalities),
            "size": self.size,
        }


# ------------------------------------------------------------------------------- manifests


def site_manifests(
    cohort: str | os.PathLike[str], sites: Iterable[str] | None = None
) -> dict[str, tuple[Path, SiteManifest]]:
    """Read the site manifests of a cohort.

    Args:
        cohort: the cohort folder (holds `manifests/<site>.json`).
        sites: these sites only (each must have a manifest); None = every manifest found.

    Returns:
        site -> (manifest path, manifest), sorted by site unless `sites` gives an order.

    Raises:
        FileNotFoundError: no manifests folder, or a named site has no manifest.
    """
    folder = Path(cohort) / MANIFEST_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no manifests folder; set paths.cohort to a cohort made by `aldm-fed data "
            f"phantom --out DIR` or with `aldm-fed data manifest` per site"
        )
    found = {p.stem: p for p in sorted(folder.glob("*.json"))}
    if sites is None:
        names = sorted(found)
    else:
        names = list(dict.fromkeys(sites))
        missing = [s for s in names if s not in found]
        if missing:
            raise FileNotFoundError(
                f"no manifest for site(s) {missing} in {folder} (sites there: {sorted(found)})"
            )
    return {name: (found[name], read_manifest(found[name])) for name in names}


def split_cases(
    cohort: str | os.PathLike[str], split: str, sites: Iterable[str] | None = None
) -> dict[str, str]:
    """Case ids of one split across sites, in site then manifest order.

    Args:
        cohort: the cohort folder.
        split: `source`, `target` or `test`.
        sites: sites to include; None = every site with a manifest.

    Returns:
        case id -> site.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    out: dict[str, str] = {}
    for site, (_, manifest) in site_manifests(cohort, sites).items():
        for case_id in manifest.cases(split):
            out[case_id] = site
    return out


def source_sites(cfg: Any) -> list[str]:
    """The sites whose `source` cases train the shared models: `cfg.source_sites`, or (null)
    every site whose manifest lists source cases.

    Args:
        cfg: the composed config (reads `source_sites`, `paths.cohort`).
    """
    value = cfg.get("source_sites") if hasattr(cfg, "get") else None
    if value is not None:
        return [value] if isinstance(value, str) else [str(s) for s in value]
    manifests = site_manifests(Path(str(cfg.paths.cohort)))
    return [site for site, (_, m) in manifests.items() if m.cases("source")]


# ----------------------------------------------------------------------------------- loading


def load_split(
    cfg: Any,
    split: str,
    *,
    sites: Iterable[str] | None = None,
    max_cases: int | None = None,
    progress: bool = True,
) -> VolumeSet:
    """The cached volumes of `split` at `sites`, preparing missing cases first.

    Args:
        cfg: the composed config (reads `paths.cohort`, `paths.cache`, `data`, and
            `source_sites` when `sites` is None).
        split: `source`, `target` or `test`.
        sites: sites to include; None = the source sites (`source_sites`).
        max_cases: keep at most this many cases, evenly spaced over the list (so every site is
            represented); None = all. Only the kept cases are prepared.
        progress: show the preparation progress bar.

    Raises:
        FileNotFoundError: no manifests.
        ValueError: the split is empty at those sites, or a case fails preparation.
    """
    cohort = Path(str(cfg.paths.cohort))
    chosen = list(sites) if sites is not None else source_sites(cfg)
    manifests = site_manifests(cohort, chosen)
    roots: dict[str, Path] = {}
    case_sites: dict[str, str] = {}
    for site, (path, manifest) in manifests.items():
        root = manifest.resolve_root(path)
        for case_id in manifest.cases(split):
            if case_id in roots:
                raise ManifestError(f"{path}: split {split!r} lists case {case_id!r}, which the manifest of site "
                                    f"{case_sites[case_id]!r} lists too (case ids must be unique across sites)")
            roots[case_id] = root
            case_sites[case_id] = site
    if not roots:
        raise ValueError(
            f"no {split!r} cases at site(s) {sorted(manifests)} (manifests in {cohort / MANIFEST_DIR})"
        )
    _check_listed_cases(manifests, split, cfg.data)
    if max_cases is not None and len(roots) > max_cases:
        ids = list(roots)
        keep = {ids[int(i)] for i in np.linspace(0, len(ids) - 1, max_cases).round()} if max_cases else set()
        roots = {cid: r for cid, r in roots.items() if cid in keep}
        if not roots:
            raise ValueError(f"max_cases={max_cases}: no {split!r} cases kept")
    return load_volumes(
        Path(str(cfg.paths.cache)), roots, cfg.data, sites=case_sites, progress=progress
    )


def _check_listed_cases(manifests: Mapping[str, tuple[Path, SiteManifest]], split: str, data_cfg: Any) -> None:
    """Every case a manifest lists in `split` has a folder below the manifest's data_root.

    Why here: a typo in a hand-edited manifest should name the manifest, not surface later as a
    case that "could not be prepared".

    Raises:
        ManifestError: naming the manifest file, its field and the missing case ids.
    """
    from aldm_fed.data.brats import DataError, find_cases

    scheme = str(DataConfig.from_cfg(data_cfg).scheme)
    for path, manifest in manifests.values():
        listed = manifest.cases(split)
        if not listed:
            continue
        root = manifest.resolve_root(path)
        try:
            found = {c.case_id for c in find_cases(root, scheme)}
        except DataError:
            raise ManifestError(f"{path}: field 'data_root' {manifest.data_root!r} -> {root} is not a folder") from None
        missing = [c for c in listed if c not in found]
        if missing:
            raise ManifestError(f"{path}: split {split!r} lists {len(missing)} case(s) with no case folder below "
                                f"data_root {root}: {missing[:5]}")


def load_volumes(
    cache_root: str | os.PathLike[str],
    case_roots: Mapping[str, str | os.PathLike[str]],
    data_cfg: Any,
    *,
    sites: Mapping[str, str] | None = None,
    progress: bool = True,
) -> VolumeSet:
    """Memory-map cached cases, preparing those the cache lacks from their data roots.

    Args:
        cache_root: the preprocessed cache (created if needed).
        case_roots: case id -> folder below which its case folder lives (in the wanted order).
        data_cfg: the `data` config; a cache written with other settings is re-prepared.
        sites: case id -> site name, recorded in the set.
        progress: show the preparation progress bar.

    Raises:
        ValueError: a case cannot be prepared (its problems are listed).
    """
    from aldm_fed.data.preprocess import prepare_dataset

    cache_root = Path(cache_root)
    data = DataConfig.from_cfg(data_cfg)

    # 1. Prepare what the cache lacks, one data root at a time (prepare_dataset scans a root).
    # Cases cached from these very files with these settings are skipped there (a stat and a
    # header read each), so a case of the same id from another cohort is never reused.
    by_root: dict[Path, list[str]] = {}
    for case_id, root in case_roots.items():
        by_root.setdefault(Path(root), []).append(case_id)
    for root, ids in by_root.items():
        summary = prepare_dataset(root, cache_root, data, case_ids=ids, progress=progress)
        failed = {cid: probs for cid, probs in summary.failed.items() if cid in ids}
        if failed:
            lines = [f"{cid}: " + "; ".join(str(getattr(p, "message", p)) for p in probs)
                     for cid, probs in failed.items()]
            raise ValueError(f"{len(failed)} case(s) could not be prepared into {cache_root}:\n  "
                             + "\n  ".join(lines))

    # 2. Map every case (headers only).
    cache = CaseCache(cache_root)
    ids = list(case_roots)
    loaded = [cache.load(case_id, mmap=True) for case_id in ids]
    return VolumeSet(
        case_ids=ids,
        images=[c.image for c in loaded],
        segs=[c.seg for c in loaded],
        sites=[(sites or {}).get(case_id, "") for case_id in ids],
        modalities=cache.modalities,
        size=cache.size,
        prep_hash=cache.prep_hash,
    )
