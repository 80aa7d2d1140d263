"""Which patient a case belongs to: the unit of splits and of the bootstrap.

BraTS 2023 names a scan `BraTS-<cohort>-<patient>-<timepoint>` (`BraTS-GLI-00124-000`,
`BraTS-GLI-00124-001` for a follow-up of the same patient). Two scans of one patient are not
independent: a split that puts one in training and the other in test leaks the patient, and a
bootstrap that resamples them separately makes intervals too narrow. Other ids (BraTS 2021
`BraTS2021_00124`, the phantom's, a hospital's own) are one scan per patient.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["patient_id", "patients_of"]

# BraTS 2023 (and 2024): BraTS-GLI-00124-000, BraTS-MEN-RT-0001-1 is not of this form.
_BRATS_2023 = re.compile(r"^(BraTS-[A-Za-z]+-\d+)-(\d{3})$")


def patient_id(case_id: str) -> str:
    """The patient of a case id: the id without a BraTS 2023 timepoint, else the id itself."""
    match = _BRATS_2023.match(case_id)
    return match.group(1) if match else case_id


def patients_of(case_ids: Iterable[str]) -> dict[str, list[str]]:
    """Patient -> its case ids, patients in order of their first case (cases keep their order)."""
    out: dict[str, list[str]] = {}
    for case_id in case_ids:
        out.setdefault(patient_id(case_id), []).append(case_id)
    return out
