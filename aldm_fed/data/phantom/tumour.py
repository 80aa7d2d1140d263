"""Glioma growth: Fisher-Kolmogorov reaction-diffusion, tumour compartments and mass effect.

Tumour cell density u grows as du/dt = div(D grad u) + rho u (1 - u) with D = D_white in white
matter, D_white / d_ratio in grey matter and 0 in CSF and outside the brain (cells migrate along
white-matter tracts and do not cross the ventricles). The simulation runs on a coarse box around
the seed (grid_mm, 2 mm by default) until the visible tumour reaches a random target size; the
fields are then warped onto the image grid.

Compartments (BraTS labels): oedema / infiltration where u > oedema_threshold (label 2), solid core
where u > core_threshold. In high grade tumours the oldest part of the core (reached first by the
front) is necrotic (label 1) and the rest enhances (label 3, a rim). Low grade cores are
non-enhancing (label 1) with at most a small enhancing focus.

Mass effect: the tumour adds volume, pushing tissue radially outward (backward map
w -> c + (w - c) s(r)/r with s^3 = r^3 - R^3, which inserts a sphere of radius R at the centre),
tapered to zero near the brain surface so the skull does not move.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from aldm_fed.data.phantom.fields import Grid, random_field

__all__ = [
    "GRADES",
    "LABELS",
    "GradeSpec",
    "MassEffect",
    "TumourConfig",
    "TumourFields",
    "grow_tumour",
    "tumour_compartments",
]

GRADES: tuple[str, ...] = ("HGG", "LGG")
LABELS: dict[str, int] = {"NCR": 1, "ED": 2, "ET": 3}

# Proliferation rate (1/day). Only sets the time unit: the stop rule is the tumour size, and the
# front width sqrt(6 D / rho) is set through `infiltration_mm`.
_RHO = 0.1
_MAX_STEPS = 5000
# Vasogenic oedema level that counts as oedema (label 2).
_OEDEMA_LEVEL = 0.25


@dataclass(frozen=True)
class GradeSpec:
    """Random ranges ([low, high], drawn uniformly per case) for one tumour grade.

    Args:
        radius_mm: equivalent-sphere radius of the infiltrated region (u > oedema_threshold), before
            vasogenic oedema and mass effect; growth stops when it is reached.
        infiltration_mm: width of the infiltrative front sqrt(6 D_white / rho) in white matter;
            wider fronts give more infiltrated tissue around a smaller core.
        oedema_mm: how far vasogenic oedema spreads from the core through white matter (0: none).
        necrosis: fraction of the core's growth history that became necrotic (0: none).
        mass_effect: radius of the inserted volume as a fraction of the core radius.
        enhancing_prob: probability that the non-necrotic core enhances at all.
        enhancing_fraction: fraction of the non-necrotic core that enhances when it does
            (1: all of it, a rim around the necrosis; small: a focus).
    """

    radius_mm: tuple[float, float]
    infiltration_mm: tuple[float, float]
    oedema_mm: tuple[float, float]
    necrosis: tuple[float, float]
    mass_effect: tuple[float, float]
    enhancing_prob: float
    enhancing_fraction: tuple[float, float]


def _default_grades() -> dict[str, GradeSpec]:
    return {
        # Glioblastoma-like: large, necrotic centre, enhancing rim, clear mass effect.
        "HGG": GradeSpec(
            radius_mm=(14.0, 24.0),
            infiltration_mm=(4.0, 7.0),
            oedema_mm=(10.0, 24.0),
            necrosis=(0.3, 0.65),
            mass_effect=(0.5, 0.9),
            enhancing_prob=1.0,
            enhancing_fraction=(1.0, 1.0),
        ),
        # Diffuse low grade: infiltrative (wider front), no necrosis, little or no enhancement.
        "LGG": GradeSpec(
            radius_mm=(16.0, 28.0),
            infiltration_mm=(7.0, 11.0),
            oedema_mm=(0.0, 4.0),
            necrosis=(0.0, 0.0),
            mass_effect=(0.2, 0.5),
            enhancing_prob=0.2,
            enhancing_fraction=(0.03, 0.1),
        ),
    }


@dataclass(frozen=True)
class TumourConfig:
    """Tumour model settings.

    Args:
        grid_mm: voxel size of the reaction-diffusion grid (the image grid if that is coarser).
        d_ratio: D_white / D_grey (literature: ~10; CSF is always 0).
        oedema_threshold: u above which tissue is oedema / infiltrated (whole tumour).
        core_threshold: u above which tissue is solid tumour core.
        grades: per-grade random ranges.
    """

    grid_mm: float = 2.0
    d_ratio: float = 10.0
    oedema_threshold: float = 0.2
    core_threshold: float = 0.6
    grades: dict[str, GradeSpec] = field(default_factory=_default_grades)


@dataclass(frozen=True)
class TumourFields:
    """A grown tumour on its coarse grid (all arrays on `grid`).

    Args:
        grid: the reaction-diffusion grid (a box around the seed).
        u: tumour cell density in [0, 1].
        oedema: vasogenic oedema (fluid) level in [0, 1].
        necrosis: 1 where the core is necrotic (smoothed indicator).
        enhancing: 1 where the non-necrotic core enhances (smoothed indicator).
        centre: centre of the core (world mm; the seed when there is no core), where the mass
            effect pushes from.
        core_radius_mm: equivalent-sphere radius of the core (u > core_threshold).
        steps: reaction-diffusion steps taken.
    """

    grid: Grid
    u: np.ndarray
    oedema: np.ndarray
    necrosis: np.ndarray
    enhancing: np.ndarray
    centre: np.ndarray
    core_radius_mm: float
    steps: int


def grow_tumour(
    rng: np.random.Generator,
    centre: np.ndarray,
    tissue: Callable[[Grid], tuple[np.ndarray, np.ndarray]],
    grade: GradeSpec,
    cfg: TumourConfig,
    *,
    resolution_mm: float,
) -> TumourFields:
    """Grow one tumour from `centre` until it reaches a random size.

    Args:
        rng: the case's tumour random generator.
        centre: seed point (world mm), inside white matter.
        tissue: returns (white, grey) matter fractions on a grid (the case's anatomy).
        grade: random ranges for this grade.
        cfg: tumour settings.
        resolution_mm: image voxel size; the growth grid is never finer than it.
    """
    radius = rng.uniform(*grade.radius_mm)
    width = rng.uniform(*grade.infiltration_mm)
    oedema_len = rng.uniform(*grade.oedema_mm)
    necrosis_frac = rng.uniform(*grade.necrosis)
    enhances = rng.random() < grade.enhancing_prob
    enhancing_frac = rng.uniform(*grade.enhancing_fraction)
    h = max(float(cfg.grid_mm), float(resolution_mm))

    # A box big enough for the tumour, its front, the oedema and the mass effect's expansion.
    half = math.ceil((1.35 * radius + 2.0 * width + oedema_len + 2.0 * h) / h)
    grid = Grid(shape=(2 * half + 1,) * 3, spacing=h, origin=tuple(float(c - half * h) for c in centre))  # type: ignore[arg-type]
    lo = np.asarray(grid.origin)
    hi = lo + (np.asarray(grid.shape) - 1) * h
    wm, gm = tissue(grid)
    # Growth is uneven (tract density, vessels, hypoxia): smooth log-normal factors on D and rho
    # give irregular fronts instead of spheres. Bounded to [1/2, 2] so the stable step stays large.
    d_var, rho_var = (
        np.exp(np.clip(f, -0.7, 0.7))
        for f in random_field(rng, lo, hi, spacing_mm=10.0, std=0.5, channels=2).on_grid(grid)
    )
    d_white = width**2 * _RHO / 6.0
    diff = ((d_white * wm + d_white / cfg.d_ratio * gm) * d_var).astype(np.float32)
    rho = (_RHO * rho_var).astype(np.float32)
    faces = _face_diffusivity(diff)
    d_max = max(max(float(f.max()) for f in faces), 1e-6)
    # Explicit Euler: diffusion stability (h^2 / 6 D) and a reaction step well below 1 / rho.
    dt = min(0.9 * h * h / (6.0 * d_max), 0.5 / float(rho.max()))

    # Seed: a small blob of cells where there is brain tissue to live in. Values below 1e-3 are
    # cut so u has compact support: the explicit stencil then grows it by one voxel per step, and
    # each step only needs to touch the support's bounding box plus that growth (exact, and
    # several times faster than stepping the whole box).
    world = grid.world(np.float32)
    r2 = sum((world[a] - centre[a]) ** 2 for a in range(3))
    u = (0.5 * np.exp(-r2 / (2.0 * (1.5 * h) ** 2)) * ((wm + gm) > 0.3)).astype(np.float32)
    u[u < 1e-3] = 0.0
    if not u.any():  # seed on a tissue border: start from the seed voxel alone
        u[(half, half, half)] = 0.5
    del world, r2
    arrival = np.full(u.shape, np.inf, dtype=np.float32)
    target = 4.0 / 3.0 * math.pi * radius**3 / h**3  # voxels of infiltrated tissue
    t, steps = 0.0, 0
    refresh = 8
    while steps < _MAX_STEPS:
        if steps % refresh == 0:
            nz = np.argwhere(u > 0)
            win = tuple(
                slice(max(int(a) - refresh - 1, 0), min(int(b) + refresh + 2, n))
                for a, b, n in zip(nz.min(0), nz.max(0), u.shape)
            )
            uw, rw, aw = u[win], rho[win], arrival[win]
            fw = [
                f[tuple(slice(sl.start, sl.stop - 1) if i == ax else sl for i, sl in enumerate(win))]
                for ax, f in enumerate(faces)
            ]
        uw += dt * (_div_grad(uw, fw, h) + rw * uw * (1.0 - uw))  # views: updates u in place
        np.clip(uw, 0.0, 1.0, out=uw)
        t += dt
        steps += 1
        aw[(uw > cfg.core_threshold) & np.isinf(aw)] = t
        if np.count_nonzero(uw > cfg.oedema_threshold) >= target:
            break

    core = np.isfinite(arrival)
    core_radius = (3.0 * np.count_nonzero(core) / (4.0 * math.pi)) ** (1.0 / 3.0) * h
    necrotic = np.zeros(u.shape, dtype=bool)
    if necrosis_frac > 0 and core.any():
        wobble = random_field(rng, lo, hi, spacing_mm=8.0, std=0.3).on_grid(grid)[0]
        # The centre of the core dies (hypoxia): voxels deeper than (1 - necrosis) of the core's
        # maximal depth, the depth threshold wobbling so the necrosis has an irregular outline.
        depth = ndi.distance_transform_edt(core)
        necrotic = core & (depth > (1.0 - necrosis_frac) * depth.max() * (1.0 + wobble))
    enhancing = np.zeros(u.shape, dtype=bool)
    solid = core & ~necrotic
    if enhances and solid.any():
        if enhancing_frac >= 1.0:
            # Everything not necrotic; the core threshold draws the outer edge later. (Marking only
            # solid-core voxels would let the smoothing below erode a thin rim away.)
            enhancing = ~necrotic
        else:
            # A focus: the solid-core voxels nearest a random solid-core voxel (dilated by one
            # voxel for the same reason).
            pts = np.argwhere(solid)
            focus = pts[rng.integers(len(pts))]
            dist = np.sum((pts - focus) ** 2, axis=1)
            n = max(1, int(round(enhancing_frac * len(pts))))
            chosen = pts[np.argsort(dist, kind="stable")[:n]]
            enhancing[tuple(chosen.T)] = True
            enhancing = ndi.binary_dilation(enhancing) & ~necrotic
    # Vasogenic oedema leaks from the core (broken blood-brain barrier) and spreads through white
    # matter; grey matter absorbs it and CSF stops it, hence the finger-like shape up to the cortex.
    leak = core & ~necrotic if necrosis_frac > 0 else core
    oedema = _spread_in_white_matter(leak, wm, gm, oedema_len / h) if oedema_len > 0 else np.zeros_like(u)
    smooth = 0.7  # voxels: soft indicators interpolate to smooth compartment borders
    return TumourFields(
        grid=grid,
        u=u,
        oedema=oedema,
        necrosis=ndi.gaussian_filter(necrotic.astype(np.float32), smooth),
        enhancing=ndi.gaussian_filter(enhancing.astype(np.float32), smooth),
        centre=_centroid(grid, core if core.any() else u > cfg.oedema_threshold, fallback=centre),
        core_radius_mm=float(core_radius),
        steps=steps,
    )


def _spread_in_white_matter(source: np.ndarray, wm: np.ndarray, gm: np.ndarray, length_vox: float) -> np.ndarray:
    """Fluid spreading ~length_vox voxels from `source` through white matter, in [0, 1].

    Repeated unit Gaussian blurs (n blurs spread sqrt(n) voxels) with a per-step transmission that
    is 1 in white matter, lower in grey matter and 0 in CSF: a cheap absorbing diffusion.
    """
    if not source.any():
        return np.zeros(source.shape, dtype=np.float32)
    n = max(1, int(round(length_vox**2)))
    tissue = wm + gm
    # Per step: white matter passes everything, grey matter absorbs 3/n (e^-3 over the whole
    # spread), CSF-dominated voxels block.
    grey_share = gm / np.maximum(tissue, 1e-6)
    transmit = ((tissue > 0.5) * (1.0 - (3.0 / n) * grey_share)).astype(np.float32)
    e = source.astype(np.float32)
    for _ in range(n):
        e = ndi.gaussian_filter(e, 1.0, truncate=2.5) * transmit
        np.maximum(e, source, out=e)
    return e


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return (x * x * (3.0 - 2.0 * x)).astype(np.float32)


def _centroid(grid: Grid, mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    if not mask.any():
        return np.asarray(fallback, dtype=np.float64)
    return np.asarray(grid.origin) + np.argwhere(mask).mean(0) * grid.spacing


def _face_diffusivity(diff: np.ndarray) -> list[np.ndarray]:
    """Diffusivity on the faces between neighbours along each axis (harmonic mean).

    The harmonic mean is 0 when either side is 0, so no cells leak into CSF or out of the brain.
    """
    faces = []
    for axis in range(3):
        a = np.take(diff, np.arange(diff.shape[axis] - 1), axis=axis)
        b = np.take(diff, np.arange(1, diff.shape[axis]), axis=axis)
        faces.append((2.0 * a * b / (a + b + 1e-12)).astype(np.float32))
    return faces


def _div_grad(u: np.ndarray, faces: list[np.ndarray], h: float) -> np.ndarray:
    """div(D grad u) with no-flux borders (finite volumes on the faces)."""
    out = np.zeros_like(u)
    for axis, d_face in enumerate(faces):
        flux = np.diff(u, axis=axis) * d_face
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        out[tuple(lo)] += flux
        out[tuple(hi)] -= flux
    out /= h * h
    return out


@dataclass(frozen=True)
class MassEffect:
    """Radial push of tissue away from the tumour centre.

    Args:
        centre: tumour centre (world mm).
        radius_mm: radius of the sphere of volume the tumour inserts.
        taper_mm: displacement fades to 0 over this depth below the brain surface.
    """

    centre: np.ndarray
    radius_mm: float
    taper_mm: float = 15.0

    def displacement(self, world: np.ndarray, depth_mm: np.ndarray) -> np.ndarray:
        """delta (3, ...) such that the case point w shows the pre-mass-effect point w - delta.

        Args:
            world: (3, ...) world coordinates.
            depth_mm: (...) distance below the brain surface at those points.
        """
        rel = world - self.centre.reshape(3, *([1] * (world.ndim - 1))).astype(np.float32)
        r = np.sqrt(np.sum(rel * rel, axis=0))
        s = np.cbrt(np.maximum(r**3 - self.radius_mm**3, 0.0))
        shrink = np.where(r > 1e-6, 1.0 - s / np.maximum(r, 1e-6), 1.0)
        shrink *= np.clip(depth_mm / self.taper_mm, 0.0, 1.0)
        return (rel * shrink).astype(np.float32)


def tumour_compartments(
    u: np.ndarray, oedema: np.ndarray, necrosis: np.ndarray, enhancing: np.ndarray, cfg: TumourConfig
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """BraTS labels and soft tissue fractions of the tumour classes on the image grid.

    Args:
        u: tumour density warped to the image grid.
        oedema: vasogenic oedema level warped to the image grid.
        necrosis: necrosis indicator warped to the image grid.
        enhancing: enhancing indicator warped to the image grid.
        cfg: thresholds.

    Returns:
        seg (uint8, 0/1/2/3) and fractions {"oedema", "core", "necrosis", "enhancing"} in [0, 1]
        (their sum is the share of each voxel taken from healthy tissue).
    """
    whole = (u > cfg.oedema_threshold) | (oedema > _OEDEMA_LEVEL)
    core = u > cfg.core_threshold
    nec = core & (necrosis > 0.5)
    enh = core & ~nec & (enhancing > 0.5)
    solid = core & ~nec & ~enh
    seg = np.zeros(u.shape, dtype=np.uint8)
    seg[whole & ~core] = LABELS["ED"]
    seg[nec | solid] = LABELS["NCR"]  # BraTS label 1 is necrosis and non-enhancing core alike
    seg[enh] = LABELS["ET"]
    # Oedema fades out (no hard edge): its water share ramps up from half the label threshold and
    # is ~30 % at the label border, highest next to the core.
    t_ed, t_core = cfg.oedema_threshold, cfg.core_threshold
    infiltrated = _smoothstep((u - 0.5 * t_ed) / (t_core - 0.5 * t_ed))
    vasogenic = _smoothstep((oedema - 0.5 * _OEDEMA_LEVEL) / (1.0 - 0.5 * _OEDEMA_LEVEL))
    sigma = 0.5  # voxels: partial volume at the borders of the solid compartments
    fractions = {
        "core": ndi.gaussian_filter(solid.astype(np.float32), sigma),
        "necrosis": ndi.gaussian_filter(nec.astype(np.float32), sigma),
        "enhancing": ndi.gaussian_filter(enh.astype(np.float32), sigma),
    }
    solid_share = fractions["core"] + fractions["necrosis"] + fractions["enhancing"]
    water = 0.9 * np.maximum(infiltrated, vasogenic) ** 0.7
    fractions["oedema"] = (water * np.clip(1.0 - solid_share, 0.0, 1.0)).astype(np.float32)
    return seg, fractions
