"""Smooth random fields and axis-aligned grids in world (RAS, mm) coordinates.

Every random field of the phantom (anatomical deformation, bias field, tissue texture) is a cubic
B-spline over a coarse control lattice fixed in millimetres. Evaluating it on a grid is separable
(three small matrix products), so it is cheap even on a 1 mm BraTS box, and the same case drawn at
another resolution gets the same field (a case looks alike at 4 mm and at 1 mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "SmoothField", "random_field"]

# Mean of sum_j B3(t - j)^2 over t: the variance a unit-variance lattice keeps per axis after
# B-spline smoothing (integral of B3^2 = 151/315). Used to give a field the std that was asked for.
_B3_VARIANCE_PER_AXIS = 151.0 / 315.0


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid in RAS world space.

    Args:
        shape: voxels per axis (x, y, z).
        spacing: voxel size in mm (isotropic).
        origin: world position (mm) of the centre of voxel (0, 0, 0).
    """

    shape: tuple[int, int, int]
    spacing: float
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-to-world affine (RAS+, voxel size on the diagonal)."""
        aff = np.eye(4)
        aff[:3, :3] *= self.spacing
        aff[:3, 3] = self.origin
        return aff

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates (mm) of voxel centres along x, y and z."""
        return tuple(  # type: ignore[return-value]
            (o + self.spacing * np.arange(n)).astype(np.float64) for o, n in zip(self.origin, self.shape)
        )

    def world(self, dtype: type = np.float32) -> np.ndarray:
        """Dense (3, X, Y, Z) world coordinates of every voxel centre."""
        ax = [a.astype(dtype) for a in self.axes()]
        out = np.empty((3, *self.shape), dtype=dtype)
        out[0] = ax[0][:, None, None]
        out[1] = ax[1][None, :, None]
        out[2] = ax[2][None, None, :]
        return out

    def to_index(self, world: np.ndarray) -> np.ndarray:
        """World coordinates (3, ...) -> fractional voxel indices (3, ...), in place when float32."""
        out = world if world.dtype == np.float32 else world.astype(np.float32)
        for a in range(3):
            out[a] -= self.origin[a]
            out[a] /= self.spacing
        return out

    def sub(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, slice, slice], Grid]:
        """The part of this grid inside the world box [lo, hi] (clipped): slices and sub-grid."""
        i0 = np.clip(np.floor((np.asarray(lo) - self.origin) / self.spacing), 0, self.shape).astype(int)
        i1 = np.clip(np.ceil((np.asarray(hi) - self.origin) / self.spacing) + 1, 0, self.shape).astype(int)
        i1 = np.maximum(i1, i0)
        slices = tuple(slice(int(a), int(b)) for a, b in zip(i0, i1))
        origin = tuple(float(o + self.spacing * a) for o, a in zip(self.origin, i0))
        return slices, Grid(tuple(int(b - a) for a, b in zip(i0, i1)), self.spacing, origin)  # type: ignore[arg-type]


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    out = np.zeros_like(t)
    near = t < 1.0
    far = (t >= 1.0) & (t < 2.0)
    out[near] = 2.0 / 3.0 - t[near] ** 2 + 0.5 * t[near] ** 3
    out[far] = (2.0 - t[far]) ** 3 / 6.0
    return out


@dataclass(frozen=True)
class SmoothField:
    """A C-channel cubic B-spline field: control values on a lattice fixed in world mm.

    Args:
        coeffs: (C, nx, ny, nz) control values.
        lo: world position (mm) of control point (0, 0, 0).
        spacing: control point spacing in mm.
    """

    coeffs: np.ndarray
    lo: tuple[float, float, float]
    spacing: float

    def _basis(self, axis: int, coords: np.ndarray) -> np.ndarray:
        t = (np.asarray(coords, dtype=np.float64) - self.lo[axis]) / self.spacing
        j = np.arange(self.coeffs.shape[1 + axis])
        return _bspline3(t[:, None] - j[None, :])

    def on_grid(self, grid: Grid) -> np.ndarray:
        """Evaluate on every voxel of `grid`: (C, X, Y, Z) float32."""
        bx, by, bz = (self._basis(a, ax) for a, ax in enumerate(grid.axes()))
        c = self.coeffs
        tmp = np.einsum("cijk,zk->cijz", c, bz)
        tmp = np.einsum("cijz,yj->ciyz", tmp, by)
        # The last contraction is the big one: a BLAS matmul over the flattened (C, Y, Z) block.
        n_c, n_i = tmp.shape[:2]
        flat = tmp.transpose(1, 0, 2, 3).reshape(n_i, -1)
        out = (bx @ flat).reshape(len(bx), n_c, *tmp.shape[2:]).transpose(1, 0, 2, 3)
        return np.ascontiguousarray(out, dtype=np.float32)

    def at(self, points: np.ndarray) -> np.ndarray:
        """Evaluate at world points (N, 3): (N, C)."""
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        bx, by, bz = (self._basis(a, points[:, a]) for a in range(3))
        return np.einsum("cijk,ni,nj,nk->nc", self.coeffs, bx, by, bz)


def random_field(
    rng: np.random.Generator,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    spacing_mm: float,
    std: float,
    channels: int = 1,
) -> SmoothField:
    """A zero-mean smooth random field over the world box [lo, hi] with roughly `std` spread.

    Args:
        rng: random generator (the only source of randomness).
        lo: world corner (3,) of the box the field must cover.
        hi: opposite world corner (3,).
        spacing_mm: control point spacing; features are about this size.
        std: target standard deviation of the field values.
        channels: number of independent channels (3 for a displacement field).
    """
    lo = np.asarray(lo, dtype=np.float64) - spacing_mm
    hi = np.asarray(hi, dtype=np.float64) + spacing_mm
    n = np.ceil((hi - lo) / spacing_mm).astype(int) + 2
    gain = 1.0 / np.sqrt(_B3_VARIANCE_PER_AXIS**3)
    coeffs = rng.standard_normal((channels, *n)) * (std * gain)
    return SmoothField(coeffs=coeffs, lo=tuple(float(v) for v in lo), spacing=float(spacing_mm))  # type: ignore[arg-type]
