"""Bad manifests: random JSON, wrong field types, odd ids, duplicated or unknown cases.

Every one is a ManifestError whose message names the manifest file (and the field); nothing else
escapes `read_manifest` or `load_split`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from props_helpers import assert_clear_failure, invoke, make_case

from aldm_fed.data.manifest import (
    ManifestError,
    SiteManifest,
    make_manifest,
    read_manifest,
    write_manifest,
)
from aldm_fed.data.volumes import load_split

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
VALID = {"version": 1, "site": "A", "data_root": "..", "seed": 0, "k": 2, "label_column": "grade",
         "splits": {"source": ["c-1"], "target": ["c-2", "c-3"], "test": ["c-4"]},
         "labels": {"c-1": {"grade": "HGG"}}}
# What each field must be; a generated value of another kind must be refused, naming the field.
KINDS = {"site": str, "data_root": str, "seed": int, "k": int, "splits": dict, "label_column": (str, type(None)),
         "labels": dict}


def _read(content: str | bytes) -> SiteManifest:
    with tempfile.TemporaryDirectory(prefix="mänifest ") as tmp:
        path = Path(tmp) / "A.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        try:
            return read_manifest(path)
        except ManifestError as exc:
            assert str(exc).startswith(f"{path}: "), exc
            raise


@FAST
@given(blob=st.binary(max_size=200) | JSON.map(json.dumps))
def test_random_content_is_a_manifest_error_or_a_manifest(blob):
    try:
        manifest = _read(blob)
    except ManifestError:
        return
    assert isinstance(manifest, SiteManifest)  # a random object that happens to be a valid manifest


@FAST
@given(field=st.sampled_from(sorted(KINDS)), value=JSON)
def test_a_field_of_the_wrong_type_names_the_field(field, value):
    kind = KINDS[field]
    wrong_type = isinstance(value, bool) or not isinstance(value, kind)
    raw = {**VALID, field: value}
    if not wrong_type:
        return  # right type: covered by the other tests
    with pytest.raises(ManifestError) as info:
        _read(json.dumps(raw))
    assert repr(field) in str(info.value) or "split" in str(info.value), info.value


@FAST
@given(name=st.sampled_from(["", " ", ".", "..", "../x", "a/b", "a\\b", "x\ny", "\x00"]),
       where=st.sampled_from(["site", "case"]))
def test_names_that_are_not_one_path_component_are_refused(name, where):
    raw = json.loads(json.dumps(VALID))
    if where == "site":
        raw["site"] = name
    else:
        raw["splits"]["test"] = [name]
    with pytest.raises(ManifestError) as info:
        _read(json.dumps(raw))
    assert ("'site'" if where == "site" else "'test'") in str(info.value)


@FAST
@given(case=st.sampled_from(["c-1", "c-2", "c-4"]), split=st.sampled_from(["source", "target", "test"]))
def test_a_case_listed_twice_is_refused_naming_it(case, split):
    raw = json.loads(json.dumps(VALID))
    raw["splits"][split].append(case)
    with pytest.raises(ManifestError) as info:
        _read(json.dumps(raw))
    assert repr(case) in str(info.value) and repr(split) in str(info.value)


@FAST
@given(ids=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12), k=st.integers(-2, 14),
       site=st.text(max_size=6))
def test_made_manifests_read_back_or_are_refused_when_made(ids, k, site):
    """What make_manifest accepts, read_manifest reads back unchanged (unicode ids included)."""
    try:
        manifest = make_manifest(site, ids, k=k)
    except ValueError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write_manifest(manifest, Path(tmp) / "m.json")
        try:
            back = read_manifest(path)
        except ManifestError as exc:  # only ids that cannot name a folder are refused on reading
            assert "cannot name a case folder" in str(exc), exc
            return
    assert back.to_dict() == manifest.to_dict()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unknown=st.text(alphabet="abcXYZ-_0ü", min_size=1, max_size=10), split=st.sampled_from(["target", "test"]))
def test_a_case_without_a_folder_names_the_manifest(unknown, split):
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp)
        make_case(cohort / "A", "BraTS-GLI-00001-000")
        splits = {"source": [], "target": ["BraTS-GLI-00001-000"], "test": []}
        splits[split] = [*splits[split], unknown] if unknown != "BraTS-GLI-00001-000" else splits[split]
        path = write_manifest(SiteManifest(site="A", data_root="../A", splits=splits), cohort / "manifests" / "A.json")
        cfg = OmegaConf.create({"paths": {"cohort": str(cohort), "cache": str(cohort / "cache")},
                                "data": {"size": 8, "spacing": None}, "source_sites": None})
        with pytest.raises(ManifestError) as info:
            load_split(cfg, split, sites=["A"], progress=False)
        assert str(path) in str(info.value) and repr(unknown) in str(info.value) and repr(split) in str(info.value)
        assert not (cohort / "cache").exists()  # refused before preparing anything


def test_a_case_in_two_sites_names_the_manifest(tmp_path):
    for site in ("A", "B"):
        make_case(tmp_path / site, "BraTS-GLI-00001-000")
        write_manifest(SiteManifest(site=site, data_root=f"../{site}", splits={"target": ["BraTS-GLI-00001-000"]}),
                       tmp_path / "manifests" / f"{site}.json")
    cfg = OmegaConf.create({"paths": {"cohort": str(tmp_path), "cache": str(tmp_path / "cache")},
                            "data": {"size": 8, "spacing": None}, "source_sites": None})
    with pytest.raises(ManifestError, match="B.json.*'BraTS-GLI-00001-000'.*site 'A'"):
        load_split(cfg, "target", sites=["A", "B"], progress=False)


def test_data_manifest_refuses_a_site_name_that_is_a_path(tmp_path):
    make_case(tmp_path / "A", "BraTS-GLI-00001-000")
    result = invoke("data", "manifest", tmp_path / "A", "--site", "../evil", "--out", tmp_path / "m.json", "--k", "1")
    assert_clear_failure(result, "../evil")
    assert not (tmp_path / "m.json").exists()
