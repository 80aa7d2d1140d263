"""BraTS-style case folders: naming schemes, discovery, loading to RAS with canonical labels.

Every common release is read (see docs/contracts.md for the canonical names):

| scheme      | files of case ID                                            | labels   |
|-------------|-------------------------------------------------------------|----------|
| `brats2021` | `ID/ID_{t1,t1ce,t2,flair,seg}.nii(.gz)` (also 2018-2020)     | 0/1/2/4  |
| `brats2023` | `ID/ID-{t1n,t1c,t2w,t2f,seg}.nii.gz` (2023+, GLI/SSA/PED/MEN) | 0/1/2/3  |
| `ucsf-pdgm` | `ID_nifti/ID_{T1,T1c,T2,FLAIR,tumor_segmentation}.nii.gz`    | 0/1/2/4  |

The scheme is detected per case folder from the file suffixes (or forced), case folders are found
anywhere below a root (`COHORT/A/<case>/`, `MICCAI_BraTS_2019/HGG/<case>/`), and every volume is
reoriented to RAS from its own header (`nibabel.as_closest_canonical`; no affine is ever assumed).
Labels are mapped to the canonical scheme 0 background, 1 NCR, 2 ED, 3 ET (legacy 4 -> 3).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

__all__ = [
    "CANONICAL_LABELS",
    "MODALITIES",
    "SCHEMES",
    "CaseFiles",
    "CaseInspection",
    "DataConfig",
    "DataError",
    "LoadedCase",
    "Scheme",
    "Volume",
    "detect_scheme",
    "find_cases",
    "get_scheme",
    "harmonise_labels",
    "inspect_case",
    "load_case",
    "read_nifti",
    "resolve_modalities",
]

MODALITIES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
CANONICAL_LABELS: tuple[int, ...] = (0, 1, 2, 3)  # background, NCR, ED, ET
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
MAX_VOXELS = 2**30  # a corrupt header must not make us allocate terabytes


class DataError(ValueError):
    """A case or file cannot be used. `str()` reads "<path>: <problem>".

    Args:
        path: the file (or folder) the problem is in; None when it concerns no single file.
        problem: what is wrong, in words.
        code: short slug for tables and tests (e.g. "unreadable", "missing-modality").
        case_id: the case, when known.
    """

    def __init__(self, path: str | os.PathLike[str] | None, problem: str, *, code: str = "error",
                 case_id: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem
        self.code = code
        self.case_id = case_id
        where = str(self.path) if self.path is not None else (case_id or "")
        super().__init__(f"{where}: {problem}" if where else problem)


# --------------------------------------------------------------------------------------------
# Naming schemes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """How one release names the files of a case, and what its label values mean.

    Args:
        name: scheme name used in configs (`data.scheme`).
        separator: between the case id and the suffix ("_" or "-").
        suffixes: canonical modality -> file suffix (e.g. {"t1c": "t1ce"}).
        seg_suffix: suffix of the tumour mask.
        label_map: label value in the files -> canonical label (0..3).
        folder_suffix: stripped from the folder name to get the case id (UCSF-PDGM: "_nifti").
        brain_suffix: suffix of a brain mask shipped with the case, if the release has one.
        description: which releases use it.
    """

    name: str
    separator: str
    suffixes: Mapping[str, str]
    seg_suffix: str
    label_map: Mapping[int, int]
    folder_suffix: str = ""
    brain_suffix: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.suffixes) - set(MODALITIES)
        if unknown:
            raise ValueError(f"scheme {self.name!r}: unknown modalities {sorted(unknown)}; expected {MODALITIES}")
        bad = {v for v in self.label_map.values() if v not in CANONICAL_LABELS}
        if bad:
            raise ValueError(f"scheme {self.name!r}: maps to non-canonical labels {sorted(bad)}")
        object.__setattr__(self, "suffixes", MappingProxyType(dict(self.suffixes)))
        object.__setattr__(self, "label_map", MappingProxyType(dict(self.label_map)))

    @property
    def roles(self) -> dict[str, str]:
        """Role (canonical modality, "seg", "brain") -> file suffix."""
        roles = dict(self.suffixes)
        roles["seg"] = self.seg_suffix
        if self.brain_suffix:
            roles["brain"] = self.brain_suffix
        return roles

    @property
    def allowed_labels(self) -> tuple[int, ...]:
        return tuple(sorted(self.label_map))

    def case_id(self, folder_name: str) -> str:
        sfx = self.folder_suffix
        if sfx and folder_name.endswith(sfx) and len(folder_name) > len(sfx):
            return folder_name[: -len(self.folder_suffix)]
        return folder_name

    def folder_name(self, case_id: str) -> str:
        return case_id + self.folder_suffix

    def file_name(self, case_id: str, role: str, ext: str = ".nii.gz") -> str:
        """File name of `role` (a canonical modality or "seg"/"brain") for `case_id`."""
        roles = self.roles
        if role not in roles:
            raise ValueError(f"scheme {self.name!r} has no role {role!r}; expected one of {sorted(roles)}")
        return f"{case_id}{self.separator}{roles[role]}{ext}"


_LEGACY = {0: 0, 1: 1, 2: 2, 4: 3}

SCHEMES: Mapping[str, Scheme] = MappingProxyType({
    s.name: s
    for s in (
        Scheme(
            name="brats2021",
            separator="_",
            suffixes={"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"},
            seg_suffix="seg",
            label_map=_LEGACY,
            description="BraTS 2018-2021 (2018/19 under HGG/ and LGG/)",
        ),
        Scheme(
            name="brats2023",
            separator="-",
            suffixes={"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"},
            seg_suffix="seg",
            label_map={0: 0, 1: 1, 2: 2, 3: 3},
            description="BraTS 2023+ (GLI, SSA, PED, MEN) and the aldm-fed phantom",
        ),
        Scheme(
            name="ucsf-pdgm",
            separator="_",
            suffixes={"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"},
            seg_suffix="tumor_segmentation",
            label_map=_LEGACY,
            folder_suffix="_nifti",
            brain_suffix="brain_segmentation",
            description="UCSF-PDGM v5",
        ),
    )
})

# Older names people may type for the same file layout.
_ALIASES = {"brats2018": "brats2021", "brats2019": "brats2021", "brats2020": "brats2021",
            "brats2024": "brats2023", "ucsf": "ucsf-pdgm", "ucsf_pdgm": "ucsf-pdgm"}


def get_scheme(name: str | Scheme) -> Scheme:
    """The scheme called `name` (aliases like "brats2020" are accepted)."""
    if isinstance(name, Scheme):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in SCHEMES:
        raise ValueError(f"unknown naming scheme {name!r}; expected 'auto' or one of {sorted(SCHEMES)}")
    return SCHEMES[key]


def resolve_modalities(modalities: Iterable[str] | None) -> tuple[str, ...]:
    """Check and order-preserve a modality selection (None: all four canonical ones)."""
    if modalities is None:
        return MODALITIES
    if isinstance(modalities, str):
        modalities = [modalities]
    if not isinstance(modalities, Iterable) or isinstance(modalities, Mapping):
        # a config value: ValueError, like every other bad data.* option (the CLI turns it into one line)
        raise ValueError(f"data.modalities must be a list of modality names, got {modalities!r}")  # noqa: TRY004
    mods = tuple(str(m).lower() for m in modalities)
    bad = [m for m in mods if m not in MODALITIES]
    if bad:
        raise ValueError(f"data.modalities: unknown modality name(s) {bad}; expected canonical names from {MODALITIES}")
    if not mods:
        raise ValueError("data.modalities is empty; pick at least one of t1, t1c, t2, flair")
    if len(set(mods)) != len(mods):
        raise ValueError(f"data.modalities {list(mods)} lists a modality twice")
    return mods


def _nifti_stem(name: str) -> str | None:
    lower = name.lower()
    for ext in NIFTI_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return None


def _match(stems: Mapping[str, str], scheme: Scheme) -> tuple[dict[str, list[str]], int]:
    """Role -> matching file names (exact-case matches first), and the number of exact matches."""
    found: dict[str, list[str]] = {}
    n_exact = 0
    for role, suffix in scheme.roles.items():
        tail = scheme.separator + suffix
        exact = sorted(n for n, stem in stems.items() if stem.endswith(tail) and len(stem) > len(tail))
        loose = sorted(
            n for n, stem in stems.items()
            if n not in exact and stem.lower().endswith(tail.lower()) and len(stem) > len(tail)
        )
        if exact or loose:
            found[role] = exact + loose
            n_exact += bool(exact)
    return found, n_exact


def _stems(folder: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    if names is None:
        names = [p.name for p in folder.iterdir() if p.is_file()]
    out = {}
    for name in names:
        if name.startswith("."):  # hidden files, macOS "._x.nii.gz" resource forks, our temporaries
            continue
        stem = _nifti_stem(name)
        if stem is not None:
            out[name] = stem
    return out


def _best_scheme(folder: Path, stems: Mapping[str, str], candidates: Sequence[Scheme]
                 ) -> tuple[Scheme, dict[str, list[str]]] | None:
    best = None
    best_key: tuple[int, int, int] | None = None
    for scheme in candidates:
        found, n_exact = _match(stems, scheme)
        n_data = sum(1 for r in found if r != "brain")
        if n_data == 0:
            continue
        key = (n_data, n_exact, int(bool(scheme.folder_suffix) and folder.name.endswith(scheme.folder_suffix)))
        if best_key is None or key > best_key:
            best, best_key = (scheme, found), key
    return best


def detect_scheme(case_dir: str | os.PathLike[str]) -> Scheme:
    """The naming scheme of one case folder, from its file suffixes.

    Ties (e.g. only `_t1`, `_t2`, `_flair` present) go to the scheme whose suffixes match the
    letter case exactly, then to the one whose folder suffix matches (`_nifti`).

    Raises:
        DataError: the folder has no file of any known scheme.
    """
    folder = Path(case_dir)
    if not folder.is_dir():
        raise DataError(folder, "not a folder", code="not-found")
    best = _best_scheme(folder, _stems(folder), list(SCHEMES.values()))
    if best is None:
        raise DataError(folder, "no NIfTI file named like any known scheme "
                        f"({', '.join(sorted(SCHEMES))}); e.g. ID-t1n.nii.gz or ID_t1.nii.gz",
                        code="unknown-scheme")
    return best[0]


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


@dataclass
class CaseFiles:
    """The files of one case folder.

    Args:
        case_id: folder name (without the scheme's folder suffix, e.g. UCSF's `_nifti`).
        scheme: the naming scheme the files follow.
        folder: the case folder.
        images: canonical modality -> file, for the modalities present.
        seg: the tumour mask, or None.
        missing: canonical modalities (and "seg") with no file.
        brain_mask: a brain mask shipped with the case (UCSF-PDGM), or None.
        duplicates: role -> every matching file, where more than one matched (the first is used).
        group: the parent folder relative to the search root ("HGG", "A"), None at the root.
    """

    case_id: str
    scheme: Scheme
    folder: Path
    images: dict[str, Path]
    seg: Path | None
    missing: list[str]
    brain_mask: Path | None = None
    duplicates: dict[str, list[Path]] = field(default_factory=dict)
    group: str | None = None

    def files(self) -> dict[str, Path]:
        """Role -> file for every file found (images, then "seg" and "brain")."""
        out = dict(self.images)
        if self.seg is not None:
            out["seg"] = self.seg
        if self.brain_mask is not None:
            out["brain"] = self.brain_mask
        return out


def _case_from(folder: Path, scheme: Scheme, found: Mapping[str, list[str]], group: str | None) -> CaseFiles:
    case_id = scheme.case_id(folder.name)
    chosen: dict[str, Path] = {}
    duplicates: dict[str, list[Path]] = {}
    for role, names in found.items():
        # Prefer the file named exactly <case_id><sep><suffix>; then .nii.gz over .nii.
        want = case_id + scheme.separator + scheme.roles[role]
        ordered = sorted(names, key=lambda n: (_nifti_stem(n) != want, not n.lower().endswith(".gz"), n))
        chosen[role] = folder / ordered[0]
        if len(ordered) > 1:
            duplicates[role] = [folder / n for n in ordered]
    images = {m: chosen[m] for m in MODALITIES if m in chosen}
    missing = [m for m in MODALITIES if m not in chosen] + ([] if "seg" in chosen else ["seg"])
    return CaseFiles(case_id=case_id, scheme=scheme, folder=folder, images=images, seg=chosen.get("seg"),
                     missing=missing, brain_mask=chosen.get("brain"), duplicates=duplicates, group=group)


def find_cases(root: str | os.PathLike[str], scheme: str | Scheme = "auto") -> list[CaseFiles]:
    """Every case folder anywhere below `root` (or `root` itself), sorted by case id.

    A case folder is one holding at least one image or mask named by a scheme; it is not searched
    further. Hidden folders (".x", our own temporaries) are skipped.

    Args:
        root: folder to search.
        scheme: "auto" (detect per case) or a scheme name to accept only that naming.

    Raises:
        DataError: `root` is not a folder.
        ValueError: unknown scheme name.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a folder (or does not exist)", code="not-found")
    candidates = list(SCHEMES.values()) if str(scheme).lower() == "auto" else [get_scheme(scheme)]
    cases: list[CaseFiles] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        stems = _stems(here, filenames)
        if not stems:
            continue
        best = _best_scheme(here, stems, candidates)
        if best is None:
            continue
        rel_parent = here.parent.relative_to(root).as_posix() if here != root else None
        group = None if rel_parent in (None, ".") else rel_parent
        cases.append(_case_from(here, best[0], best[1], group))
        dirnames[:] = []  # a case folder is a leaf
    cases.sort(key=lambda c: (c.case_id, str(c.folder)))
    return cases


# --------------------------------------------------------------------------------------------
# Reading volumes
# --------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """One NIfTI volume, reoriented to RAS, in the dtype of the file.

    Args:
        path: the file.
        data: 3D array (X, Y, Z) in RAS voxel order; scaling (scl_slope) already applied.
        affine: 4x4 voxel -> RAS world (mm) of `data`.
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return _spacing(self.affine)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read one NIfTI file (.nii or .nii.gz) and reorient it to RAS from its header.

    Trailing singleton axes (a 4th axis of size 1) are dropped.

    Raises:
        DataError: unreadable or truncated file ("unreadable"), not a 3D volume ("not-3d"), or an
            unusable affine ("bad-affine"); the message names the file.
    """
    import nibabel as nib  # local: importing the package stays light

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found", code="missing-file")
    try:
        img = nib.load(str(path), mmap=False)
        shape = tuple(int(s) for s in img.shape)
        if len(shape) < 3 or any(s != 1 for s in shape[3:]):
            raise DataError(path, f"not a 3D volume (shape {shape})", code="not-3d")
        if min(shape[:3]) < 1 or int(np.prod(shape[:3], dtype=np.float64)) > MAX_VOXELS:
            raise DataError(path, f"implausible volume shape {shape} (corrupt header?)", code="unreadable")
        data = np.asanyarray(img.dataobj).reshape(shape[:3])
        affine = np.asarray(img.affine, dtype=np.float64)
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib, struct and numpy all raise their own types
        detail = str(exc).replace(f"File {path} ", "").replace(str(path), path.name)  # nibabel repeats the path
        raise DataError(path, f"unreadable or truncated NIfTI ({type(exc).__name__}: {detail})",
                        code="unreadable") from None
    if data.dtype.kind not in "biuf":
        raise DataError(path, f"unsupported data type {data.dtype}", code="unreadable")
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(path, f"header has no usable affine:\n{affine}", code="bad-affine")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    data = np.ascontiguousarray(np.asanyarray(canonical.dataobj))
    return Volume(path=path, data=data, affine=np.asarray(canonical.affine, dtype=np.float64))


def harmonise_labels(seg: np.ndarray, scheme: Scheme | str, path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Map a mask's label values to the canonical scheme (legacy 4 -> 3) as uint8.

    Raises:
        DataError: non-finite or non-integer values ("nan-inf", "bad-label"), or a value the scheme
            does not define ("bad-label", e.g. 5, or 3 in a legacy 0/1/2/4 file).
    """
    scheme = get_scheme(scheme)
    if seg.dtype.kind == "f":
        if not np.isfinite(seg).all():
            raise DataError(path, f"mask holds {int((~np.isfinite(seg)).sum())} NaN/Inf voxels", code="nan-inf")
        rounded = np.rint(seg)
        if not np.array_equal(rounded, seg):
            raise DataError(path, "mask holds non-integer values", code="bad-label")
        seg = rounded
    values = np.unique(seg)
    bad = [v.item() for v in values if int(v) not in scheme.label_map]
    if bad:
        shown = [int(v) for v in bad[:10]]
        raise DataError(path, f"label value(s) {shown} not in scheme {scheme.name!r} "
                        f"(allowed {list(scheme.allowed_labels)})", code="bad-label")
    lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.uint8)
    for src, dst in scheme.label_map.items():
        if src < lut.size:
            lut[src] = dst
    return lut[seg.astype(np.intp, copy=False)]


# --------------------------------------------------------------------------------------------
# Loading a case
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedCase:
    """One case in memory, RAS, canonical labels.

    Args:
        case_id: the case.
        image: float32 (C, X, Y, Z), channels in `modalities` order.
        seg: uint8 (X, Y, Z) canonical labels 0..3, or None when the case has no mask.
        affine: 4x4 voxel -> RAS world (mm), shared by every channel and the mask.
        spacing: voxel size in mm along X, Y, Z.
        modalities: canonical channel names.
        brain: uint8 brain mask shipped with the case (UCSF-PDGM), or None.
        files: role -> source file.
        scheme: naming scheme name.
    """

    case_id: str
    image: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    modalities: tuple[str, ...]
    brain: np.ndarray | None = None
    files: dict[str, Path] = field(default_factory=dict)
    scheme: str = ""


@dataclass
class CaseInspection:
    """What reading a case produced: every volume that could be read and every problem found.

    `loaded` is set only when there are no problems.
    """

    case: CaseFiles
    volumes: dict[str, Volume]
    errors: list[DataError]
    loaded: LoadedCase | None


def inspect_case(
    case: CaseFiles,
    modalities: Iterable[str] | None = None,
    *,
    affine_tol: float = 1e-3,
    require_seg: bool = False,
    use_brain_mask: bool = True,
) -> CaseInspection:
    """Read every file of a case, collecting every file-level problem instead of stopping.

    Checks: missing modality or mask, unreadable/truncated/non-3D file, NaN/Inf in an image,
    label values outside the scheme, and shape or affine (beyond `affine_tol` mm) differences
    between the files (after reorientation to RAS).
    """
    mods = resolve_modalities(modalities)
    errors: list[DataError] = []
    volumes: dict[str, Volume] = {}
    present = sorted(p.name for p in case.folder.iterdir()) if case.folder.is_dir() else []

    def err(path: Path | None, problem: str, code: str) -> None:
        errors.append(DataError(path, problem, code=code, case_id=case.case_id))

    roles: list[tuple[str, Path | None]] = [(m, case.images.get(m)) for m in mods]
    roles.append(("seg", case.seg))
    if use_brain_mask and case.brain_mask is not None:
        roles.append(("brain", case.brain_mask))
    for role, path in roles:
        if path is None:
            if role == "seg" and not require_seg:
                continue
            what = "tumour mask" if role == "seg" else f"modality {role}"
            expect = case.scheme.file_name(case.case_id, role)
            err(case.folder, f"no {what} file (expected {expect}; folder has {', '.join(present) or 'no files'})",
                "missing-seg" if role == "seg" else "missing-modality")
            continue
        try:
            vol = read_nifti(path)
        except DataError as exc:
            exc.case_id = case.case_id
            errors.append(exc)
            continue
        if role == "seg":
            try:
                vol.data = harmonise_labels(vol.data, case.scheme, path)
            except DataError as exc:
                exc.case_id = case.case_id
                errors.append(exc)
                continue
        elif vol.data.dtype.kind == "f" and not np.isfinite(vol.data).all():
            n_bad = int((~np.isfinite(vol.data)).sum())
            err(path, f"{n_bad} NaN/Inf voxel(s)", "nan-inf")
            continue
        volumes[role] = vol

    # Geometry: every file must share the grid of the first readable image.
    ref_role = next((r for r, _ in roles if r in volumes), None)
    if ref_role is not None:
        ref = volumes[ref_role]
        for role, vol in list(volumes.items()):
            if role == ref_role:
                continue
            if vol.data.shape != ref.data.shape:
                err(vol.path, f"shape {vol.data.shape} differs from {ref.path.name} {ref.data.shape} (in RAS)",
                    "shape-mismatch")
                del volumes[role]
            elif not np.allclose(vol.affine, ref.affine, atol=affine_tol, rtol=0):
                diff = float(np.abs(vol.affine - ref.affine).max())
                err(vol.path, f"affine differs from {ref.path.name} by up to {diff:.4g} mm "
                    f"(tolerance {affine_tol:g})", "affine-mismatch")
                del volumes[role]

    loaded = None
    if not errors:
        ref = volumes[mods[0]]
        image = np.empty((len(mods), *ref.data.shape), dtype=np.float32)
        for i, m in enumerate(mods):
            image[i] = volumes[m].data  # casts to float32 in place
        seg = volumes["seg"].data if "seg" in volumes else None
        brain = (volumes["brain"].data > 0).astype(np.uint8) if "brain" in volumes else None
        loaded = LoadedCase(
            case_id=case.case_id, image=image, seg=seg, affine=ref.affine.copy(), spacing=ref.spacing,
            modalities=mods, brain=brain, files={r: v.path for r, v in volumes.items()}, scheme=case.scheme.name,
        )
    return CaseInspection(case=case, volumes=volumes, errors=errors, loaded=loaded)


def load_case(
    case: CaseFiles,
    modalities: Iterable[str] | None = None,
    *,
    affine_tol: float = 1e-3,
    require_seg: bool = False,
    use_brain_mask: bool = True,
) -> LoadedCase:
    """Load a case as float32 (C, X, Y, Z) RAS images, canonical uint8 mask and shared affine.

    Args:
        case: from `find_cases`.
        modalities: canonical names in channel order (None: t1, t1c, t2, flair).
        affine_tol: largest allowed difference (mm) between the files' affines.
        require_seg: a missing tumour mask is an error (else `seg` is None).
        use_brain_mask: also load the brain mask the release ships (UCSF-PDGM), if any.

    Raises:
        DataError: the first problem found (naming the file); the message counts any others.
    """
    result = inspect_case(case, modalities, affine_tol=affine_tol, require_seg=require_seg,
                          use_brain_mask=use_brain_mask)
    if result.errors:
        first = result.errors[0]
        if len(result.errors) > 1:
            raise DataError(first.path, f"{first.problem} (and {len(result.errors) - 1} more problem(s) in case "
                            f"{case.case_id}; run `aldm-fed data check`)", code=first.code, case_id=case.case_id)
        raise first
    assert result.loaded is not None
    return result.loaded


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

_CROPS = ("brain", "tumour", "none")


def _number(name: str, value: object, shown: object = None, *, whole: bool = False) -> float:
    """`value` as a finite number (a whole one when `whole`), else a ValueError naming data.<name>.

    Args:
        name: the option below `data.`.
        value: what the config holds.
        shown: what to quote in the message (the whole option when `value` is one element of it).
        whole: require an integer value.
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not np.isfinite(number) or (whole and number != round(number)):
        what = "an integer" if whole else "a finite number"
        raise ValueError(f"data.{name} must be {what}, got {value if shown is None else shown!r}")
    return int(number) if whole else number
_FITS = ("resize", "pad")


@dataclass(frozen=True)
class DataConfig:
    """The `data` config group (configs/data/default.yaml documents every key).

    Reading: scheme, modalities, require_seg, brain_mask. Checks: affine_tol, mask_outside_tol.
    Preprocessing: spacing, clip, crop, margin, size, fit, antialias.
    """

    scheme: str = "auto"
    modalities: tuple[str, ...] = MODALITIES
    require_seg: bool = True
    brain_mask: bool = True
    affine_tol: float = 1e-3
    mask_outside_tol: float = 0.01
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    clip: tuple[float, float] = (0.5, 99.5)
    crop: str = "brain"
    margin: int = 10
    size: int = 64
    fit: str = "resize"
    antialias: bool = True

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if str(self.scheme).lower() != "auto":
            get_scheme(self.scheme)
        set_("modalities", resolve_modalities(self.modalities))
        if self.spacing is not None:
            sp = list(self.spacing) if isinstance(self.spacing, Sequence) and not isinstance(self.spacing, str) \
                else [self.spacing] * 3
            if len(sp) != 3 or not all(_number("spacing", s, self.spacing) > 0 for s in sp):
                raise ValueError(f"data.spacing must be null or three positive mm values, got {self.spacing!r}")
            set_("spacing", tuple(float(s) for s in sp))
        clip = self.clip if self.clip is not None else [0.0, 100.0]
        if (not isinstance(clip, Sequence) or isinstance(clip, str) or len(clip) != 2
                or not 0 <= _number("clip", clip[0], clip) < _number("clip", clip[1], clip) <= 100):
            raise ValueError("data.clip must be [lower, upper] percentiles with 0 <= lower < upper <= 100, "
                             f"got {self.clip!r}")
        set_("clip", (float(clip[0]), float(clip[1])))
        crop = {"tumor": "tumour", "null": "none"}.get(str(self.crop).lower(), str(self.crop).lower())
        if crop not in _CROPS:
            raise ValueError(f"data.crop must be one of {_CROPS}, got {self.crop!r}")
        set_("crop", crop)
        if str(self.fit).lower() not in _FITS:
            raise ValueError(f"data.fit must be one of {_FITS}, got {self.fit!r}")
        set_("fit", str(self.fit).lower())
        size = _number("size", self.size, whole=True)
        if size < 2:
            raise ValueError(f"data.size must be an integer >= 2, got {self.size!r}")
        set_("size", size)
        if _number("margin", self.margin, whole=True) < 0:
            raise ValueError(f"data.margin must be >= 0 voxels, got {self.margin!r}")
        set_("margin", int(self.margin))
        if (_number("affine_tol", self.affine_tol) < 0
                or not 0 <= _number("mask_outside_tol", self.mask_outside_tol) <= 1):
            raise ValueError("data.affine_tol must be >= 0 and data.mask_outside_tol within [0, 1]")
        set_("affine_tol", float(self.affine_tol))
        set_("mask_outside_tol", float(self.mask_outside_tol))

    @classmethod
    def from_cfg(cls, cfg: object = None) -> DataConfig:
        """Build from `cfg.data` (a DictConfig or mapping); keys this layer does not use are ignored."""
        if cfg is None:
            return cls()
        if isinstance(cfg, DataConfig):
            return cfg
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(cfg, Mapping):
            raise ValueError(f"data config must be a mapping, got {type(cfg).__name__}")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def prep_dict(self) -> dict[str, object]:
        """Every setting that changes what the cache holds (hashed into `prep_hash`)."""
        return {
            "modalities": list(self.modalities),
            "brain_mask": self.brain_mask,
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "clip": list(self.clip),
            "crop": self.crop,
            "margin": self.margin,
            "size": self.size,
            "fit": self.fit,
            "antialias": self.antialias,
        }
