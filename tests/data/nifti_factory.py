"""Tiny synthetic BraTS-style cases on disk for the data-layer tests (real NIfTI files via nibabel).

A case is an ellipsoidal "brain" (every modality > 0 inside, 0 outside) holding a spherical tumour:
necrotic core (canonical 1), enhancing rim (canonical 3; written as 4 in legacy schemes) and oedema
(canonical 2). Every helper writes real files under a folder the test gives (tmp_path).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from aldm_fed.data.brats import MODALITIES, SCHEMES

SHAPE = (24, 22, 20)
TUMOUR_CENTRE = (9, 12, 10)
# Voxel index -> RAS mm, 1 mm, origin somewhere plausible.
RAS = np.array([[1.0, 0, 0, -12.0], [0, 1.0, 0, -11.0], [0, 0, 1.0, -10.0], [0, 0, 0, 1]])


def las(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """An LAS affine for `shape` covering the same world box as RAS (x axis flipped)."""
    a = RAS.copy()
    a[0, 0] = -1.0
    a[0, 3] = RAS[0, 3] + (shape[0] - 1)
    return a


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = RAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    nib.save(img, str(path))
    return path


def volumes(shape: tuple[int, int, int] = SHAPE, centre: tuple[int, int, int] = TUMOUR_CENTRE,
            radius: float = 4.5) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(modality -> int16 image, canonical uint8 seg), in RAS voxel order."""
    grid = np.indices(shape).astype(np.float64)
    mid = (np.array(shape) - 1) / 2.0
    semi = np.array(shape) / 2.0 - 1.5
    brain = (((grid - mid[:, None, None, None]) / semi[:, None, None, None]) ** 2).sum(0) <= 1.0
    d = np.sqrt(((grid - np.array(centre, dtype=float)[:, None, None, None]) ** 2).sum(0))
    seg = np.zeros(shape, np.uint8)
    seg[(d <= radius) & brain] = 2
    seg[(d <= radius * 0.6) & brain] = 3
    seg[(d <= radius * 0.3) & brain] = 1
    ramp = grid[0] + 2 * grid[1] + 3 * grid[2]  # a smooth gradient so every voxel is distinct-ish
    imgs = {}
    for i, m in enumerate(MODALITIES):
        img = 200.0 + 40.0 * i + ramp + 300.0 * (seg > 0) * (i % 2)
        imgs[m] = np.where(brain, img, 0).astype(np.int16)
    return imgs, seg


def make_case(root: Path, case_id: str, scheme: str = "brats2023", *, ext: str = ".nii.gz",
              affine: np.ndarray | None = None, modalities: tuple[str, ...] = MODALITIES, seg: bool = True,
              shape: tuple[int, int, int] = SHAPE, centre: tuple[int, int, int] = TUMOUR_CENTRE,
              radius: float = 4.5, float_images: bool = False, extra_axis: bool = False,
              brain_mask: bool = False) -> Path:
    """Write one case folder below `root` in the naming of `scheme`; returns the folder.

    `affine` None writes RAS; with an LAS affine the arrays are flipped along x so that the world
    content is identical to the RAS case.
    """
    s = SCHEMES[scheme]
    folder = root / s.folder_name(case_id)
    imgs, canon = volumes(shape, centre, radius)
    legacy = {v: k for k, v in s.label_map.items()}
    labels = np.vectorize(lambda v: legacy[int(v)], otypes=[np.uint8])(canon) if legacy[3] != 3 else canon
    aff = RAS if affine is None else affine
    flip = aff[0, 0] < 0

    def prep(a: np.ndarray) -> np.ndarray:
        a = a[::-1] if flip else a
        a = np.ascontiguousarray(a)
        return a[..., None] if extra_axis else a

    for m in modalities:
        data = imgs[m].astype(np.float32) if float_images else imgs[m]
        write_nifti(folder / s.file_name(case_id, m, ext), prep(data), aff)
    if seg:
        write_nifti(folder / s.file_name(case_id, "seg", ext), prep(labels), aff)
    if brain_mask and s.brain_suffix:
        write_nifti(folder / s.file_name(case_id, "brain", ext), prep((imgs["t1"] > 0).astype(np.uint8)), aff)
    return folder


def big_case(root: Path, case_id: str = "BraTS-GLI-00000-000") -> Path:  # not used by tests (slow to write)
    """A BraTS-sized (240x240x155) 4-modality case, for timing."""
    return make_case(root, case_id, "brats2023", shape=(240, 240, 155), centre=(100, 130, 80), radius=25)
