"""New tumour masks from a site's own masks: label-preserving augmentation and placement in a host
brain.

A synthetic case starts from the tumour of a real "mask source" case X and is placed in the brain
of a "host" case Y (Y may be X). Each mask is one nearest-neighbour resampling of X's label map,
through a transform drawn from `MaskAugConfig`:

1. left-right flip: a mirror across X's mid-sagittal plane (the middle of its brain's extent along
   the voxel axis closest to world x), so the tumour moves to the other hemisphere;
2. rotation about the tumour centre and an isotropic size change (scale), in millimetres: the
   transform goes through both cases' affines, so a tumour moved into a host with other voxel
   sizes keeps its physical size (times `scale`);
3. a smooth elastic displacement (cubic B-spline upsampling of random control-point vectors);
4. placement in Y's grid: `random` draws the centre among every position where the whole
   transformed tumour lies inside Y's brain mask (found for all positions at once by an FFT
   correlation of the tumour footprint with "outside the brain"); `keep` puts it at the same
   position relative to the brain's bounding box, shifted by a random translation.

Nearest-neighbour resampling can only copy label values, so a mask never holds a value X's mask
did not hold. A draw whose tumour leaves the brain (or the image), shrinks below `min_voxels`,
or loses a sub-region label is rejected and redrawn, at most `max_tries` times; then a
`MaskAugmentationError` says what went wrong how often.

Everything random comes from `numpy.random.SeedSequence([seed, index, stream])`, so sample
`index` gets the same host and mask whatever other samples are made, and a resumed run remakes
exactly the masks an uninterrupted one would have.

```python
masks = make_masks(cache, ["A-0001", "A-0002"], ["A-0001", "A-0002"], {"A-0001": "HGG"},
                   MaskAugConfig(), seed=0, indices=range(4))
masks[0].seg, masks[0].host_case, masks[0].to_record()
```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve
from scipy.spatial.transform import Rotation

from aldm_fed.data.cache import CachedCase, CaseCache
from aldm_fed.synthesis.config import HOST_MODES, MaskAugConfig, mask_aug_config
from aldm_fed.synthesis.errors import SynthesisError

__all__ = [
    "MaskAugmentationError",
    "MaskTransform",
    "PlacedTumour",
    "SyntheticMask",
    "assign_cases",
    "augment_mask",
    "make_masks",
]

_HOST_STREAM = 0  # SeedSequence stream of the host choice; attempts use 1, 2, ...


class MaskAugmentationError(SynthesisError):
    """No acceptable mask within the allowed tries, or an unusable input; the message names the
    source and host cases."""


@dataclass(frozen=True)
class MaskTransform:
    """The drawn parameters of one augmentation (what the manifest records).

    Args:
        flip: mirrored left-right across the source brain's mid-sagittal plane.
        rotation_deg: rotation about world x, y, z (degrees, extrinsic "xyz").
        scale: isotropic size factor.
        translation_mm: shift of the tumour centre (placement `keep` only; None for `random`).
        elastic_mm: largest elastic displacement (0 = none).
        elastic_sigma_mm: control-point spacing of the elastic field.
    """

    flip: bool
    rotation_deg: tuple[float, float, float]
    scale: float
    translation_mm: tuple[float, float, float] | None
    elastic_mm: float
    elastic_sigma_mm: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "flip_lr": self.flip,
            "rotation_deg": [round(a, 4) for a in self.rotation_deg],
            "scale": round(self.scale, 6),
            "translation_mm": None if self.translation_mm is None else [round(t, 4) for t in self.translation_mm],
            "elastic": {"max_mm": round(self.elastic_mm, 4), "sigma_mm": self.elastic_sigma_mm},
        }


@dataclass
class PlacedTumour:
    """One accepted augmentation of a mask on the host grid.

    Args:
        seg: uint8 label map on the host grid (host shape), labels 0..3.
        transform: the parameters drawn.
        placement: `random` or `keep`.
        centre_voxel: host voxel the source tumour centre was mapped to.
        attempts: draws made (1 = the first was accepted).
        rejected: reason -> number of rejected draws.
    """

    seg: np.ndarray
    transform: MaskTransform
    placement: str
    centre_voxel: tuple[int, int, int]
    attempts: int
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class SyntheticMask:
    """The conditioning mask of one synthetic case, and where it came from.

    Args:
        index: sample index (the synthetic id is derived from it).
        source_case: case whose tumour was augmented.
        host_case: case whose brain (grid, affine, brain mask) receives it.
        label: case-level label of the source case (e.g. grade), carried along; None if unknown.
        placed: the augmentation result.
    """

    index: int
    source_case: str
    host_case: str
    label: str | None
    placed: PlacedTumour

    @property
    def seg(self) -> np.ndarray:
        return self.placed.seg

    @property
    def n_voxels(self) -> int:
        return int(np.count_nonzero(self.placed.seg))

    @property
    def labels_present(self) -> list[int]:
        return [int(v) for v in np.unique(self.placed.seg) if v]

    def to_record(self) -> dict[str, Any]:
        """JSON-ready description (no arrays): sources, transform, placement, retries."""
        return {
            "index": self.index,
            "source_case": self.source_case,
            "host_case": self.host_case,
            "label": self.label,
            "placement": self.placed.placement,
            "centre_voxel": list(self.placed.centre_voxel),
            "transforms": self.placed.transform.to_dict(),
            "attempts": self.placed.attempts,
            "rejected": dict(self.placed.rejected),
            "n_voxels": self.n_voxels,
            "labels_present": self.labels_present,
        }


# --------------------------------------------------------------------------------------------
# Seeding and case assignment
# --------------------------------------------------------------------------------------------


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(stream)]))


def assign_cases(
    mask_cases: Sequence[str],
    host_cases: Sequence[str],
    index: int,
    *,
    seed: int,
    host: str = "other",
) -> tuple[str, str]:
    """The (source, host) cases of sample `index`.

    Sources go round-robin through `mask_cases` (sample i uses mask i mod M), so every mask is used
    equally often; the host is drawn from `host_cases` with the (seed, index) generator.

    Args:
        mask_cases: the mask source cases, in a fixed order.
        host_cases: the candidate hosts.
        index: sample index (>= 0).
        seed: base seed (>= 0).
        host: `other` (a host other than the source when there is one), `same` (the source
            itself) or `any`.
    """
    if not mask_cases:
        raise MaskAugmentationError("mask_cases: empty; at least one case with a tumour mask is needed")
    if host not in HOST_MODES:
        raise ValueError(f"host: expected one of {list(HOST_MODES)}, got {host!r}")
    source = mask_cases[index % len(mask_cases)]
    if host == "same":
        return source, source
    if not host_cases:
        raise MaskAugmentationError("host_cases: empty; at least one host brain is needed")
    pool = [h for h in host_cases if h != source] if host == "other" else list(host_cases)
    pool = pool or [source]  # `other` with the source as the only host: place it in its own brain
    rng = _rng(seed, index, _HOST_STREAM)
    return source, pool[int(rng.integers(len(pool)))]


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (lo, hi) voxel corners of the nonzero region."""
    idx = np.nonzero(mask)
    return np.array([i.min() for i in idx]), np.array([i.max() for i in idx])


@dataclass(frozen=True)
class _Source:
    """What every augmentation of one source mask needs, computed once."""

    seg: np.ndarray
    affine: np.ndarray
    centre: np.ndarray  # integer voxel anchor (rounded centroid): identity maps voxels onto voxels
    radius_mm: float  # farthest tumour voxel from the centre
    labels: frozenset[int]
    brain_lo: np.ndarray
    brain_hi: np.ndarray
    lr_axis: int  # voxel axis closest to world x (left-right)


def _prepare_source(seg: np.ndarray, affine: np.ndarray, brain: np.ndarray, name: str) -> _Source:
    seg = np.asarray(seg)
    if seg.ndim != 3:
        raise MaskAugmentationError(f"mask case {name!r}: expected a 3D label map, got shape {seg.shape}")
    values = {int(v) for v in np.unique(seg)}
    if not values <= {0, 1, 2, 3}:
        raise MaskAugmentationError(f"mask case {name!r}: labels {sorted(values)} outside canonical 0..3")
    tumour = np.argwhere(seg > 0)
    if len(tumour) == 0:
        raise MaskAugmentationError(f"mask case {name!r}: its mask has no tumour voxels")
    affine = np.asarray(affine, dtype=np.float64)
    centre = np.round(tumour.mean(axis=0)).astype(np.int64)
    radius = float(np.linalg.norm((tumour - centre) @ affine[:3, :3].T, axis=1).max())
    # An empty brain mask (should not happen in a prepared cache) falls back to the tumour box.
    lo, hi = _bbox(brain) if np.any(brain) else _bbox(seg)
    return _Source(
        seg=seg,
        affine=affine,
        centre=centre,
        radius_mm=radius + 0.5 * float(np.linalg.norm(_spacing(affine))),
        labels=frozenset(values - {0}),
        brain_lo=lo,
        brain_hi=hi,
        lr_axis=int(np.argmax(np.abs(affine[0, :3]))),
    )


def _flip_matrix(src: _Source, flip: bool) -> np.ndarray:
    """Source-voxel mirror across the brain's mid-sagittal plane (x -> lo + hi - x), or identity.

    lo + hi is an integer, so the mirror maps voxel centres onto voxel centres.
    """
    F = np.eye(4)
    if flip:
        a = src.lr_axis
        F[a, a] = -1.0
        F[a, 3] = float(src.brain_lo[a] + src.brain_hi[a])
    return F


def _elastic_field(
    rng: np.random.Generator, size: int, spacing: np.ndarray, amplitude_mm: float, sigma_mm: float
) -> np.ndarray:
    """(3, size, size, size) smooth displacement in mm whose largest vector is `amplitude_mm`."""
    sigma_vox = np.maximum(sigma_mm / spacing, 1.0)
    n_ctrl = [max(2, math.ceil(size / s) + 1) for s in sigma_vox]
    ctrl = rng.standard_normal((3, *n_ctrl))
    # Sample the control grid at `size` points per axis with cubic splines: a smooth field.
    grid = np.meshgrid(*[np.linspace(0, n - 1, size) for n in n_ctrl], indexing="ij")
    field_ = np.stack([ndimage.map_coordinates(c, grid, order=3, mode="nearest") for c in ctrl])
    peak = float(np.sqrt((field_**2).sum(axis=0)).max())
    return field_ * (amplitude_mm / peak) if peak > 0 else field_


def _render(
    src: _Source, host_affine: np.ndarray, transform: MaskTransform, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """The transformed tumour on a (2R+1)^3 patch of host voxels centred on the anchor; returns
    (patch, R). Backward mapping: each host voxel looks up its source voxel (nearest neighbour)."""
    host_lin = host_affine[:3, :3]
    host_spacing = _spacing(host_affine)
    reach_mm = src.radius_mm * transform.scale + transform.elastic_mm
    R = int(math.ceil(reach_mm / float(host_spacing.min()))) + 1
    P = 2 * R + 1
    offsets = np.indices((P, P, P), dtype=np.float64).reshape(3, -1) - R
    u = host_lin @ offsets  # mm relative to the anchor, in the host's world axes
    if transform.elastic_mm > 0:
        u = u + _elastic_field(rng, P, host_spacing, transform.elastic_mm, transform.elastic_sigma_mm).reshape(3, -1)
    A = Rotation.from_euler("xyz", transform.rotation_deg, degrees=True).as_matrix() * transform.scale
    F = _flip_matrix(src, transform.flip)
    anchor_world = src.affine @ (F @ np.append(src.centre, 1.0))  # the (flipped) centre in world mm
    w = anchor_world[:3, None] + np.linalg.solve(A, u)  # undo rotation+scale about the centre
    S_inv = np.linalg.inv(src.affine)
    y = S_inv[:3, :3] @ w + S_inv[:3, 3:4]  # flipped-source voxels
    q = F[:3, :3] @ y + F[:3, 3:4]  # original-source voxels (the mirror is its own inverse)
    patch = ndimage.map_coordinates(src.seg, q, order=0, mode="constant", cval=0, prefilter=False)
    return patch.reshape(P, P, P).astype(np.uint8, copy=False), R


def _draw_transform(rng: np.random.Generator, cfg: MaskAugConfig) -> MaskTransform:
    # Always draw every parameter in the same order, so disabling one keeps the others' values.
    flip = bool(rng.random() < cfg.flip_prob)
    angles = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg, size=3)
    lo, hi = np.log(cfg.scale[0]), np.log(cfg.scale[1])
    scale = float(np.exp(rng.uniform(lo, hi))) if hi > lo else float(cfg.scale[0])
    shift = rng.uniform(-cfg.translate_mm, cfg.translate_mm, size=3)
    elastic = float(rng.uniform(0.0, cfg.elastic_mm)) if cfg.elastic_mm > 0 else 0.0
    return MaskTransform(
        flip=flip,
        rotation_deg=(float(angles[0]), float(angles[1]), float(angles[2])),
        scale=scale,
        translation_mm=(float(shift[0]), float(shift[1]), float(shift[2])) if cfg.placement == "keep" else None,
        elastic_mm=elastic,
        elastic_sigma_mm=cfg.elastic_sigma_mm,
    )


def _place_random(
    footprint: np.ndarray, host_brain: np.ndarray, allowed_out: int, rng: np.random.Generator
) -> np.ndarray | None:
    """A random corner where `footprint` fits the grid with <= allowed_out voxels outside the brain."""
    if any(k > s for k, s in zip(footprint.shape, host_brain.shape)):
        return None
    outside = (np.asarray(host_brain) == 0).astype(np.float64)
    # counts[j] = sum_k footprint[k] * outside[j + k]: brain-leaving voxels for every corner j
    counts = fftconvolve(outside, footprint[::-1, ::-1, ::-1].astype(np.float64), mode="valid")
    ok = np.argwhere(counts <= allowed_out + 0.5)  # +0.5: FFT round-off on integer counts
    if len(ok) == 0:
        return None
    return ok[int(rng.integers(len(ok)))]


def augment_mask(
    source_seg: np.ndarray,
    source_affine: np.ndarray,
    source_brain: np.ndarray,
    host_brain: np.ndarray,
    host_affine: np.ndarray,
    cfg: MaskAugConfig | Mapping[str, Any] | None = None,
    *,
    seed: int,
    index: int,
    source_name: str = "source",
    host_name: str = "host",
) -> PlacedTumour:
    """Draw an augmentation of one tumour mask and place it in a host brain.

    Args:
        source_seg: (X, Y, Z) canonical labels 0..3 of the mask source case.
        source_affine: its 4x4 voxel -> RAS world affine.
        source_brain: its brain mask (defines the mid-sagittal plane and the relative position).
        host_brain: the host's brain mask (the tumour must lie inside it); defines the output grid.
        host_affine: the host's 4x4 affine.
        cfg: augmentation settings (`MaskAugConfig`, a mapping of them, or None for defaults).
        seed: base seed (>= 0).
        index: sample index; draws come from SeedSequence([seed, index, attempt]).
        source_name, host_name: case ids for error messages.

    Returns:
        The accepted `PlacedTumour` (labels on the host grid, parameters, retries).

    Raises:
        MaskAugmentationError: no acceptable draw in `cfg.max_tries`, or an unusable source mask.
    """
    cfg = mask_aug_config(cfg)
    src = _prepare_source(source_seg, source_affine, source_brain, source_name)
    return _augment(src, np.asarray(host_brain), np.asarray(host_affine, dtype=np.float64), cfg,
                    seed=seed, index=index, source_name=source_name, host_name=host_name)


def _augment(
    src: _Source,
    host_brain: np.ndarray,
    host_affine: np.ndarray,
    cfg: MaskAugConfig,
    *,
    seed: int,
    index: int,
    source_name: str,
    host_name: str,
) -> PlacedTumour:
    if host_brain.ndim != 3 or not np.any(host_brain):
        raise MaskAugmentationError(f"host case {host_name!r}: empty or invalid brain mask {host_brain.shape}")
    h_lo, h_hi = _bbox(host_brain)
    host_spacing = _spacing(host_affine)
    grid = np.array(host_brain.shape)
    rejected: dict[str, int] = {}
    for attempt in range(1, cfg.max_tries + 1):
        rng = _rng(seed, index, attempt)
        transform = _draw_transform(rng, cfg)
        patch, R = _render(src, host_affine, transform, rng)
        footprint = patch > 0
        n = int(footprint.sum())
        reason = None
        if n < cfg.min_voxels:
            reason = "vanished"
        elif cfg.keep_labels and {int(v) for v in np.unique(patch[footprint])} != set(src.labels):
            reason = "lost a label"
        if reason is None:
            t_lo, t_hi = _bbox(footprint)
            tight = footprint[tuple(slice(a, b + 1) for a, b in zip(t_lo, t_hi))]
            allowed_out = int(math.floor((1.0 - cfg.min_inside) * n + 1e-9))
            if cfg.placement == "random":
                corner = _place_random(tight, host_brain, allowed_out, rng)
                if corner is None:
                    reason = "fits nowhere inside the brain"
            else:
                # same position relative to the brain box, then the drawn shift (whole voxels)
                F = _flip_matrix(src, transform.flip)
                anchor = (F @ np.append(src.centre, 1.0))[:3]
                rel = (anchor - src.brain_lo) / np.maximum(src.brain_hi - src.brain_lo, 1)
                shift = np.asarray(transform.translation_mm) / host_spacing
                centre = np.round(h_lo + rel * (h_hi - h_lo) + shift).astype(np.int64)
                corner = centre + t_lo - R
                if np.any(corner < 0) or np.any(corner + tight.shape > grid):
                    reason, corner = "left the image", None
                else:
                    region = tuple(slice(c, c + k) for c, k in zip(corner, tight.shape))
                    if int(np.count_nonzero(tight & (host_brain[region] == 0))) > allowed_out:
                        reason, corner = "left the brain", None
        if reason is not None:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        assert corner is not None
        seg = np.zeros(host_brain.shape, dtype=np.uint8)
        region = tuple(slice(int(c), int(c) + k) for c, k in zip(corner, tight.shape))
        seg[region] = patch[tuple(slice(a, b + 1) for a, b in zip(t_lo, t_hi))]
        centre_vox = np.asarray(corner) - t_lo + R
        return PlacedTumour(
            seg=seg,
            transform=transform,
            placement=cfg.placement,
            centre_voxel=(int(centre_vox[0]), int(centre_vox[1]), int(centre_vox[2])),
            attempts=attempt,
            rejected=rejected,
        )
    why = ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
    raise MaskAugmentationError(
        f"sample {index}: no acceptable mask from the tumour of {source_name!r} in the brain of host "
        f"{host_name!r} after {cfg.max_tries} tries ({why}). Try a smaller synthesis.masks.scale, "
        f"a lower min_inside, placement=random, or other host cases"
    )


# --------------------------------------------------------------------------------------------
# Many masks from a cache
# --------------------------------------------------------------------------------------------


def make_masks(
    cache: CaseCache,
    mask_cases: Sequence[str],
    host_cases: Sequence[str],
    labels: Mapping[str, str | None] | None,
    cfg: MaskAugConfig | Mapping[str, Any] | None = None,
    *,
    seed: int,
    indices: Iterable[int],
    host: str = "other",
) -> list[SyntheticMask]:
    """The conditioning masks of samples `indices` (each one independent of the others).

    Args:
        cache: the preprocessed cache holding every mask and host case.
        mask_cases: cases whose tumours are augmented (round-robin by index).
        host_cases: cases whose brains receive them.
        labels: case id -> case-level label (e.g. grade) of the mask cases; carried to the sample.
        cfg: augmentation settings (`MaskAugConfig`, mapping or None).
        seed: base seed (>= 0).
        indices: sample indices to make.
        host: host choice, `other`, `same` or `any` (see `assign_cases`).

    Raises:
        MaskAugmentationError: empty case lists, a mask without tumour, or no acceptable draw.
        aldm_fed.data.cache.CacheError: a case missing from the cache.
    """
    cfg = mask_aug_config(cfg)
    loaded: dict[str, CachedCase] = {}  # each case read once (a case may be source and host)
    sources: dict[str, _Source] = {}

    def load(case_id: str) -> CachedCase:
        if case_id not in loaded:
            loaded[case_id] = cache.load(case_id)
        return loaded[case_id]

    out: list[SyntheticMask] = []
    for index in indices:
        source, host_case = assign_cases(mask_cases, host_cases, int(index), seed=seed, host=host)
        if source not in sources:
            case = load(source)
            sources[source] = _prepare_source(np.asarray(case.seg), case.affine, np.asarray(case.brain), source)
        h = load(host_case)
        placed = _augment(sources[source], np.asarray(h.brain), h.affine, cfg, seed=seed, index=int(index),
                          source_name=source, host_name=host_case)
        label = None if labels is None else labels.get(source)
        out.append(SyntheticMask(int(index), source, host_case, None if label is None else str(label), placed))
    return out
