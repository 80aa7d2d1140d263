"""Check BraTS-style data and report every problem of every case in one pass.

```python
report = check_dataset(root, cfg.data)
print(report.format_table())     # case | file | problem, aligned
report.ok, report.to_dict()
```

File-level checks come from `brats.inspect_case` (missing modality or mask, unreadable or truncated
file, not 3D, NaN/Inf, labels outside the scheme, shape or affine mismatch). This module adds the
content checks: empty image ("empty-brain"), empty mask, tumour outside the brain, and
dataset-level ones (no case folders, one case id in two folders, two files for one modality).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aldm_fed.data.brats import CaseFiles, CaseInspection, DataConfig, DataError, find_cases, inspect_case

__all__ = ["CaseCheck", "CheckReport", "Problem", "check_case", "check_dataset"]


@dataclass(frozen=True)
class Problem:
    """One problem with one case (or with the dataset as a whole, `case_id` None).

    Args:
        case_id: the case, or None for dataset-level problems.
        file: the file or folder concerned, or None.
        code: short slug, e.g. "missing-modality", "unreadable", "bad-label".
        message: what is wrong, in words.
    """

    case_id: str | None
    file: Path | None
    code: str
    message: str

    @classmethod
    def from_error(cls, exc: DataError, case_id: str | None = None) -> Problem:
        return cls(case_id=case_id or exc.case_id, file=exc.path, code=exc.code, message=exc.problem)

    def to_dict(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "file": str(self.file) if self.file else None,
                "code": self.code, "message": self.message}


@dataclass
class CheckReport:
    """The result of `check_dataset`.

    Args:
        root: the folder checked.
        problems: every problem found, in case order.
        n_cases: case folders found.
        n_ok: cases without any problem.
    """

    root: Path
    problems: list[Problem] = field(default_factory=list)
    n_cases: int = 0
    n_ok: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_case(self) -> dict[str | None, list[Problem]]:
        out: dict[str | None, list[Problem]] = {}
        for p in self.problems:
            out.setdefault(p.case_id, []).append(p)
        return out

    def format_table(self) -> str:
        """An aligned text table (case, file, problem) with a summary line."""
        head = f"{self.root}: {self.n_cases} case(s), {self.n_ok} ok, {len(self.problems)} problem(s)"
        if not self.problems:
            return head
        rows = [("case", "file", "problem")]
        for p in self.problems:
            rows.append((p.case_id or "-", _short(p.file, self.root), f"[{p.code}] {p.message}"))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 7}")
        return "\n".join([*lines, "", head])

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "n_cases": self.n_cases, "n_ok": self.n_ok, "ok": self.ok,
                "problems": [p.to_dict() for p in self.problems]}


def _short(path: Path | None, root: Path) -> str:
    if path is None:
        return "-"
    if path == root:
        return str(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass
class CaseCheck:
    """Problems of one case; `inspection.loaded` holds the loaded case when there are none."""

    case: CaseFiles
    problems: list[Problem]
    inspection: CaseInspection

    @property
    def ok(self) -> bool:
        return not self.problems


def check_case(case: CaseFiles, data_cfg: object = None) -> CaseCheck:
    """Every problem of one case (file-level and content checks).

    Args:
        case: from `find_cases`.
        data_cfg: the `data` config (mapping, DictConfig or DataConfig; None: defaults).
    """
    cfg = DataConfig.from_cfg(data_cfg)
    ins = inspect_case(case, cfg.modalities, affine_tol=cfg.affine_tol, require_seg=cfg.require_seg,
                       use_brain_mask=cfg.brain_mask)
    problems = [Problem.from_error(e, case.case_id) for e in ins.errors]
    for role, files in case.duplicates.items():
        if role in cfg.modalities or role in ("seg", "brain"):
            problems.append(Problem(case.case_id, files[0], "duplicate-file",
                                    f"{len(files)} files match {role}: {', '.join(f.name for f in files)} "
                                    f"(using {files[0].name})"))

    # Content checks on whatever could be read.
    images = {m: ins.volumes[m] for m in cfg.modalities if m in ins.volumes}
    for vol in images.values():
        if not np.any(vol.data):
            problems.append(Problem(case.case_id, vol.path, "empty-brain", "image is all zero (no brain)"))
    brain_vol = ins.volumes.get("brain")
    if brain_vol is not None and not np.any(brain_vol.data):
        problems.append(Problem(case.case_id, brain_vol.path, "empty-brain", "brain mask is all zero"))
    seg_vol = ins.volumes.get("seg")
    if seg_vol is not None:
        n_tumour = int(np.count_nonzero(seg_vol.data))
        if n_tumour == 0:
            problems.append(Problem(case.case_id, seg_vol.path, "empty-mask", "tumour mask has no tumour voxel"))
        else:
            if brain_vol is not None and brain_vol.data.shape == seg_vol.data.shape:
                brain = brain_vol.data > 0
            else:
                same = [v.data for v in images.values() if v.data.shape == seg_vol.data.shape and np.any(v.data)]
                brain = np.any(np.stack(same) > 0, axis=0) if same else None
            if brain is not None and brain.any():
                outside = int(np.count_nonzero(seg_vol.data[~brain]))
                if outside > cfg.mask_outside_tol * n_tumour:
                    problems.append(Problem(
                        case.case_id, seg_vol.path, "mask-outside-brain",
                        f"{outside} of {n_tumour} tumour voxels ({100 * outside / n_tumour:.1f}%) lie where every "
                        f"modality is 0 (tolerance {100 * cfg.mask_outside_tol:g}%); mask flipped or misregistered?"))
    if problems:
        ins.loaded = None
    return CaseCheck(case=case, problems=problems, inspection=ins)


def check_dataset(root: str | os.PathLike[str], data_cfg: object = None, *, progress: bool = True) -> CheckReport:
    """Check every case below `root` and report every problem of every case in one pass.

    Never stops at the first problem: an unreadable file, a missing folder or an empty root is a
    reported problem, not an exception.

    Args:
        root: folder with BraTS-style case folders (anywhere below it).
        data_cfg: the `data` config (scheme, modalities, require_seg, affine_tol, mask_outside_tol).
        progress: show a progress bar on stderr.
    """
    root = Path(root)
    cfg = DataConfig.from_cfg(data_cfg)
    report = CheckReport(root=root)
    try:
        cases = find_cases(root, cfg.scheme)
    except DataError as exc:
        report.problems.append(Problem.from_error(exc))
        return report
    report.n_cases = len(cases)
    if not cases:
        has_files = any(root.iterdir())
        report.problems.append(Problem(
            None, root, "no-cases",
            ("folder is empty" if not has_files else "no case folder found below it")
            + (f" (scheme {cfg.scheme!r})" if cfg.scheme != "auto" else "")
            + "; expected e.g. <case>/<case>-t1n.nii.gz (BraTS 2023) or <case>/<case>_t1.nii.gz (BraTS 2021)"))
        return report
    folders: dict[str, list[Path]] = {}
    for c in cases:
        folders.setdefault(c.case_id, []).append(c.folder)

    from tqdm import tqdm

    for case in tqdm(cases, desc="check", unit="case", disable=not progress, leave=False):
        result = check_case(case, cfg)
        problems = list(result.problems)
        if len(folders[case.case_id]) > 1 and case.folder != folders[case.case_id][0]:
            problems.insert(0, Problem(case.case_id, case.folder, "duplicate-case",
                                       f"case id also used by {folders[case.case_id][0]} (case ids must be unique)"))
        report.problems.extend(problems)
        report.n_ok += not problems
    return report
