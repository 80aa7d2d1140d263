"""Shared helpers of the property-based bad-input tests: tiny NIfTI cases and an in-process CLI.

`invoke` runs `aldm_fed.cli.main` (the console entry, with its catch of expected errors) under
click's CliRunner isolation, so a test sees exactly what a user would: the exit code, stdout,
stderr, and whether a traceback escaped.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from aldm_fed.cli import main

SHAPE = (12, 11, 10)
RAS = np.array([[2.0, 0, 0, -12.0], [0, 2.0, 0, -11.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])
# BraTS 2023 naming: <case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz
SUFFIXES = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
TINY = ["data.size=8", "data.spacing=null"]


@dataclass
class CliResult:
    """What a user running `aldm-fed ARGS` would see."""

    code: int | None  # None: an exception escaped main() (a traceback)
    out: str
    err: str
    traceback: str = ""

    @property
    def text(self) -> str:
        return self.out + self.err


def invoke(*args: str | Path) -> CliResult:
    """Run `aldm-fed ARGS` in this process through the real console entry point."""
    runner = CliRunner()
    tb = ""
    with runner.isolation() as (out, err, _):
        try:
            main([str(a) for a in args])
            code: int | None = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - a traceback a user would see is the failure we look for
            code, tb = None, traceback.format_exc()
    return CliResult(code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace"), tb)


def assert_clear_failure(result: CliResult, *names: str, codes: tuple[int, ...] = (1, 2)) -> None:
    """A non-zero exit, no traceback, and every one of `names` in what the user sees."""
    assert result.code is not None, f"traceback escaped:\n{result.traceback}"
    assert result.code in codes, f"exit {result.code}, expected one of {codes}:\n{result.text}"
    assert "Traceback" not in result.text, result.text
    for name in names:
        assert name in result.text, f"{name!r} not named in:\n{result.text}"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = RAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    nib.save(img, str(path))
    return path


def case_arrays(shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(int16 image, uint8 seg in BraTS 2023 labels): a box brain holding a cube tumour."""
    image = np.zeros(shape, np.int16)
    image[1:-1, 1:-1, 1:-1] = 100 + np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)[1:-1, 1:-1, 1:-1] % 50
    seg = np.zeros(shape, np.uint8)
    c = [s // 2 for s in shape]
    seg[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 2
    seg[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 3
    return image, seg


def case_file(root: Path, case_id: str, role: str) -> Path:
    return root / case_id / f"{case_id}-{SUFFIXES[role]}.nii.gz"


def make_case(root: Path, case_id: str = "BraTS-GLI-00001-000") -> Path:
    """A valid 4-modality BraTS 2023 case below `root`; returns its folder."""
    image, seg = case_arrays()
    for i, role in enumerate(("t1", "t1c", "t2", "flair")):
        write_nifti(case_file(root, case_id, role), (image + 10 * i).astype(np.int16))
    write_nifti(case_file(root, case_id, "seg"), seg)
    return root / case_id
