"""Case-level labels (grade, IDH, MGMT, any column) from a CSV the user names.

```python
labels = read_case_labels("name_mapping.csv", case_ids=[c.case_id for c in find_cases(root)])
labels["BraTS20_Training_001"]["Grade"]    # "HGG"
labels.missing                              # cases without a row
```

The id column is auto-detected (`case_id`, `ID`, `BraTS21ID`, `BraTS_2020_subject_ID`, ...; with
case ids given, the candidate matching most of them wins) or named. Ids match exactly, else after
normalising letter case and leading zeros of numbers, which absorbs the UCSF-PDGM quirk (CSV
`UCSF-PDGM-004`, folder `UCSF-PDGM-0004`); a purely numeric CSV id (RSNA `BraTS21ID` 0) matches
the one case whose last number equals it.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["ID_COLUMNS", "CaseLabelError", "CaseLabels", "group_labels", "normalise_case_id", "read_case_labels"]

# Header names (lower case, non-alphanumerics dropped) that hold case ids, most specific first.
ID_COLUMNS: tuple[str, ...] = (
    "caseid", "case", "bratsid", "brats21id", "brats2021id", "bratssubjectid", "brats2023id",
    "brats2020subjectid", "brats2019subjectid", "brats2018subjectid", "brats2017subjectid",
    "subjectid", "subject", "patientid", "patient", "id",
)
_NA = {"", "na", "n/a", "nan", "none", "null", "-"}


class CaseLabelError(ValueError):
    """The label CSV is unreadable or lacks a column; the message names the file."""


def normalise_case_id(case_id: str) -> str:
    """Comparable form of a case id: case-folded, `_nifti` dropped, leading zeros of numbers dropped."""
    s = str(case_id).strip().casefold()
    if s.endswith("_nifti"):
        s = s[: -len("_nifti")]
    return re.sub(r"\d+", lambda m: str(int(m.group())), s)


def _key(header: str) -> str:
    return re.sub(r"[^0-9a-z]", "", header.casefold())


class CaseLabels(Mapping[str, dict[str, str]]):
    """Labels per case id: a mapping case id -> {column: value} (empty values left out).

    Attributes:
        path: the CSV.
        id_column: the column ids were read from.
        columns: the label columns kept.
        missing: case ids (of those asked for) without a row in the CSV.
        unmatched: CSV ids that matched no case (only when case ids were given).
    """

    def __init__(self, path: Path, id_column: str, columns: list[str], labels: dict[str, dict[str, str]],
                 missing: list[str], unmatched: list[str]) -> None:
        self.path = path
        self.id_column = id_column
        self.columns = columns
        self._labels = labels
        self.missing = missing
        self.unmatched = unmatched

    def __getitem__(self, case_id: str) -> dict[str, str]:
        return self._labels[case_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __repr__(self) -> str:
        return (f"CaseLabels({str(self.path)!r}, id_column={self.id_column!r}, {len(self)} cases, "
                f"{len(self.missing)} missing)")

    def values_of(self, column: str) -> dict[str, str]:
        """case id -> value of `column`, for the cases that have one."""
        if column not in self.columns:
            raise CaseLabelError(f"{self.path}: no label column {column!r} (columns: {self.columns})")
        return {c: row[column] for c, row in self._labels.items() if column in row}

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {c: dict(row) for c, row in self._labels.items()}


def _delimiter(text: str) -> str:
    """The delimiter (comma, semicolon or tab) that splits the header line into the most columns.

    Why not csv.Sniffer: it guesses from the data rows and misreads quoted cells that hold a
    delimiter or a quote (a semicolon file whose cell is a quoted semicolon came out comma-separated;
    doubled quotes inside a quoted cell were kept doubled).
    Quoting is always RFC 4180 (csv.excel), as spreadsheets and pandas write it.
    """
    first = next((line for line in text.splitlines() if line.strip()), "")
    widths = {}
    for d in (",", ";", "\t"):
        try:
            widths[d] = len(next(csv.reader([first], csv.excel, delimiter=d), []))
        except csv.Error:
            widths[d] = 0
    return max(widths, key=lambda d: widths[d])  # ties: the first, comma


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        raw = path.read_bytes()  # bytes, not read_text: a quoted cell may hold a newline of its own
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise CaseLabelError(f"{path}: label CSV not found") from None
    except IsADirectoryError:
        raise CaseLabelError(f"{path}: is a folder, expected a CSV file") from None
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # latin-1 decodes any bytes; NULs are caught below
    except OSError as exc:
        raise CaseLabelError(f"{path}: cannot read label CSV ({exc})") from None
    if "\x00" in text:
        raise CaseLabelError(f"{path}: not a text CSV file (binary content)")
    if not text.strip():
        raise CaseLabelError(f"{path}: label CSV is empty")
    delimiter = _delimiter(text)
    try:
        rows = [r for r in csv.reader(io.StringIO(text), csv.excel, delimiter=delimiter)
                if any(cell.strip() for cell in r)]
    except csv.Error as exc:
        raise CaseLabelError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise CaseLabelError(f"{path}: label CSV has no non-blank row")
    header = [h.strip() for h in rows[0]]
    if len(header) < 2:
        raise CaseLabelError(f"{path}: needs a header row with an id column and at least one label column "
                             f"(got {header})")
    if len(set(header)) != len(header):
        raise CaseLabelError(f"{path}: duplicate column names in header {header}")
    return header, rows[1:]


def _match_ids(csv_ids: Iterable[str], case_ids: Sequence[str]) -> dict[str, str]:
    """CSV id -> case id, exact first, then normalised, then by trailing number; ambiguous ones skipped."""
    exact = set(case_ids)
    by_norm: dict[str, list[str]] = {}
    by_num: dict[int, list[str]] = {}
    for cid in case_ids:
        by_norm.setdefault(normalise_case_id(cid), []).append(cid)
        nums = re.findall(r"\d+", cid)
        if nums:
            by_num.setdefault(int(nums[-1]), []).append(cid)
    out: dict[str, str] = {}
    for raw in csv_ids:
        if raw in exact:
            out[raw] = raw
        elif len(by_norm.get(normalise_case_id(raw), [])) == 1:
            out[raw] = by_norm[normalise_case_id(raw)][0]
        elif raw.strip().isdigit() and len(by_num.get(int(raw), [])) == 1:
            out[raw] = by_num[int(raw)][0]
    return out


def read_case_labels(
    path: str | os.PathLike[str],
    case_ids: Iterable[str] | None = None,
    *,
    id_column: str | None = None,
    columns: Sequence[str] | None = None,
) -> CaseLabels:
    """Read case-level labels from a CSV (comma, semicolon or tab separated).

    Args:
        path: the CSV.
        case_ids: the dataset's case ids (folder names); labels are keyed by these. None: keyed by
            the CSV's own ids.
        id_column: the id column; None: auto-detect.
        columns: label columns to keep (None: every other column).

    Raises:
        CaseLabelError: unreadable or empty CSV, a named column that does not exist, no id column
            found, or one case given two different rows of labels.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    ids = list(dict.fromkeys(case_ids)) if case_ids is not None else None

    if id_column is not None:
        if id_column not in header:
            raise CaseLabelError(f"{path}: no id column {id_column!r} (columns: {header})")
        id_col = id_column
    else:
        keys = {h: _key(h) for h in header}
        candidates = sorted((h for h in header if keys[h] in ID_COLUMNS), key=lambda h: ID_COLUMNS.index(keys[h]))
        if not candidates:
            raise CaseLabelError(f"{path}: no id column found among {header}; name it with id_column "
                                 f"(known names: case_id, ID, BraTS21ID, BraTS_2020_subject_ID, ...)")
        id_col = candidates[0]
        if ids and len(candidates) > 1:  # several id-like columns (BraTS 2020 name_mapping.csv): best match wins
            col_idx = {h: header.index(h) for h in candidates}
            scores = {h: len(_match_ids([r[col_idx[h]].strip() for r in rows if len(r) > col_idx[h]], ids))
                      for h in candidates}
            id_col = max(candidates, key=lambda h: (scores[h], -candidates.index(h)))

    if columns is None:
        keep = [h for h in header if h != id_col]
    else:
        absent = [c for c in columns if c not in header]
        if absent:
            raise CaseLabelError(f"{path}: no column(s) {absent} (columns: {header})")
        keep = [c for c in columns if c != id_col]
    id_idx = header.index(id_col)
    keep_idx = [(c, header.index(c)) for c in keep]

    table: dict[str, dict[str, str]] = {}
    for n, row in enumerate(rows, start=2):
        if len(row) <= id_idx or not row[id_idx].strip():
            continue
        rid = row[id_idx].strip()
        values = {c: row[i].strip() for c, i in keep_idx if i < len(row) and row[i].strip().casefold() not in _NA}
        if rid in table and table[rid] != values:
            raise CaseLabelError(f"{path}: id {rid!r} appears twice with different labels (line {n})")
        table[rid] = values

    if ids is None:
        return CaseLabels(path, id_col, keep, table, missing=[], unmatched=[])
    mapping = _match_ids(table, ids)
    labels: dict[str, dict[str, str]] = {}
    for rid, cid in mapping.items():
        if cid in labels and labels[cid] != table[rid]:
            raise CaseLabelError(f"{path}: case {cid!r} matches several rows with different labels")
        labels[cid] = table[rid]
    ordered = {cid: labels[cid] for cid in ids if cid in labels}
    missing = [cid for cid in ids if cid not in labels]
    unmatched = [rid for rid in table if rid not in mapping]
    return CaseLabels(path, id_col, keep, ordered, missing=missing, unmatched=unmatched)


def group_labels(cases: Iterable[object], column: str = "grade",
                 groups: Sequence[str] = ("HGG", "LGG")) -> dict[str, dict[str, str]]:
    """Labels from the folder a case sits in (BraTS 2018/19 `HGG/`, `LGG/`): case id -> {column: group}.

    Args:
        cases: `CaseFiles` from `find_cases` (uses `.case_id` and `.group`).
        column: label column name to fill.
        groups: folder names that are labels (the last path part of the group is compared).
    """
    out = {}
    for case in cases:
        group = getattr(case, "group", None)
        name = group.rsplit("/", 1)[-1] if group else None
        if name in groups:
            out[case.case_id] = {column: name}  # type: ignore[attr-defined]
    return out
