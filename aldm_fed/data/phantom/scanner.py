"""Site / scanner profiles and the acquisition chain applied to a noise-free image.

A profile fixes what makes one hospital's images differ from another's: field strength (tissue T1
grows with it), the sequence timings of each contrast, the gadolinium dose, a smooth multiplicative
bias field (coil sensitivity), the noise level (Rician, as in magnitude images), the slice
thickness (blur along the slice axis), the skull stripping of its pipeline (how much non-brain
tissue it leaves) and the scanner's integer intensity scale and offset. Three default profiles
(sites A, B, C) differ in all of these, so a model trained on one site sees a real domain shift at
another.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from aldm_fed.data.phantom.fields import Grid, random_field

__all__ = ["DEFAULT_PROFILES", "MODALITIES", "ScannerProfile", "Sequence", "acquire", "bias_field",
           "residual_non_brain"]

# BraTS 2023 file suffixes, in the order they are written: T1, T1ce, T2, FLAIR.
MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
_AXES = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class Sequence:
    """Timing of one pulse sequence.

    Args:
        kind: "se" (spin echo: S = PD (1 - e^(-TR/T1)) e^(-TE/T2)) or "ir" (inversion recovery,
            magnitude: S = PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2); FLAIR, MPRAGE-like T1).
        tr_ms: repetition time.
        te_ms: echo time.
        ti_ms: inversion time ("ir" only).
    """

    kind: str
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None

    def check(self, where: str) -> None:
        if self.kind not in ("se", "ir"):
            raise ValueError(f"{where}.kind: must be 'se' or 'ir', got {self.kind!r}")
        for key in ("tr_ms", "te_ms"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{where}.{key}: must be > 0, got {getattr(self, key)!r}")
        if self.kind == "ir" and not (self.ti_ms is not None and 0 < self.ti_ms < self.tr_ms):
            raise ValueError(f"{where}.ti_ms: an 'ir' sequence needs 0 < ti_ms < tr_ms, got {self.ti_ms!r}")


@dataclass(frozen=True)
class ScannerProfile:
    """One site's scanner and protocol.

    Args:
        name: profile name.
        field_t: main field in tesla (tissue T1 scales as B^gamma).
        t1n: T1-weighted sequence (pre-contrast).
        t1c: T1-weighted sequence after gadolinium.
        t2w: T2-weighted sequence.
        t2f: FLAIR sequence (inversion recovery nulling CSF).
        gd_dose: gadolinium dose relative to a standard 0.1 mmol/kg injection.
        bias: standard deviation of the log bias field (0.2: about +-20 % shading).
        noise: Rician noise sigma as a fraction of the mean brain signal.
        slice_mm: slice thickness; blurs along `slice_axis` when thicker than the voxels.
        slice_axis: "x" (sagittal), "y" (coronal) or "z" (axial acquisition).
        scale: stored integer value of unit signal (scanners scale arbitrarily).
        offset: constant added inside the brain.
        strip_margin_mm: the site's skull stripping leaves patches of non-brain tissue (scalp and
            marrow fat, dura) up to this far outside the brain; 0 is a clean BraTS-style strip.
    """

    name: str
    field_t: float
    t1n: Sequence
    t1c: Sequence
    t2w: Sequence
    t2f: Sequence
    gd_dose: float = 1.0
    bias: float = 0.2
    noise: float = 0.03
    slice_mm: float = 1.0
    slice_axis: str = "z"
    scale: float = 1000.0
    offset: float = 0.0
    strip_margin_mm: float = 0.0

    def sequence(self, modality: str) -> Sequence:
        return getattr(self, modality)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, where: str) -> None:
        """Raise ValueError naming the key of the first bad setting."""
        for key in ("field_t", "scale"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{where}.{key}: must be > 0, got {getattr(self, key)!r}")
        for key in ("gd_dose", "bias", "noise", "offset", "strip_margin_mm"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{where}.{key}: must be >= 0, got {getattr(self, key)!r}")
        if not self.slice_mm > 0:
            raise ValueError(f"{where}.slice_mm: must be > 0, got {self.slice_mm!r}")
        if self.slice_axis not in _AXES:
            raise ValueError(f"{where}.slice_axis: must be one of x, y, z, got {self.slice_axis!r}")
        for m in MODALITIES:
            self.sequence(m).check(f"{where}.{m}")

    @classmethod
    def from_mapping(cls, name: str, raw: Mapping[str, Any], base: ScannerProfile | None, where: str) -> ScannerProfile:
        """Build a profile from `raw`, filling unspecified keys from `base`.

        Args:
            name: profile name.
            raw: settings (sequence entries may be partial mappings).
            base: profile to start from (None: every key is required).
            where: config path for error messages (e.g. "phantom.profiles.D").
        """
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = set(raw) - fields - {"base"}
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown key; expected one of {sorted(fields)}")
        values: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
        values["name"] = name
        for key, val in raw.items():
            if key == "base":
                continue
            if key in MODALITIES:
                if not isinstance(val, Mapping):
                    raise ValueError(f"{where}.{key}: must be a mapping of kind/tr_ms/te_ms/ti_ms")
                seq_fields = {f.name for f in dataclasses.fields(Sequence)}
                bad = set(val) - seq_fields
                if bad:
                    raise ValueError(f"{where}.{key}.{sorted(bad)[0]}: unknown key; expected one of {sorted(seq_fields)}")
                values[key] = {**(values.get(key) or {}), **dict(val)}
            else:
                values[key] = val
        missing = fields - set(values)
        if missing:
            raise ValueError(f"{where}.{sorted(missing)[0]}: missing (a new profile needs every key or a 'base')")
        for m in MODALITIES:
            seq = dict(values[m])
            values[m] = Sequence(
                kind=str(seq.get("kind", "")),
                tr_ms=_number(seq.get("tr_ms"), f"{where}.{m}.tr_ms"),
                te_ms=_number(seq.get("te_ms"), f"{where}.{m}.te_ms"),
                ti_ms=None if seq.get("ti_ms") is None else _number(seq["ti_ms"], f"{where}.{m}.ti_ms"),
            )
        for key in ("field_t", "gd_dose", "bias", "noise", "slice_mm", "scale", "offset", "strip_margin_mm"):
            values[key] = _number(values[key], f"{where}.{key}")
        values["slice_axis"] = str(values["slice_axis"])
        profile = cls(**values)
        profile.check(where)
        return profile


def _number(val: Any, where: str) -> float:
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise ValueError(f"{where}: must be a number, got {val!r}")
    return float(val)


def _mprage(ti: float = 900.0) -> Sequence:
    return Sequence("ir", tr_ms=2000.0, te_ms=3.0, ti_ms=ti)


DEFAULT_PROFILES: dict[str, ScannerProfile] = {
    # A: modern 3 T research scanner: 3D MPRAGE-like T1, thin slices, low noise, mild shading.
    "A": ScannerProfile(
        name="A",
        field_t=3.0,
        t1n=_mprage(),
        t1c=_mprage(),
        t2w=Sequence("se", tr_ms=5000.0, te_ms=100.0),
        t2f=Sequence("ir", tr_ms=9000.0, te_ms=120.0, ti_ms=2500.0),
        gd_dose=1.0,
        bias=0.10,
        noise=0.02,
        slice_mm=1.0,
        slice_axis="z",
        scale=1000.0,
        offset=0.0,
    ),
    # B: older 1.5 T hospital scanner: 2D spin-echo T1, 5 mm axial slices, noisy, strong shading.
    "B": ScannerProfile(
        name="B",
        field_t=1.5,
        t1n=Sequence("se", tr_ms=500.0, te_ms=12.0),
        t1c=Sequence("se", tr_ms=500.0, te_ms=12.0),
        t2w=Sequence("se", tr_ms=4000.0, te_ms=90.0),
        t2f=Sequence("ir", tr_ms=8000.0, te_ms=110.0, ti_ms=2200.0),
        gd_dose=1.0,
        bias=0.30,
        noise=0.05,
        slice_mm=5.0,
        slice_axis="z",
        scale=400.0,
        offset=20.0,
    ),
    # C: the unseen hospital, a 3 T scanner of another vendor with an older clinical protocol:
    # spin-echo T1 (flatter grey/white contrast), 2D FLAIR with a short TR whose inversion time
    # leaves CSF partly unnulled, reduced contrast dose, 5 mm coronal slices, accelerated and so
    # noisier acquisitions, strong uncorrected coil shading, a skull stripping that leaves patches
    # of scalp fat and dura (up to 6 mm), and a different integer scale.
    "C": ScannerProfile(
        name="C",
        field_t=3.0,
        t1n=Sequence("se", tr_ms=700.0, te_ms=10.0),
        t1c=Sequence("se", tr_ms=700.0, te_ms=10.0),
        t2w=Sequence("se", tr_ms=3500.0, te_ms=85.0),
        t2f=Sequence("ir", tr_ms=6000.0, te_ms=90.0, ti_ms=2400.0),
        gd_dose=0.8,
        bias=0.40,
        noise=0.06,
        slice_mm=5.0,
        slice_axis="y",
        scale=2500.0,
        offset=100.0,
        strip_margin_mm=6.0,
    ),
}


def bias_field(grid: Grid, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray | None:
    """A smooth multiplicative coil-sensitivity field on `grid` (None when the profile has none).

    One per case: the contrasts of a session share the coil, so they share its shading.

    Args:
        grid: the image grid.
        profile: the site's scanner (`bias` is the std of the log field).
        rng: the case's scanner random generator.
    """
    if profile.bias <= 0:
        return None
    lo = np.asarray(grid.origin)
    hi = lo + (np.asarray(grid.shape) - 1) * grid.spacing
    # Coil shading varies slowly (tens of cm); a smooth log-field keeps it positive.
    return np.exp(random_field(rng, lo, hi, spacing_mm=70.0, std=profile.bias).on_grid(grid)[0])


def residual_non_brain(brain: np.ndarray, grid: Grid, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray | None:
    """Share (0..1) of fat-like non-brain tissue per voxel that the site's skull stripping keeps.

    Skull-stripping tools differ: some leave scalp and marrow fat, dura and sinus tissue in patches
    around the brain (bright on T1, T2 and FLAIR: fat is not nulled by FLAIR's inversion). The kept
    shell reaches up to `profile.strip_margin_mm` outside the brain, thicker in some places than
    others; within it, fat mixes with dark bone. None when the profile strips cleanly.

    Args:
        brain: boolean brain mask on `grid`.
        grid: the image grid.
        profile: the site's scanner and pipeline.
        rng: the case's random generator for it.
    """
    if profile.strip_margin_mm <= 0:
        return None
    outside_mm = ndi.distance_transform_edt(~brain) * grid.spacing
    lo = np.asarray(grid.origin)
    hi = lo + (np.asarray(grid.shape) - 1) * grid.spacing
    fields = random_field(rng, lo, hi, spacing_mm=30.0, std=0.5, channels=2).on_grid(grid)
    reach = profile.strip_margin_mm * np.clip(0.5 + fields[0], 0.0, 1.0)  # patches, not a uniform rim
    fat = np.clip(0.65 + fields[1], 0.2, 1.0)                              # fat vs bone within the shell
    return np.where((outside_mm > 0) & (outside_mm <= reach), fat, 0.0).astype(np.float32)


def acquire(
    clean: np.ndarray,
    brain: np.ndarray,
    grid: Grid,
    profile: ScannerProfile,
    rng: np.random.Generator,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """Turn a noise-free signal image into what the site's scanner stores.

    Slice-profile blur, then bias field, then Rician noise, then skull stripping (0 outside the
    brain, as in BraTS), then the scanner's integer scaling.

    Args:
        clean: noise-free signal (float, any scale) on `grid`.
        brain: boolean mask of what the skull stripping keeps on `grid` (the brain, plus any
            `residual_non_brain` tissue).
        grid: the image grid.
        profile: the site's scanner.
        rng: random generator for this image (noise, small per-series jitter of noise and scale).
        bias: multiplicative bias field on `grid` (`bias_field`); None for none.

    Returns:
        int16 image on `grid`.
    """
    img = clean.astype(np.float32, copy=True)
    # Thick slices average over slice_mm; the voxels already cover `spacing`, so blur the rest.
    extra = math.sqrt(max(profile.slice_mm**2 - grid.spacing**2, 0.0))
    if extra > 0:
        sigma = extra / (2.0 * math.sqrt(2.0 * math.log(2.0))) / grid.spacing
        img = ndi.gaussian_filter1d(img, sigma, axis=_AXES[profile.slice_axis], mode="constant")
    if bias is not None:
        img *= bias
    inside = brain.astype(bool)
    level = float(img[inside].mean()) if inside.any() else 1.0
    sigma_n = profile.noise * level * rng.uniform(0.85, 1.15)
    if sigma_n > 0:
        # Magnitude of a complex signal with Gaussian noise in both channels: Rician.
        re = img + sigma_n * rng.standard_normal(img.shape, dtype=np.float32)
        im = sigma_n * rng.standard_normal(img.shape, dtype=np.float32)
        img = np.sqrt(re * re + im * im)
    scale = profile.scale * rng.uniform(0.97, 1.03)
    out = np.where(inside, img * scale + profile.offset, 0.0)
    return np.clip(np.rint(out), 0, np.iinfo(np.int16).max).astype(np.int16)
