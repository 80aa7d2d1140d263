"""Simulate phantom cases and write a multi-site cohort (BraTS 2023 naming) that resumes.

One case: deform the reference brain, grow a tumour in it, push the tissue aside (mass effect),
render four contrasts with the site's scanner, and store int16 images plus a uint8 segmentation in
the BraTS box. Every random draw of a case comes from a seed derived from (seed, site, index), so
a case never depends on how many others are made, and the same seed gives identical arrays.

The cohort folder follows docs/contracts.md. Case folders are written atomically; their NIfTI
headers carry a hash of everything that decides the case, so a rerun skips complete cases made
with the same settings and refuses (ValueError) to overwrite cases made with other settings.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from aldm_fed.data.manifest import make_manifest, write_manifest
from aldm_fed.data.phantom.anatomy import ReferenceAnatomy, random_deformation, reference_anatomy
from aldm_fed.data.phantom.config import PhantomConfig
from aldm_fed.data.phantom.contrast import render, tissue_signals
from aldm_fed.data.phantom.fields import Grid, random_field
from aldm_fed.data.phantom.scanner import MODALITIES, ScannerProfile, acquire, bias_field, residual_non_brain
from aldm_fed.data.phantom.tumour import LABELS, MassEffect, grow_tumour, tumour_compartments
from aldm_fed.io import atomic_dir, atomic_save_nifti, atomic_write_json, atomic_write_text

__all__ = ["CohortSummary", "PhantomCase", "case_grade", "case_id", "make_cohort", "simulate_case"]

# Bump when the simulation changes: old cases then no longer match and a rerun says so.
GENERATOR_FORMAT = 1
_TAG = "aldm-fed phantom"
_SUFFIXES = (*MODALITIES, "seg")


def case_id(site: str, index: int) -> str:
    """Case id, unique across sites: PH-<site>-<index:04d>."""
    return f"PH-{site}-{index:04d}"


def case_grade(index: int, hgg_fraction: float) -> str:
    """Grade of the index-th case of a site: HGG exactly when the running HGG quota steps up.

    Every prefix of a site's cases holds round-up(n x hgg_fraction) HGG cases, so grades are
    balanced however many cases are made, and a case's grade never depends on the total.
    """
    step = lambda i: math.ceil(round(i * hgg_fraction, 9))  # noqa: E731 - round() kills 0.3*10 drift
    return "HGG" if step(index + 1) > step(index) else "LGG"


@dataclass
class PhantomCase:
    """One simulated case, in the BraTS box.

    Args:
        case_id: PH-<site>-<index>.
        site: site name.
        index: index of the case within its site.
        grade: "HGG" or "LGG".
        images: modality (t1n, t1c, t2w, t2f) -> int16 volume.
        seg: uint8 labels 0 background, 1 NCR, 2 ED, 3 ET.
        affine: 4x4 RAS voxel-to-world affine (voxel size on the diagonal).
        white_matter: healthy white matter (fraction > 0.9, outside the tumour), for checks.
        info: tumour centre, sizes and simulation steps.
    """

    case_id: str
    site: str
    index: int
    grade: str
    images: dict[str, np.ndarray]
    seg: np.ndarray
    affine: np.ndarray
    white_matter: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _case_seed(seed: int, site: str, index: int) -> np.random.SeedSequence:
    # crc32, not hash(): Python's str hash changes between processes.
    return np.random.SeedSequence([int(seed), zlib.crc32(site.encode("utf-8")), int(index)])


def simulate_case(
    cfg: PhantomConfig,
    site: str,
    index: int,
    *,
    seed: int = 0,
    profile: ScannerProfile | None = None,
) -> PhantomCase:
    """Simulate one case of `site` (nothing is written).

    Args:
        cfg: cohort settings.
        site: a site of `cfg`.
        index: case index within the site (decides id, grade and random stream).
        seed: cohort seed.
        profile: render with this scanner instead of the site's own; anatomy and tumour stay the
            same (their random streams do not depend on the scanner), which isolates site effects.
    """
    spec = cfg.site(site)
    profile = profile or cfg.profiles[spec.profile]
    grade = case_grade(index, cfg.hgg_fraction)
    rng_anat, rng_tumour, rng_texture, rng_scan = (
        np.random.default_rng(s) for s in _case_seed(seed, site, index).spawn(4)
    )
    ref = reference_anatomy(cfg.resolution_mm)
    grid = ref.grid

    # 1. Anatomy: this case's brain is the reference seen through a random smooth deformation.
    deform = random_deformation(rng_anat, ref, cfg.anatomy)

    # 2. Tumour: seed deep in white matter, grow by reaction-diffusion in the deformed brain.
    gspec = cfg.tumour.grades[grade]
    seed_ref = ref.seed_candidates[rng_tumour.integers(len(ref.seed_candidates))]
    seed_ref = seed_ref + rng_tumour.uniform(-0.5, 0.5, 3) * ref.grid.spacing
    centre = deform.invert_point(seed_ref)

    def tissue(g: Grid) -> tuple[np.ndarray, np.ndarray]:
        pts = g.world(np.float32) + deform.on_grid(g)
        maps = ref.sample(pts, ("wm", "gm"))
        return maps["wm"], maps["gm"]

    tum = grow_tumour(rng_tumour, centre, tissue, gspec, cfg.tumour, resolution_mm=cfg.resolution_mm)
    mass = MassEffect(centre=tum.centre, radius_mm=rng_tumour.uniform(*gspec.mass_effect) * tum.core_radius_mm)

    # 3. Mass effect + deformation, as one backward map from case voxels to reference points.
    pre = grid.world(np.float32)
    pre -= mass.displacement(pre, ref.depth_mm)
    region, _ = grid.sub(*_grid_bounds(tum.grid))
    tum_idx = tum.grid.to_index(pre[(slice(None), *region)].copy())
    fields = {
        name: ndi.map_coordinates(getattr(tum, name), tum_idx, order=1, mode="constant", cval=0.0)
        for name in ("u", "oedema", "necrosis", "enhancing")
    }
    del tum_idx
    pre += deform.on_grid(grid)
    healthy = ref.sample(pre)  # consumes `pre`
    del pre
    brain = healthy.pop("brain") > 0.5
    seg_sub, tumour_fracs = tumour_compartments(
        fields["u"], fields["oedema"], fields["necrosis"], fields["enhancing"], cfg.tumour
    )
    seg_sub[~brain[region]] = 0
    for name in tumour_fracs:
        tumour_fracs[name][~brain[region]] = 0.0

    # 4. Contrast: tissue fractions x per-site signals, with a little texture so tissue is not flat.
    lo = np.asarray(grid.origin)
    hi = lo + (np.asarray(grid.shape) - 1) * grid.spacing
    texture = 1.0 + random_field(rng_texture, lo, hi, spacing_mm=6.0, std=0.03).on_grid(grid)[0]
    _, sub_grid = grid.sub(*_grid_bounds(tum.grid))
    sub_lo = np.asarray(sub_grid.origin)
    sub_hi = sub_lo + (np.asarray(sub_grid.shape) - 1) * grid.spacing
    tumour_texture = 1.0 + random_field(rng_texture, sub_lo, sub_hi, spacing_mm=4.0, std=0.08).on_grid(sub_grid)[0]
    np.clip(tumour_texture, 0.5, 1.5, out=tumour_texture)

    # 5. Scanner: slice blur, coil shading (shared by the session), Rician noise, skull strip (with
    #    what non-brain tissue the site's stripping leaves), integer scale.
    bias = bias_field(grid, profile, rng_scan)
    # Its own stream, drawn only where the site leaves tissue: the other sites' cases stay as they were.
    residue = residual_non_brain(brain, grid, profile, rng_scan.spawn(1)[0]) if profile.strip_margin_mm > 0 else None
    kept = brain if residue is None else brain | (residue > 0)
    images: dict[str, np.ndarray] = {}
    for modality, stream in zip(MODALITIES, rng_scan.spawn(len(MODALITIES))):
        signals = tissue_signals(profile, modality)
        clean = render(healthy, tumour_fracs, region, signals, texture, tumour_texture)
        if residue is not None:
            clean += np.float32(signals["fat"]) * residue * texture
        images[modality] = _in_box(ref, acquire(clean, kept, grid, profile, stream, bias), np.int16)

    seg = np.zeros(grid.shape, dtype=np.uint8)
    seg[region] = seg_sub
    white = (healthy["wm"] > 0.9) & (seg == 0) & brain
    return PhantomCase(
        case_id=case_id(site, index),
        site=site,
        index=index,
        grade=grade,
        images=images,
        seg=_in_box(ref, seg, np.uint8),
        affine=ref.box.affine,
        white_matter=_in_box(ref, white, bool),
        info={
            "centre_mm": [round(float(v), 2) for v in tum.centre],
            "core_radius_mm": round(tum.core_radius_mm, 2),
            "mass_effect_mm": round(mass.radius_mm, 2),
            "steps": tum.steps,
        },
    )


def _grid_bounds(g: Grid) -> tuple[np.ndarray, np.ndarray]:
    lo = np.asarray(g.origin)
    return lo, lo + (np.asarray(g.shape) - 1) * g.spacing


def _in_box(ref: ReferenceAnatomy, crop_arr: np.ndarray, dtype: type) -> np.ndarray:
    out = np.zeros(ref.box.shape, dtype=dtype)
    out[ref.crop] = crop_arr
    return out


@dataclass
class CohortSummary:
    """What `make_cohort` did.

    Args:
        out_dir: the cohort folder.
        sites: site names.
        n_cases: cases per site (made now or kept from before).
        files_written: every file written by this call.
        skipped: case ids found complete and kept (resume).
        seconds: wall time of the call.
    """

    out_dir: Path
    sites: list[str]
    n_cases: dict[str, int]
    files_written: list[Path]
    skipped: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "sites": list(self.sites),
            "n_cases": dict(self.n_cases),
            "files_written": [str(p) for p in self.files_written],
            "skipped": list(self.skipped),
            "seconds": round(self.seconds, 3),
        }


def make_cohort(out_dir: str | Path, cfg: PhantomConfig, *, seed: int = 0, progress: bool = True) -> CohortSummary:
    """Write (or complete) a phantom cohort under `out_dir`.

    Args:
        out_dir: cohort folder (created if needed). Rerunning into it skips complete cases.
        cfg: validated settings (`PhantomConfig.from_mapping`); a plain mapping is validated here.
        seed: cohort seed; per-case seeds derive from (seed, site, index).
        progress: show a tqdm bar over cases.

    Raises:
        ValueError: bad settings, or `out_dir` holds a case made with other settings (the message
            names it; nothing is overwritten).
    """
    t0 = time.perf_counter()
    if not isinstance(cfg, PhantomConfig):
        cfg = PhantomConfig.from_mapping(cfg)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Plan every case and check what is on disk before writing anything.
    plan = [
        _Planned(
            site=site.name,
            index=index,
            case_id=case_id(site.name, index),
            grade=case_grade(index, cfg.hgg_fraction),
            folder=out / site.name / case_id(site.name, index),
            tag=f"{_TAG} {_case_hash(cfg, site.name, index, seed)}",
        )
        for site in cfg.sites
        for index in range(site.n_cases)
    ]
    todo = [p for p in plan if not _is_complete(p.folder, p.case_id, p.tag)]
    todo_ids = {p.case_id for p in todo}
    skipped = [p.case_id for p in plan if p.case_id not in todo_ids]
    planned_ids = {p.case_id for p in plan}
    stale = sorted(d.name for s in cfg.sites for d in (out / s.name).glob("PH-*") if d.is_dir() and d.name not in planned_ids)
    if stale:
        # Left alone (nothing written is deleted), but loaders that scan folders would find them.
        warnings.warn(
            f"{out}: {len(stale)} case folder(s) not in this configuration (e.g. {stale[0]}); they are"
            " not in labels.csv or the manifests",
            stacklevel=2,
        )

    written: list[Path] = []
    changed_sites: set[str] = set()
    from tqdm.auto import tqdm

    with tqdm(total=len(plan), initial=len(skipped), disable=not progress, desc="phantom", unit="case") as bar:
        for p in todo:
            bar.set_postfix_str(p.case_id)
            case = simulate_case(cfg, p.site, p.index, seed=seed)
            written += _write_case(case, p.folder, p.tag)
            changed_sites.add(p.site)
            bar.update(1)

    # Cohort-level files: cheap, rewritten every call so they always describe the whole cohort.
    rows = [(p.case_id, p.site, p.grade) for p in plan]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", "site", "grade"])
    writer.writerows(rows)
    atomic_write_text(out / "labels.csv", buf.getvalue())
    written.append(out / "labels.csv")

    for site in cfg.sites:
        ids = [cid for cid, s, _ in rows if s == site.name]
        manifest = make_manifest(
            site.name,
            ids,
            k=site.n_target,
            n_source=site.n_source,
            n_test=site.n_test,
            n_val=site.n_val,
            n_oracle=site.n_oracle,
            labels={cid: {"grade": g} for cid, s, g in rows if s == site.name},
            label_column="grade",
            seed=seed,
            data_root=f"../{site.name}",
        )
        written.append(write_manifest(manifest, out / "manifests" / f"{site.name}.json"))

    from aldm_fed import __version__

    ref_box = reference_anatomy(cfg.resolution_mm).box
    cohort = {
        "generator": "aldm_fed.data.phantom",
        "format": GENERATOR_FORMAT,
        "version": __version__,
        "seed": seed,
        "geometry": {"shape": list(ref_box.shape), "resolution_mm": cfg.resolution_mm, "affine": ref_box.affine.tolist(), "space": "MNI152 (RAS)"},
        "modalities": {"t1n": "T1", "t1c": "T1ce", "t2w": "T2", "t2f": "FLAIR"},
        "labels": {str(v): k for k, v in LABELS.items()},
        "sites": {
            s.name: {"profile": s.profile, "n_cases": s.n_cases, "n_source": s.n_source, "n_target": s.n_target,
                     "n_val": s.n_val, "n_test": s.n_test, "n_oracle": s.n_oracle}
            for s in cfg.sites
        },
        "profiles": {s.name: cfg.profiles[s.profile].to_dict() for s in cfg.sites},
        "config": cfg.to_dict(),
    }
    atomic_write_json(out / "cohort.json", cohort)
    written.append(out / "cohort.json")

    for site in cfg.sites:
        png = out / "previews" / f"{site.name}.png"
        if cfg.preview_cases == 0 or (site.name not in changed_sites and png.is_file()):
            continue
        shown = [(p.case_id, p.grade, p.folder) for p in plan if p.site == site.name][: cfg.preview_cases]
        prof = cfg.profiles[site.profile]
        title = (
            f"site {site.name}: profile {site.profile}, {prof.field_t:g} T, {prof.slice_mm:g} mm slices"
            f" ({prof.slice_axis}), {cfg.resolution_mm:g} mm grid"
        )
        from aldm_fed.data.phantom.preview import write_montage

        written.append(write_montage(png, shown, title=title))

    return CohortSummary(
        out_dir=out,
        sites=[s.name for s in cfg.sites],
        n_cases={s.name: s.n_cases for s in cfg.sites},
        files_written=written,
        skipped=skipped,
        seconds=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class _Planned:
    site: str
    index: int
    case_id: str
    grade: str
    folder: Path
    tag: str  # NIfTI header description: generator + hash of the case's settings


def _case_hash(cfg: PhantomConfig, site: str, index: int, seed: int) -> str:
    """Hash of everything that decides one case's content (not the cohort's size)."""
    full = cfg.to_dict()
    profile = {k: v for k, v in cfg.profile_of(site).to_dict().items() if k != "name"}
    if profile.get("strip_margin_mm") == 0.0:  # added later; at its no-op value, older cases keep their hash
        del profile["strip_margin_mm"]
    key = {
        "format": GENERATOR_FORMAT,
        "seed": seed,
        "site": site,
        "index": index,
        "grade": case_grade(index, cfg.hgg_fraction),
        "resolution_mm": cfg.resolution_mm,
        "anatomy": full["anatomy"],
        "tumour": full["tumour"],
        "profile": profile,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _paths(folder: Path, cid: str) -> list[Path]:
    return [folder / f"{cid}-{s}.nii.gz" for s in _SUFFIXES]


def _is_complete(folder: Path, cid: str, tag: str) -> bool:
    """True when the case folder holds all files made with these settings.

    Raises:
        ValueError: a file there was made with other settings or not by this generator.
    """
    if not folder.is_dir():
        return False
    import nibabel as nib

    complete = True
    for path in _paths(folder, cid):
        if not path.is_file():
            complete = False
            continue
        try:
            found = nib.load(str(path)).header["descrip"].item().decode("ascii", "replace").strip("\x00 ")
        except Exception:  # noqa: BLE001 - an unreadable file is an incomplete case: regenerate it
            complete = False
            continue
        if found != tag:
            what = "other settings" if found.startswith(_TAG) else "something other than the phantom generator"
            raise ValueError(
                f"{path} was made by {what} (header {found!r}, expected {tag!r}); "
                "write to a new folder or delete the old cohort first (nothing was overwritten)"
            )
    return complete


def _write_case(case: PhantomCase, folder: Path, tag: str) -> list[Path]:
    import nibabel as nib

    arrays = {**case.images, "seg": case.seg}
    with atomic_dir(folder) as tmp:
        for suffix in _SUFFIXES:
            img = nib.Nifti1Image(arrays[suffix], case.affine)
            img.header.set_data_dtype(arrays[suffix].dtype)
            img.header.set_xyzt_units("mm")
            img.header["descrip"] = tag.encode("ascii")
            img.set_qform(case.affine, code=1)
            img.set_sform(case.affine, code=1)
            atomic_save_nifti(img, tmp / f"{case.case_id}-{suffix}.nii.gz")
    return _paths(folder, case.case_id)
