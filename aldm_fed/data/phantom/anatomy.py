"""Healthy anatomy: the MNI152 brain placed in the BraTS box, and per-case deformations of it.

The tissue maps (white matter, grey matter, CSF, brain mask) come from the MNI152 2009a template
that nilearn ships in its wheel, so the phantom needs no download. They are loaded once per
process and resampled once per requested resolution (both cached). A case is the reference warped
by a random smooth deformation: a small affine (head size, tilt, position) plus a B-spline field
(local shape), so no two cases have the same anatomy.

Coordinates are RAS world millimetres (MNI space); deformations are *backward* maps: the case
voxel at world position w shows the reference anatomy at w + d(w).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from aldm_fed.data.phantom.fields import Grid, SmoothField, random_field

__all__ = [
    "BRATS_EXTENT_MM",
    "AnatomyConfig",
    "Deformation",
    "ReferenceAnatomy",
    "box_grid",
    "random_deformation",
    "reference_anatomy",
]

# BraTS geometry: 240 x 240 x 155 voxels of 1 mm.
BRATS_EXTENT_MM: tuple[int, int, int] = (240, 240, 155)
# World position of voxel 0 of the 1 mm box. Integers, so the 1 mm box samples MNI voxel centres
# exactly (a copy, no interpolation blur); the MNI brain (x -72..72, y -107..73, z -72..82 mm)
# is centred in x and y and fills the 155 axial slices as a BraTS brain does.
_BOX_ORIGIN_1MM: tuple[float, float, float] = (-120.0, -137.0, -72.0)
# Extra margin (mm) around the brain where per-case work happens; deformations stay within it.
_CROP_MARGIN_MM = 8.0


@dataclass(frozen=True)
class AnatomyConfig:
    """Per-case anatomical variation.

    Args:
        deform_mm: standard deviation (mm) of the local smooth displacement.
        deform_spacing_mm: feature size (mm) of the local displacement (B-spline control spacing).
        scale: maximum relative change of head size per axis (0.05: +-5 %).
        rotation_deg: maximum tilt about each axis, degrees.
        shift_mm: maximum translation per axis, mm.
    """

    deform_mm: float = 2.0
    deform_spacing_mm: float = 32.0
    scale: float = 0.05
    rotation_deg: float = 3.0
    shift_mm: float = 3.0


@dataclass(frozen=True)
class _Mni:
    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    affine: np.ndarray


@functools.lru_cache(maxsize=1)
def _mni_1mm() -> _Mni:
    """MNI152 tissue maps at 1 mm (loaded once per process; ~2 s, offline)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn deprecation chatter is not ours to act on
        from nilearn import datasets

        mask_img = datasets.load_mni152_brain_mask(resolution=1)
        gm_img = datasets.load_mni152_gm_template(resolution=1)
        wm_img = datasets.load_mni152_wm_template(resolution=1)
    brain = (np.asarray(mask_img.dataobj) > 0).astype(np.float32)
    gm = np.asarray(gm_img.dataobj, dtype=np.float32) * brain
    wm = np.asarray(wm_img.dataobj, dtype=np.float32) * brain
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    # CSF is what the brain mask holds beyond grey and white matter (ventricles, sulci, cisterns).
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return _Mni(wm=wm, gm=gm, csf=csf, brain=brain, affine=np.asarray(mask_img.affine, dtype=np.float64))


def box_grid(resolution_mm: float) -> Grid:
    """The BraTS box (240 x 240 x 155 mm) sampled at `resolution_mm`, centred like the 1 mm box.

    Args:
        resolution_mm: isotropic voxel size; 1.0 gives exactly BraTS geometry.
    """
    r = float(resolution_mm)
    shape = tuple(int(math.ceil(extent / r - 1e-9)) for extent in BRATS_EXTENT_MM)
    centre = np.asarray(_BOX_ORIGIN_1MM) + (np.asarray(BRATS_EXTENT_MM) - 1) / 2.0
    origin = centre - (np.asarray(shape) - 1) / 2.0 * r
    return Grid(shape=shape, spacing=r, origin=tuple(float(v) for v in origin))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ReferenceAnatomy:
    """The undeformed MNI brain on the crop of the BraTS box where a case can have brain.

    Args:
        box: the full BraTS box grid at this resolution (what is written to disk).
        crop: slices of `box` covered by `grid` (the brain plus a margin).
        grid: the crop grid; all arrays below live on it.
        wm: white-matter fraction.
        gm: grey-matter fraction.
        csf: CSF fraction.
        brain: brain mask (0/1 as float, partial at the edge when resampled).
        depth_mm: distance (mm) from each voxel to the outside of the brain.
        seed_candidates: (N, 3) world points deep in white matter where a glioma may start.
    """

    box: Grid
    crop: tuple[slice, slice, slice]
    grid: Grid
    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    depth_mm: np.ndarray
    seed_candidates: np.ndarray

    def sample(self, world: np.ndarray, names: tuple[str, ...] = ("wm", "gm", "csf", "brain")) -> dict[str, np.ndarray]:
        """Linearly interpolate maps at world points (3, ...); outside the crop reads 0.

        Args:
            world: (3, ...) world coordinates (mm); consumed (converted to indices in place).
            names: which maps to sample.
        """
        idx = self.grid.to_index(world)
        return {n: ndi.map_coordinates(getattr(self, n), idx, order=1, mode="constant", cval=0.0) for n in names}


@functools.lru_cache(maxsize=4)
def reference_anatomy(resolution_mm: float) -> ReferenceAnatomy:
    """The reference brain at `resolution_mm` (cached: built once per resolution per process).

    Args:
        resolution_mm: isotropic voxel size in mm.
    """
    mni = _mni_1mm()
    box = box_grid(resolution_mm)
    r = box.spacing
    # Brain bounding box in world mm (from the 1 mm mask), plus a margin for deformations.
    nz = np.argwhere(mni.brain > 0)
    lo_w = nz.min(0) + mni.affine[:3, 3] - _CROP_MARGIN_MM
    hi_w = nz.max(0) + mni.affine[:3, 3] + _CROP_MARGIN_MM
    crop, grid = box.sub(lo_w, hi_w)

    maps = {"wm": mni.wm, "gm": mni.gm, "csf": mni.csf, "brain": mni.brain}
    idx = grid.world(np.float64)
    for a in range(3):
        idx[a] = (idx[a] - mni.affine[a, 3]) / mni.affine[a, a]
    out: dict[str, np.ndarray] = {}
    if np.allclose(idx, np.round(idx), atol=1e-6):
        # 1 mm: the box samples MNI voxel centres; copy with zero padding, no interpolation.
        for name, arr in maps.items():
            out[name] = ndi.map_coordinates(arr, np.round(idx), order=0, mode="constant", cval=0.0)
    else:
        # Coarser grids: low-pass first so a voxel holds the partial volume of its tissues.
        sigma = 0.4 * math.sqrt(max(r * r - 1.0, 0.0))
        for name, arr in maps.items():
            src = ndi.gaussian_filter(arr, sigma) if sigma > 0 else arr
            out[name] = ndi.map_coordinates(src, idx, order=1, mode="constant", cval=0.0)
    for name in out:
        out[name] = np.clip(out[name], 0.0, 1.0).astype(np.float32)
    depth = ndi.distance_transform_edt(out["brain"] > 0.5, sampling=r).astype(np.float32)

    # Gliomas start in cerebral white matter: deep (>= 15 mm from the surface), above the
    # brainstem/cerebellum (z > -10 mm) and off the midline.
    world = grid.world(np.float32)
    ok = (out["wm"] > 0.8) & (depth >= 15.0) & (world[2] > -10.0) & (np.abs(world[0]) > 10.0)
    candidates = world[:, ok].T.astype(np.float64)
    if len(candidates) == 0:  # pragma: no cover - only for absurd resolutions
        raise ValueError(f"phantom.resolution_mm={resolution_mm}: too coarse to place a tumour")
    for arr in (*out.values(), depth, candidates):
        arr.setflags(write=False)  # shared by every case: never modified in place
    return ReferenceAnatomy(
        box=box, crop=crop, grid=grid, depth_mm=depth, seed_candidates=candidates, **out
    )


@dataclass(frozen=True)
class Deformation:
    """A backward map of a case onto the reference: w -> w + d(w).

    Args:
        matrix: 3x3 linear part (scale and rotation) about `centre`.
        centre: world point (mm) the linear part is applied about.
        shift: translation (mm).
        local: smooth B-spline displacement (3 channels, mm).
    """

    matrix: np.ndarray
    centre: np.ndarray
    shift: np.ndarray
    local: SmoothField

    def on_grid(self, grid: Grid) -> np.ndarray:
        """Displacement d(w) (3, X, Y, Z) float32 on every voxel of `grid`."""
        d = self.local.on_grid(grid)
        lin = self.matrix - np.eye(3)
        ax = [a - c for a, c in zip(grid.axes(), self.centre)]
        for i in range(3):
            d[i] += (
                lin[i, 0] * ax[0][:, None, None]
                + lin[i, 1] * ax[1][None, :, None]
                + lin[i, 2] * ax[2][None, None, :]
                + self.shift[i]
            ).astype(np.float32)
        return d

    def at(self, points: np.ndarray) -> np.ndarray:
        """Displacement at world points (N, 3) -> (N, 3)."""
        points = np.atleast_2d(points)
        lin = (points - self.centre) @ (self.matrix - np.eye(3)).T
        return lin + self.shift + self.local.at(points)

    def invert_point(self, ref_point: np.ndarray, iterations: int = 5) -> np.ndarray:
        """The case point w with w + d(w) = ref_point (fixed-point iteration; d is smooth)."""
        w = np.asarray(ref_point, dtype=np.float64).copy()
        for _ in range(iterations):
            w = ref_point - self.at(w)[0]
        return w


def random_deformation(rng: np.random.Generator, ref: ReferenceAnatomy, cfg: AnatomyConfig) -> Deformation:
    """Draw one case's anatomy: a random small affine plus a smooth local displacement.

    Args:
        rng: the case's anatomy random generator.
        ref: reference anatomy (gives the region the field must cover).
        cfg: variation amplitudes.
    """
    scale = 1.0 + rng.uniform(-cfg.scale, cfg.scale, size=3)
    # Backward map: a reference factor > 1 makes the case head smaller. Keep z >= 1 so the vertex
    # stays inside the 155 slices (the MNI brain fills them exactly).
    scale[2] = 1.0 + abs(scale[2] - 1.0)
    angles = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, size=3))
    shift = rng.uniform(-cfg.shift_mm, cfg.shift_mm, size=3)
    shift[2] = -abs(shift[2]) * 0.5  # likewise: never push the vertex out of the top slice
    matrix = _rotation(angles) @ np.diag(scale)
    lo = np.asarray(ref.grid.origin)
    hi = lo + (np.asarray(ref.grid.shape) - 1) * ref.grid.spacing
    local = random_field(rng, lo, hi, spacing_mm=cfg.deform_spacing_mm, std=cfg.deform_mm, channels=3)
    centre = np.array([0.0, -17.0, 5.0])  # centre of the MNI brain's bounding box
    return Deformation(matrix=matrix, centre=centre, shift=shift, local=local)


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx
