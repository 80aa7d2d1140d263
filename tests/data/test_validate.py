"""check_dataset on real corrupted files: every problem of every case in one pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nifti_factory import RAS, SHAPE, make_case, volumes, write_nifti

from aldm_fed.data.brats import find_cases
from aldm_fed.data.validate import CheckReport, Problem, check_case, check_dataset

NAME = "BraTS-GLI-{:05d}-000"


def _file(folder: Path, role: str) -> Path:
    suffix = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}[role]
    return folder / f"{folder.name}-{suffix}.nii.gz"


def _corrupt_cohort(root: Path) -> dict[str, tuple[str, Path]]:
    """One case per problem (BraTS 2023 naming, two sites); returns case id -> (code, bad file)."""
    imgs, seg = volumes()
    expect: dict[str, tuple[str, Path]] = {}

    def case(n: int, code: str, role: str, site: str = "A") -> Path:
        folder = make_case(root / site, NAME.format(n))
        expect[folder.name] = (code, _file(folder, role))
        return folder

    make_case(root / "A", NAME.format(0))  # a good one

    f = case(1, "unreadable", "flair")  # truncated gzip
    raw = _file(f, "flair").read_bytes()
    _file(f, "flair").write_bytes(raw[: len(raw) // 2])

    f = case(2, "unreadable", "t2", site="B")  # random bytes
    _file(f, "t2").write_bytes(np.random.default_rng(0).bytes(700))

    f = case(3, "shape-mismatch", "t2")
    write_nifti(_file(f, "t2"), imgs["t2"][:-2])

    f = case(4, "affine-mismatch", "t1c")
    shifted = RAS.copy()
    shifted[:3, 3] += 2.0
    write_nifti(_file(f, "t1c"), imgs["t1c"], shifted)

    f = case(5, "nan-inf", "t1")
    bad = imgs["t1"].astype(np.float32)
    bad[5, 5, 5] = np.nan
    write_nifti(_file(f, "t1"), bad)

    f = case(6, "bad-label", "seg", site="B")
    s5 = seg.copy()
    s5[s5 == 1] = 5
    write_nifti(_file(f, "seg"), s5)

    f = case(7, "empty-brain", "t2")
    write_nifti(_file(f, "t2"), np.zeros(SHAPE, np.int16))

    f = case(8, "empty-mask", "seg")
    write_nifti(_file(f, "seg"), np.zeros(SHAPE, np.uint8))

    f = case(9, "mask-outside-brain", "seg")
    outside = np.zeros(SHAPE, np.uint8)
    outside[:2, :2, :2] = 2  # a corner: every modality is 0 there
    write_nifti(_file(f, "seg"), outside)

    f = case(10, "missing-modality", "flair")
    _file(f, "flair").unlink()
    expect[f.name] = ("missing-modality", f)  # reported against the folder
    return expect


def test_one_pass_reports_every_problem_of_every_case(tmp_path):
    root = tmp_path / "COHORT"
    expect = _corrupt_cohort(root)
    report = check_dataset(root, {}, progress=False)
    assert isinstance(report, CheckReport)
    assert report.n_cases == 11 and report.n_ok == 1 and not report.ok
    got = {(p.case_id, p.code) for p in report.problems}
    for case_id, (code, path) in expect.items():
        assert (case_id, code) in got, f"{case_id}: expected {code}, got {report.by_case().get(case_id)}"
        hits = [p for p in report.problems if p.case_id == case_id and p.code == code]
        assert hits[0].file == path
    assert NAME.format(0) not in {p.case_id for p in report.problems}

    table = report.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["case", "file", "problem"]
    assert "B/BraTS-GLI-00002-000/BraTS-GLI-00002-000-t2w.nii.gz" in table
    assert "[mask-outside-brain]" in table and "11 case(s), 1 ok" in lines[-1]
    col = lines[0].index("file")
    assert all(line[col - 2 : col] == "  " for line in lines[2:-2])  # aligned columns

    d = json.loads(json.dumps(report.to_dict()))
    assert d["n_cases"] == 11 and not d["ok"] and len(d["problems"]) == len(report.problems)


def test_several_problems_in_one_case_are_all_reported(tmp_path):
    folder = make_case(tmp_path, NAME.format(1))
    _file(folder, "flair").write_bytes(b"not a nifti")
    imgs, _ = volumes()
    write_nifti(_file(folder, "t2"), imgs["t2"][:, :-1])
    write_nifti(_file(folder, "seg"), np.zeros(SHAPE, np.uint8))
    result = check_case(find_cases(tmp_path)[0])
    assert {p.code for p in result.problems} == {"unreadable", "shape-mismatch", "empty-mask"}
    assert result.inspection.loaded is None and not result.ok


def test_empty_root_and_root_without_cases_are_problems(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    report = check_dataset(empty, None, progress=False)
    assert [p.code for p in report.problems] == ["no-cases"] and "folder is empty" in report.problems[0].message
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "other" / "sub" / "readme.txt").write_text("hi")
    report = check_dataset(tmp_path / "other", None, progress=False)
    assert report.problems[0].code == "no-cases" and "no case folder" in report.problems[0].message
    report = check_dataset(tmp_path / "missing", None, progress=False)
    assert report.problems[0].code == "not-found" and report.n_cases == 0
    assert "problem(s)" in report.format_table()


def test_missing_seg_duplicate_case_and_duplicate_file(tmp_path):
    make_case(tmp_path / "A", NAME.format(1), seg=False)
    make_case(tmp_path / "B", NAME.format(1))
    folder = make_case(tmp_path / "C", NAME.format(2))
    imgs, _ = volumes()
    write_nifti(folder / f"{folder.name}-t1n.nii", imgs["t1"])  # a second t1 (uncompressed)
    report = check_dataset(tmp_path, {"modalities": ["t1", "flair"]}, progress=False)
    codes = sorted(p.code for p in report.problems)
    assert codes == ["duplicate-case", "duplicate-file", "missing-seg"]
    assert check_dataset(tmp_path / "A", {"require_seg": False}, progress=False).ok


def test_modality_selection_only_checks_chosen_modalities(tmp_path):
    folder = make_case(tmp_path, NAME.format(3))
    _file(folder, "t1c").write_bytes(b"broken")
    assert check_dataset(tmp_path, {"modalities": ["t1", "t2", "flair"]}, progress=False).ok
    report = check_dataset(tmp_path, {}, progress=False)
    assert [p.code for p in report.problems] == ["unreadable"]


def test_problem_to_dict():
    p = Problem("X", Path("/a/b.nii.gz"), "empty-mask", "no tumour")
    assert p.to_dict() == {"case_id": "X", "file": "/a/b.nii.gz", "code": "empty-mask", "message": "no tumour"}


@pytest.mark.parametrize("tol", [0.0, 1.0])
def test_mask_outside_tolerance(tmp_path, tol):
    folder = make_case(tmp_path, NAME.format(4))
    _, seg = volumes()
    seg[0, 0, 0] = 2  # one stray voxel outside the brain
    write_nifti(_file(folder, "seg"), seg)
    report = check_dataset(tmp_path, {"mask_outside_tol": tol}, progress=False)
    assert report.ok == (tol == 1.0)
