from __future__ import annotations

import json
import zlib
from collections import Counter

import pytest

from aldm_fed.data.manifest import ManifestError, _stratified_order, make_manifest, read_manifest, write_manifest
from aldm_fed.data.patients import patient_id


def _cohort(n: int = 30) -> tuple[list[str], dict[str, dict[str, str]]]:
    ids = [f"C-{i:03d}" for i in range(n)]
    labels = {c: {"grade": "LGG" if i % 3 == 0 else "HGG"} for i, c in enumerate(ids)}
    return ids, labels


def test_splits_are_disjoint_complete_and_sized():
    ids, labels = _cohort()
    m = make_manifest("A", ids, k=8, n_source=10, labels=labels, label_column="grade")
    assert len(m.cases("target")) == 8 and len(m.cases("source")) == 10
    assert sorted(m.all_cases) == sorted(ids)  # n_test=None takes the rest
    assert len(set(m.all_cases)) == len(ids)


def test_splits_are_deterministic_and_seed_dependent():
    ids, labels = _cohort()
    a = make_manifest("A", ids, k=8, labels=labels, label_column="grade", seed=1)
    b = make_manifest("A", list(reversed(ids)), k=8, labels=labels, label_column="grade", seed=1)
    c = make_manifest("A", ids, k=8, labels=labels, label_column="grade", seed=2)
    assert a.splits == b.splits
    assert a.splits != c.splits


def test_target_split_is_stratified_by_label():
    ids, labels = _cohort(60)  # 1/3 LGG
    for seed in range(5):
        m = make_manifest("B", ids, k=12, labels=labels, label_column="grade", seed=seed)
        counts = Counter(m.label(c) for c in m.cases("target"))
        assert counts["LGG"] == 4 and counts["HGG"] == 8


def test_too_few_cases_is_a_clear_error():
    ids, _ = _cohort(5)
    with pytest.raises(ValueError, match="5 cases cannot fill"):
        make_manifest("A", ids, k=4, n_source=2)


def test_round_trip_and_root_resolution(tmp_path):
    ids, labels = _cohort()
    m = make_manifest("A", ids, k=4, n_test=6, labels=labels, label_column="grade", data_root="../A")
    path = write_manifest(m, tmp_path / "manifests" / "A.json")
    back = read_manifest(path)
    assert back.to_dict() == m.to_dict()
    assert back.resolve_root(path) == (tmp_path / "A").resolve()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON manifest"),
        ("[1, 2]", "must be a JSON object"),
        ('{"site": "A", "data_root": ".", "splits": {"target": "x"}}', "list of case id strings"),
        ('{"site": "A", "data_root": ".", "splits": {"train": []}}', "unknown split"),
        ('{"site": "A", "splits": {}}', "'data_root' missing"),
        ('{"version": 9, "site": "A", "data_root": ".", "splits": {}}', "version 9"),
        (
            '{"site": "A", "data_root": ".", "splits": {"target": ["x"], "test": ["x"]}}',
            "in both 'target' and 'test'",
        ),
    ],
)
def test_bad_manifest_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_written_manifest_is_plain_json(tmp_path):
    ids, _ = _cohort(10)
    path = write_manifest(make_manifest("C", ids, k=3), tmp_path / "C.json")
    raw = json.loads(path.read_text())
    assert raw["site"] == "C" and raw["k"] == 3 and len(raw["splits"]["target"]) == 3


def test_follow_up_scans_of_a_patient_stay_in_one_split():
    """BraTS 2023 ids carry a timepoint (`-000`, `-001`): a patient's scans never straddle two splits."""
    ids = [f"BraTS-GLI-{p:05d}-{t:03d}" for p in range(20) for t in range(2 if p % 4 == 0 else 1)]
    assert len(ids) == 25
    for seed in range(5):
        m = make_manifest("A", ids, k=6, n_source=5, n_test=10, seed=seed)
        sizes = [len(m.cases(s)) for s in ("target", "source", "test")]
        assert sizes == [6, 5, 10]
        where = {}
        for split in ("target", "source", "test"):
            for case in m.cases(split):
                where.setdefault(patient_id(case), set()).add(split)
        assert all(len(splits) == 1 for splits in where.values()), where


def test_one_scan_per_patient_splits_as_plain_cuts_of_the_order():
    # With one scan per patient nothing moves: the splits are cuts of the stratified order, as they
    # were before splits went by patient (existing cohorts' manifests are drawn the same).
    ids, labels = _cohort()
    m = make_manifest("A", ids, k=8, n_source=10, n_test=7, labels=labels, label_column="grade", seed=3)
    order = _stratified_order(sorted(ids), labels, "grade", seed=3 ^ zlib.crc32(b"A"))
    assert m.splits == {"target": sorted(order[:8]), "source": sorted(order[8:18]), "val": [],
                        "test": sorted(order[18:25]), "oracle": []}


def test_val_and_oracle_splits_leave_the_other_splits_as_they_were():
    # The validation and oracle cases come after target and source: adding them to a cohort's
    # manifest keeps its K few-shot and source cases, and takes them from what was test.
    ids, labels = _cohort(40)
    old = make_manifest("A", ids, k=8, n_source=10, labels=labels, label_column="grade", seed=3)
    new = make_manifest("A", ids, k=8, n_source=10, n_val=6, n_oracle=5, n_test=11, labels=labels,
                        label_column="grade", seed=3)
    assert new.cases("target") == old.cases("target") and new.cases("source") == old.cases("source")
    assert [len(new.cases(s)) for s in ("val", "oracle", "test")] == [6, 5, 11]
    assert set(new.cases("val")) | set(new.cases("oracle")) | set(new.cases("test")) <= set(old.cases("test"))
    assert Counter(new.label(c) for c in new.cases("val")) == Counter({"HGG": 4, "LGG": 2})  # stratified too
    with pytest.raises(ValueError, match="40 cases cannot fill k=8 target \\+ 10 source \\+ 20 val"):
        make_manifest("A", ids, k=8, n_source=10, n_val=20, n_test=5)


def test_a_version_1_manifest_reads_with_empty_val_and_oracle(tmp_path):
    path = tmp_path / "A.json"
    path.write_text(json.dumps({"version": 1, "site": "A", "data_root": ".", "seed": 0, "k": 2,
                                "splits": {"source": ["a"], "target": ["b", "c"], "test": ["d"]}}))
    m = read_manifest(path)
    assert m.cases("val") == [] and m.cases("oracle") == [] and m.cases("test") == ["d"]
    assert write_manifest(m, tmp_path / "B.json") and read_manifest(tmp_path / "B.json").version == 2


def test_patient_ids():
    assert patient_id("BraTS-GLI-00124-000") == patient_id("BraTS-GLI-00124-001") == "BraTS-GLI-00124"
    assert patient_id("BraTS-MEN-00003-002") == "BraTS-MEN-00003"
    for plain in ("BraTS2021_00124", "A-0003", "BraTS-GLI-00124", "BraTS-GLI-00124-0001"):
        assert patient_id(plain) == plain
