"""The output folder of `aldm-fed synthesize`: BraTS-2023-style case folders, the manifest and the
label table.

```
OUT/<synth_id>/<synth_id>-{t1n,t1c,t2w,t2f}.nii.gz   # only the model's modalities; float32 in [0, 1]
OUT/<synth_id>/<synth_id>-seg.nii.gz                 # the conditioning mask, uint8 canonical 0..3
OUT/<synth_id>/record.json                           # what this case was made from (see synthesize)
OUT/synthesis.json                                   # run settings + every record, in index order
OUT/labels.csv                                       # case_id,site,<label column>,synthetic,mask_source
OUT/montage.png                                      # synthetic vs real host, axial tumour slice
```

Every volume is saved with the HOST case's cached affine (RAS, the cube grid), so a synthetic case
overlays the cached real host voxel for voxel and lines up with the host's source scans in world
space. A case folder is built under a temporary name and renamed when complete (`atomic_dir`): a
folder that exists holds every file, which is what makes a killed run resumable. The folders are
read by `aldm_fed.data.brats.find_cases` like any BraTS 2023 release.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aldm_fed.data.brats import MODALITIES, get_scheme
from aldm_fed.io import atomic_dir, atomic_write_json, atomic_write_text
from aldm_fed.synthesis.errors import SynthesisError

__all__ = [
    "LABELS_NAME",
    "MANIFEST_NAME",
    "MONTAGE_NAME",
    "RECORD_NAME",
    "case_files",
    "modality_suffixes",
    "read_record",
    "resume_records",
    "write_labels_csv",
    "write_manifest",
    "write_synthetic_case",
]

RECORD_NAME = "record.json"
MANIFEST_NAME = "synthesis.json"
LABELS_NAME = "labels.csv"
MONTAGE_NAME = "montage.png"
# canonical modality -> BraTS 2023 suffix (t1 -> t1n, t1c -> t1c, t2 -> t2w, flair -> t2f)
_BRATS2023 = get_scheme("brats2023")


def modality_suffixes(modalities: Sequence[str]) -> dict[str, str]:
    """Canonical modality -> BraTS 2023 file suffix, for the given modalities in order.

    Args:
        modalities: canonical names (`t1`, `t1c`, `t2`, `flair`).

    Raises:
        SynthesisError: an unknown or repeated modality (named).
    """
    if not modalities:
        raise SynthesisError("modalities: empty; the model must produce at least one modality")
    out: dict[str, str] = {}
    for m in modalities:
        if m not in _BRATS2023.suffixes:
            raise SynthesisError(f"modality {m!r} is unknown; expected canonical names {list(MODALITIES)}")
        if m in out:
            raise SynthesisError(f"modality {m!r} appears twice in {list(modalities)}")
        out[m] = _BRATS2023.suffixes[m]
    return out


def case_files(synth_id: str, modalities: Sequence[str]) -> dict[str, str]:
    """Role (canonical modality or "seg") -> file name inside the case folder."""
    sep = _BRATS2023.separator
    files = {m: f"{synth_id}{sep}{s}.nii.gz" for m, s in modality_suffixes(modalities).items()}
    files["seg"] = f"{synth_id}{sep}{_BRATS2023.seg_suffix}.nii.gz"
    return files


def _nifti(data: np.ndarray, affine: np.ndarray) -> Any:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    # Both codes "scanner": readers that prefer the qform (ITK) and the sform (nibabel) agree.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_synthetic_case(
    out_dir: str | Path,
    synth_id: str,
    image: np.ndarray,
    seg: np.ndarray,
    affine: np.ndarray,
    modalities: Sequence[str],
    record: Mapping[str, Any],
) -> Path:
    """Write one synthetic case folder atomically.

    Args:
        out_dir: the synthesis output folder.
        synth_id: the case id (folder and file prefix).
        image: (C, X, Y, Z) float image, C = len(modalities); written as float32.
        seg: (X, Y, Z) canonical labels 0..3; written as uint8.
        affine: 4x4 voxel -> RAS world affine (the host's cached affine).
        modalities: canonical names of the image channels.
        record: JSON-ready description of the case, saved as `record.json`.

    Returns:
        The case folder.

    Raises:
        SynthesisError: shapes or labels that do not fit together.
    """
    files = case_files(synth_id, modalities)
    image = np.asarray(image, dtype=np.float32)
    seg = np.asarray(seg)
    if image.ndim != 4 or image.shape[0] != len(modalities) or image.shape[1:] != seg.shape:
        raise SynthesisError(
            f"{synth_id}: image {image.shape} does not match {len(modalities)} modalities and seg {seg.shape}"
        )
    if seg.size and (seg.min() < 0 or seg.max() > 3):
        raise SynthesisError(f"{synth_id}: seg labels outside canonical 0..3")
    affine = np.asarray(affine, dtype=np.float64)
    folder = Path(out_dir) / synth_id
    with atomic_dir(folder) as tmp:
        import nibabel as nib

        for c, m in enumerate(modalities):
            nib.save(_nifti(np.ascontiguousarray(image[c]), affine), str(tmp / files[m]))
        nib.save(_nifti(np.ascontiguousarray(seg, dtype=np.uint8), affine), str(tmp / files["seg"]))
        atomic_write_json(tmp / RECORD_NAME, dict(record))  # last: its presence marks completeness
    return folder


def read_record(folder: str | Path, synth_id: str, modalities: Sequence[str]) -> dict[str, Any] | None:
    """The record of a complete case folder, or None if the folder, a file or the record is missing.

    Args:
        folder: the case folder.
        synth_id: its expected id.
        modalities: the modalities it must hold.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("synth_id") != synth_id:
        return None
    if not all((folder / name).is_file() for name in case_files(synth_id, modalities).values()):
        return None
    return record


def write_manifest(out_dir: str | Path, header: Mapping[str, Any], records: Iterable[Mapping[str, Any]]) -> Path:
    """Write `synthesis.json`: the run header plus every sample record (atomically).

    Args:
        out_dir: the synthesis output folder.
        header: run-level settings (site, seed, sampler, model provenance, ...).
        records: per-sample records, in index order.
    """
    records = [dict(r) for r in records]
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_json(path, {**header, "n_samples": len(records), "samples": records})
    return path


def write_labels_csv(
    out_dir: str | Path, records: Iterable[Mapping[str, Any]], label_column: str = "grade"
) -> Path:
    """Write `labels.csv` (case_id, site, <label_column>, synthetic=1, mask_source), atomically.

    The columns match the cohort's `labels.csv` (case_id, site, grade) plus two, so synthetic cases
    can join real ones in a classifier's table.

    Args:
        out_dir: the synthesis output folder.
        records: per-sample records (keys synth_id, site, label, source_case).
        label_column: header of the case-level label.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", "site", label_column, "synthetic", "mask_source"])
    for r in records:
        label = r.get("label")
        writer.writerow([r["synth_id"], r["site"], "" if label is None else label, 1, r["source_case"]])
    path = Path(out_dir) / LABELS_NAME
    atomic_write_text(path, buf.getvalue())
    return path


def resume_records(
    out_dir: Path, ids: Sequence[str], modalities: Sequence[str], settings_hash: str, *, what_changed: str
) -> dict[int, dict[str, Any]]:
    """The complete cases a killed or finished run left in `out_dir`, by index (a rerun keeps them);
    `out_dir` is made when missing.

    Debris of a case killed mid-write (`.<id>.tmp` / `.<id>.old` from `atomic_dir`) is removed.

    Args:
        out_dir: the output folder.
        ids: the planned synthetic ids, in order.
        modalities: the modalities each case must have.
        settings_hash: the run's settings hash; a case made with another is refused.
        what_changed: named in the error, e.g. "seed, masks, sampler, cases or model".

    Raises:
        SynthesisError: `out_dir` is a file, or a complete case was made with other settings.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthesisError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    records: dict[int, dict[str, Any]] = {}
    for i, sid in enumerate(ids):
        for debris in (out_dir / f".{sid}.tmp", out_dir / f".{sid}.old"):
            if debris.is_dir():
                shutil.rmtree(debris)
        rec = read_record(out_dir / sid, sid, modalities)
        if rec is None:
            continue
        if rec.get("settings_hash") != settings_hash:
            raise SynthesisError(
                f"{out_dir / sid}: made with other settings (settings_hash {rec.get('settings_hash')!r}, now "
                f"{settings_hash!r}: {what_changed} changed); use a new output folder or delete the old cases"
            )
        records[i] = rec
    return records
