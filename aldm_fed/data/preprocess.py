"""Preprocess BraTS-style cases into the training cache (ALDM preprocessing, configurable).

Per case, in order (settings from the `data` config group, configs/data/default.yaml):

1. Brain mask: voxels where any modality is > 0, or the brain mask the release ships (UCSF-PDGM).
2. Intensity: per modality, clip at the `clip` percentiles of the brain voxels and scale to [0, 1];
   0 outside the brain.
3. Geometry, in one interpolation per channel: resample to `spacing` mm (null: native voxels),
   crop (`brain` bounding box, `tumour` box + `margin` voxels, or `none`), then fit into a cube
   of `size`^3 voxels: `resize` scales the crop to fit (aspect kept) and zero-pads, `pad` keeps
   the resolution and zero-pads or centre-crops (ALDM: tumour crop, 1 mm, pad to 112^3).
   Images use linear interpolation (Gaussian anti-aliasing when downsampling), masks an
   area-weighted vote (`_resample_labels`).

The geometry is one diagonal voxel map `source_voxel = D * cube_voxel + t`, so the cached affine is
`source_affine @ [[D, t], [0, 1]]`: a cached volume saved with it lines up with the source scans.

`prepare_dataset` runs this for every case below a root and writes the cache of
docs/contracts.md, resuming by `prep_hash` and listing (not raising on) cases that fail checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from aldm_fed.data.brats import DataConfig, DataError, LoadedCase, find_cases
from aldm_fed.data.cache import META_NAME, load_cached_case, read_meta, write_cached_case, write_index
from aldm_fed.data.validate import Problem, check_case

__all__ = ["PREP_VERSION", "PrepareSummary", "PreparedCase", "prep_hash", "prepare_dataset", "preprocess_case"]

PREP_VERSION = 1  # bump when the algorithm changes what the cache holds


@dataclass
class PreparedCase:
    """One preprocessed case, as the cache stores it.

    Args:
        case_id: the case.
        image: float32 (C, S, S, S) in [0, 1], 0 outside the brain.
        seg: uint8 (S, S, S) canonical labels 0..3.
        brain: uint8 (S, S, S), 1 inside the brain.
        affine: 4x4 cube voxel -> RAS world (mm) of the source scans.
        meta: everything else worth keeping (crop box, intensity clip values, source files, ...).
    """

    case_id: str
    image: np.ndarray
    seg: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def prep_hash(data_cfg: object = None) -> str:
    """Short hash of every setting that changes the cache content (and of PREP_VERSION)."""
    cfg = DataConfig.from_cfg(data_cfg)
    blob = json.dumps({"version": PREP_VERSION, **cfg.prep_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive voxel bounding box (lo, hi) of a non-empty 3D mask."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)


def _clip_bounds(image: np.ndarray, brain: np.ndarray, clip: tuple[float, float]) -> list[tuple[float, float]]:
    """Per channel, the intensities at the `clip` percentiles of the brain voxels."""
    out = []
    for c in range(image.shape[0]):
        lo, hi = (float(v) for v in np.percentile(image[c][brain], clip))
        out.append((lo, hi))
    return out


def _scale(ch: np.ndarray, brain: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi], scale to [0, 1], 0 outside the brain (a new float32 array)."""
    out = np.empty(ch.shape, dtype=np.float32)
    if hi <= lo:
        out.fill(0.0)
        return out
    np.subtract(ch, np.float32(lo), out=out)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    out *= brain
    return out


def _geometry(cfg: DataConfig, loaded: LoadedCase, brain: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The diagonal map source voxel = D * u + t, the cube voxels inside the crop box, and meta."""
    shape = np.array(brain.shape, dtype=np.float64)
    native = np.array(loaded.spacing, dtype=np.float64)
    # r: source voxels per resampled voxel; snap float32 header noise so 1 mm stays an exact copy.
    r = np.ones(3) if cfg.spacing is None else np.array(cfg.spacing) / native
    r = np.where(np.abs(r - 1.0) < 1e-4, 1.0, r)

    if cfg.crop == "brain":
        lo_n, hi_n = _bbox(brain)
        margin = 0.0
    elif cfg.crop == "tumour":
        if loaded.seg is None or not loaded.seg.any():
            raise DataError(loaded.files.get("seg"), "crop 'tumour' needs a non-empty tumour mask", code="empty-mask",
                            case_id=loaded.case_id)
        lo_n, hi_n = _bbox(loaded.seg > 0)
        margin = float(cfg.margin)
    else:
        lo_n, hi_n = np.zeros(3), shape - 1
        margin = 0.0
    # Box in the resampled grid R (R voxel q <-> source voxel r*q), inclusive voxel centres.
    lo_r, hi_r = lo_n / r - margin, hi_n / r + margin
    size = cfg.size
    if cfg.fit == "resize":
        extent = hi_r - lo_r + 1.0
        a = np.full(3, float(extent.max()) / size)  # R voxels per cube voxel, same on every axis
        centre = (lo_r + hi_r) / 2.0
        b = centre - a * (size - 1) / 2.0
        edge_lo, edge_hi = lo_r - 0.5, hi_r + 0.5
    else:
        lo_i, hi_i = np.floor(lo_r + 1e-6), np.ceil(hi_r - 1e-6)
        extent = hi_i - lo_i + 1.0
        a = np.ones(3)
        b = lo_i + np.floor((extent - size) / 2.0)
        edge_lo, edge_hi = lo_i - 0.5, hi_i + 0.5
    # Cube voxels whose centre falls outside the crop box are zero (crop, then pad).
    u = np.arange(size, dtype=np.float64)
    inside = [((a[i] * u + b[i]) >= edge_lo[i]) & ((a[i] * u + b[i]) <= edge_hi[i]) for i in range(3)]
    D, t = r * a, r * b
    meta = {
        "crop": cfg.crop,
        "fit": cfg.fit,
        "crop_box": {"lo": (lo_r * r).tolist(), "hi": (hi_r * r).tolist(), "space": "source RAS voxel"},
        "voxel_map": {"scale": D.tolist(), "offset": t.tolist(), "doc": "source_voxel = scale * cube_voxel + offset"},
    }
    return D, t, inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :], meta


def _source_block(D: np.ndarray, t: np.ndarray, size: int, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The part of the source the cube reads from (with a small margin); None if it reads nothing."""
    far = D * (size - 1) + t
    lim = np.array(shape)
    pad = 2 * np.ceil(D) + 3  # room for the anti-aliasing filters of _resample
    lo = np.clip(np.floor(np.minimum(t, far) - pad), 0, lim).astype(int)
    hi = np.clip(np.ceil(np.maximum(t, far) + pad) + 1, 0, lim).astype(int)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _resample(block: np.ndarray, D: np.ndarray, t: np.ndarray, size: int, *, order: int, antialias: bool
              ) -> np.ndarray:
    """Sample `block` at voxel D*u + t for every cube voxel u (0 outside).

    A pure integer shift (fit: pad at native spacing) is an exact copy. Downsampling with
    `antialias` first averages blocks of floor(D) voxels (a box filter, one cheap pass), then smooths
    what is left of the factor with a small Gaussian on the reduced grid.
    """
    out_shape = (size,) * 3
    if np.all(D == 1.0) and np.all(t == np.round(t)):
        out = np.zeros(out_shape, dtype=block.dtype)
        ti = t.astype(int)
        src = [slice(max(0, ti[i]), min(block.shape[i], ti[i] + size)) for i in range(3)]
        dst = [slice(s.start - ti[i], s.stop - ti[i]) for i, s in enumerate(src)]
        if all(s.stop > s.start for s in src):
            out[tuple(dst)] = block[tuple(src)]
        return out
    D = D.astype(np.float64)
    if antialias and order > 0:
        k = np.maximum(1, np.floor(D + 1e-6)).astype(int)
        # Never average over more voxels than an axis has: a degenerate scan (1 x 1 x 100000) would
        # otherwise be zero-padded to k voxels on its thin axes (terabytes).
        k = np.minimum(k, np.maximum(1, np.array(block.shape)))
        if np.any(k > 1):
            extra = (-np.array(block.shape)) % k
            if np.any(extra):
                block = np.pad(block, [(0, int(e)) for e in extra])
            n = np.array(block.shape) // k
            block = block.reshape(n[0], k[0], n[1], k[1], n[2], k[2]).mean(axis=(1, 3, 5), dtype=np.float32)
            # reduced voxel v is the mean of voxels k*v .. k*v + k-1, centred at k*v + (k-1)/2
            D, t = D / k, (t - (k - 1) / 2.0) / k
        sigma = np.maximum(0.0, (D - 1.0) / 2.0)
        if np.any(sigma > 0.05):
            block = ndimage.gaussian_filter(block, sigma=sigma, truncate=3.0, mode="nearest")
    return ndimage.affine_transform(block, D, offset=t, output_shape=out_shape, order=order,
                                    mode="constant", cval=0.0, prefilter=False)


def _resample_labels(seg: np.ndarray, D: np.ndarray, t: np.ndarray, size: int) -> np.ndarray:
    """Resample a label map by area-weighted vote rather than nearest neighbour.

    Why: nearest neighbour at a 4-5x downsampling (a brain to 32^3) keeps or drops small tumours
    and thin enhancing rims by the phase of the sampling grid. Here a cube voxel is tumour where at
    least half of it is tumour, its sub-label is the majority label inside it, and a tumour that
    covers no cube voxel by half still keeps its best-covered voxel, so a case never loses its mask.
    """
    if np.all(D == 1.0) and np.all(t == np.round(t)):  # exact copy at native resolution
        return _resample(seg, D, t, size, order=0, antialias=False)
    fracs = np.stack([
        _resample((seg == label).astype(np.float32), D, t, size, order=1, antialias=True)
        for label in (1, 2, 3)
    ])
    tumour = fracs.sum(axis=0)
    out = np.where(tumour >= 0.5, fracs.argmax(axis=0) + 1, 0).astype(np.uint8)
    if not out.any() and tumour.max() > 0.05:
        best = np.unravel_index(int(tumour.argmax()), tumour.shape)
        out[best] = int(fracs[(slice(None), *best)].argmax()) + 1
    return out


def preprocess_case(loaded: LoadedCase, data_cfg: object = None) -> PreparedCase:
    """Preprocess one loaded case (see the module docstring for the steps).

    Args:
        loaded: from `brats.load_case` (RAS, canonical labels).
        data_cfg: the `data` config (mapping, DictConfig or DataConfig; None: defaults).

    Raises:
        DataError: empty brain (in the source, or none left in the cube), or `crop: tumour` without
            tumour voxels.
    """
    cfg = DataConfig.from_cfg(data_cfg)
    if cfg.brain_mask and loaded.brain is not None:
        brain = loaded.brain > 0
    else:
        brain = loaded.image.max(axis=0) > 0
    if not brain.any():
        raise DataError(None, "no brain voxel (every modality is 0)", code="empty-brain", case_id=loaded.case_id)
    bounds = _clip_bounds(loaded.image, brain, cfg.clip)
    D, t, inside, meta = _geometry(cfg, loaded, brain)
    S = cfg.size
    C = loaded.image.shape[0]
    image = np.zeros((C, S, S, S), dtype=np.float32)
    brain_out = np.zeros((S, S, S), dtype=bool)
    seg = np.zeros((S, S, S), dtype=np.uint8)
    block = _source_block(D, t, S, brain.shape)
    if block is not None:  # else the crop lies wholly outside the scan: an all-zero cube
        tb = t - np.array([b.start for b in block])
        brain_b = brain[block]
        brain_out = (_resample(brain_b.view(np.uint8), D, tb, S, order=0, antialias=False) > 0) & inside
        for c in range(C):
            ch = _resample(_scale(loaded.image[c][block], brain_b, *bounds[c]), D, tb, S, order=1,
                           antialias=cfg.antialias)
            np.clip(ch, 0.0, 1.0, out=ch)
            ch *= brain_out
            image[c] = ch
        if loaded.seg is not None:
            seg = _resample_labels(loaded.seg[block], D, tb, S)
            seg *= inside
    if not brain_out.any():  # e.g. a 1 x 1 x N scan: resizing it into a cube samples no brain voxel
        raise DataError(loaded.files.get(loaded.modalities[0]),
                        f"no brain voxel left in the {S}^3 cube (source grid {tuple(brain.shape)}, crop "
                        f"{cfg.crop!r}, fit {cfg.fit!r}); the scan is too thin or degenerate",
                        code="empty-brain", case_id=loaded.case_id)

    M = np.eye(4)
    M[:3, :3] = np.diag(D)
    M[:3, 3] = t
    affine = loaded.affine @ M
    meta.update({
        "case_id": loaded.case_id,
        "modalities": list(loaded.modalities),
        "affine": affine.tolist(),
        "size": S,
        "spacing": [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "scheme": loaded.scheme,
        "source_files": {role: str(p) for role, p in loaded.files.items()},
        "source_shape": list(loaded.image.shape[1:]),
        "source_spacing": list(loaded.spacing),
        "source_affine": loaded.affine.tolist(),
        "intensity_clip": {m: list(b) for m, b in zip(loaded.modalities, bounds, strict=True)},
        "clip_percentiles": list(cfg.clip),
        "tumour_voxels": int(np.count_nonzero(seg)),
        "tumour_voxels_source": int(np.count_nonzero(loaded.seg)) if loaded.seg is not None else 0,
        "has_seg": loaded.seg is not None,
    })
    return PreparedCase(case_id=loaded.case_id, image=image, seg=seg.astype(np.uint8), brain=brain_out.astype(np.uint8),
                        affine=affine, meta=meta)


# --------------------------------------------------------------------------------------------
# A whole dataset into the cache
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareSummary:
    """What `prepare_dataset` did.

    Args:
        cache_root: the cache folder.
        prep_hash: hash of the preprocessing settings the cache now holds.
        prepared: cases written in this run.
        skipped: cases already cached with the current `prep_hash` (resume).
        failed: case id -> its problems; those cases are not in the index.
        n_cases: case folders considered.
        seconds: wall time of the run.
    """

    cache_root: Path
    prep_hash: str
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, list[Problem]] = field(default_factory=dict)
    n_cases: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache_root": str(self.cache_root),
            "prep_hash": self.prep_hash,
            "n_cases": self.n_cases,
            "prepared": self.prepared,
            "skipped": self.skipped,
            "failed": {cid: [p.to_dict() for p in probs] for cid, probs in self.failed.items()},
            "seconds": round(self.seconds, 2),
        }


def _fingerprint(files: dict[str, Path]) -> dict[str, list[Any]]:
    """Absolute path, size and modification time of each source file.

    Why all three: a source edited in place (same size) or a case with the same id from another
    cohort (phantom ids repeat across seeds) must be recomputed, never served from the cache.
    """
    out = {}
    for role, path in sorted(files.items()):
        try:
            st = path.stat()
            out[role] = [str(path.resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            out[role] = [str(path), None, None]
    return out


def prepare_dataset(
    root: str | os.PathLike[str],
    cache_root: str | os.PathLike[str],
    data_cfg: object = None,
    *,
    case_ids: Iterable[str] | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Check and preprocess every case below `root` into `cache_root` (docs/contracts.md).

    Resumes: a case whose `meta.json` holds the current `prep_hash` (and the same source file names
    and sizes) is skipped; any change of the preprocessing settings or modalities recomputes it.
    A case that fails its checks is listed in `summary.failed`, never aborts the run. Each case
    folder is written atomically; `index.json` lists every case cached with the current hash.

    Args:
        root: folder with BraTS-style case folders.
        cache_root: the cache folder (created if needed).
        data_cfg: the `data` config (mapping, DictConfig or DataConfig; None: defaults).
        case_ids: only these cases (default: all found).
        progress: show a progress bar on stderr.

    Raises:
        DataError: `root` is not a folder.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    cfg = DataConfig.from_cfg(data_cfg)
    cache_root = Path(cache_root)
    h = prep_hash(cfg)
    summary = PrepareSummary(cache_root=cache_root, prep_hash=h)
    cases = find_cases(root, cfg.scheme)
    if case_ids is not None:
        wanted = list(dict.fromkeys(case_ids))
        have = {c.case_id for c in cases}
        for cid in wanted:
            if cid not in have:
                summary.failed[cid] = [Problem(cid, Path(root), "not-found", f"no case folder {cid!r} below {root}")]
        cases = [c for c in cases if c.case_id in set(wanted)]
    summary.n_cases = len(cases)
    seen: dict[str, Path] = {}
    for case in tqdm(cases, desc="prepare", unit="case", disable=not progress, leave=False):
        cid = case.case_id
        if cid in seen:
            summary.failed.setdefault(cid, []).append(Problem(
                cid, case.folder, "duplicate-case", f"case id also used by {seen[cid]}; this folder is not cached"))
            continue
        seen[cid] = case.folder
        files = {r: p for r, p in case.files().items() if r in (*cfg.modalities, "seg", "brain")}
        fingerprint = _fingerprint(files)
        if (cache_root / cid / META_NAME).is_file():
            try:  # maps the arrays (reads headers only): a truncated or missing file is rebuilt
                old = load_cached_case(cache_root / cid, cfg.modalities, cfg.size, prep_hash=h).meta
            except ValueError:
                old = {}
            if old.get("source_fingerprint") == fingerprint:
                summary.skipped.append(cid)
                continue
        check = check_case(case, cfg)
        loaded = check.inspection.loaded
        if not check.ok or loaded is None:
            summary.failed[cid] = check.problems
            continue
        try:
            prepared = preprocess_case(loaded, cfg)
        except DataError as exc:
            summary.failed[cid] = [Problem.from_error(exc, cid)]
            continue
        prepared.meta.update({"prep_hash": h, "prep": cfg.prep_dict(), "source_fingerprint": fingerprint,
                              "group": case.group})
        write_cached_case(cache_root, cid, prepared.image, prepared.seg, prepared.brain, prepared.meta)
        summary.prepared.append(cid)

    # The index lists every case folder of the cache that holds the current hash.
    ids = []
    if cache_root.is_dir():
        for sub in sorted(cache_root.iterdir()):
            if sub.name.startswith(".") or not (sub / META_NAME).is_file() or sub.name in summary.failed:
                continue
            try:
                if read_meta(sub).get("prep_hash") == h:
                    ids.append(sub.name)
            except ValueError:
                continue
    write_index(cache_root, {
        "prep_hash": h,
        "prep": cfg.prep_dict(),
        "modalities": list(cfg.modalities),
        "size": cfg.size,
        "source_root": str(Path(root).resolve()),
        "cases": ids,
    })
    summary.seconds = time.perf_counter() - start
    return summary
