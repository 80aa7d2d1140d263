"""Bad label CSVs: random text or bytes, no id column, duplicated ids, unicode ids and values.

Every failure is a CaseLabelError naming the CSV; whatever is read is what was written.
"""

from __future__ import annotations

import csv
import io
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aldm_fed.data.case_labels import (
    ID_COLUMNS,
    CaseLabelError,
    CaseLabels,
    read_case_labels,
)

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NA = {"", "na", "n/a", "nan", "none", "null", "-"}
# Ids and values as users write them: any printable unicode, no surrounding blanks, not an NA word.
CELL = st.text(st.characters(categories=["L", "N", "P", "S", "Zs"], exclude_characters="\x00"), min_size=1,
               max_size=10).map(str.strip).filter(lambda s: s and s.casefold() not in NA)


def _read(content: str | bytes, **kwargs) -> CaseLabels:
    with tempfile.TemporaryDirectory(prefix="läbels ") as tmp:
        path = Path(tmp) / "labels.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        try:
            return read_case_labels(path, **kwargs)
        except CaseLabelError as exc:
            assert str(exc).startswith(f"{path}: "), exc
            raise


def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


@FAST
@given(content=st.binary(max_size=300) | st.text(max_size=300), with_ids=st.booleans())
def test_random_content_is_a_label_error_or_a_table(content, with_ids):
    try:
        table = _read(content, case_ids=["BraTS-GLI-00001-000"] if with_ids else None)
    except CaseLabelError:
        return
    assert all(isinstance(v, dict) for v in table.values())


@FAST
@given(header=st.lists(CELL, min_size=2, max_size=4, unique=True), rows=st.lists(st.lists(CELL, min_size=4, max_size=4),
                                                                                  max_size=4))
def test_no_id_column_is_named(header, rows):
    assume(not any(re.sub(r"[^0-9a-z]", "", h.casefold()) in ID_COLUMNS for h in header))
    with pytest.raises(CaseLabelError, match="no id column"):
        _read(_csv([header, *[r[: len(header)] for r in rows]]))


@FAST
@given(ids=st.lists(CELL, min_size=1, max_size=6, unique=True), grades=st.data(),
       delimiter=st.sampled_from([",", ";", "\t"]))
def test_unicode_ids_and_values_read_back_exactly(ids, grades, delimiter):
    values = [grades.draw(CELL) for _ in ids]
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter).writerows([["case_id", "grade"], *zip(ids, values, strict=True)])
    table = _read(buf.getvalue())
    assert table.id_column == "case_id"
    assert table.to_dict() == {i: {"grade": v} for i, v in zip(ids, values, strict=True)}


@FAST
@given(case=CELL, first=CELL, second=CELL)
def test_an_id_twice_with_different_labels_is_named(case, first, second):
    content = _csv([["case_id", "grade"], [case, first], [case, second]])
    if first == second:
        assert _read(content).to_dict() == {case: {"grade": first}}
        return
    with pytest.raises(CaseLabelError) as info:
        _read(content)
    assert repr(case) in str(info.value)


@pytest.mark.parametrize(("content", "expected"), [
    # Found by the property above: csv.Sniffer misread these (wrong delimiter, or quotes kept).
    ('case_id,grade\r\n""";",a\r\n', {'";': {"grade": "a"}}),
    ('case_id;grade\r\nü;"""ü;"\r\n', {"ü": {"grade": '"ü;'}}),
    ('case_id\tgrade\r\n""","\ty\r\n', {'",': {"grade": "y"}}),
    ('case_id,grade\n0,",0"""\n', {"0": {"grade": ',0"'}}),
    ('case_id\tgrade\n"a\nb"\tHGG\n', {"a\nb": {"grade": "HGG"}}),  # a quoted newline inside a cell
])
def test_quoted_cells_found_by_hypothesis(content, expected):
    assert _read(content).to_dict() == expected
