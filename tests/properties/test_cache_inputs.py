"""A damaged preprocessed cache: every broken file is a CacheError naming it, and `prepare` rebuilds.

Random bytes, truncation, another dtype or shape, pickled objects or random JSON in the files of
one cached case (docs/contracts.md: image.npy, seg.npy, brain.npy, meta.json, index.json).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from props_helpers import make_case

from aldm_fed.data.brats import DataConfig
from aldm_fed.data.cache import CacheError, CaseCache
from aldm_fed.data.preprocess import prepare_dataset

CASE = "BraTS-GLI-00001-000"
CFG = DataConfig(size=8, spacing=None)
FILES = st.sampled_from(["image.npy", "seg.npy", "brain.npy", "meta.json", "index.json"])
DAMAGE = st.sampled_from(["random-bytes", "truncated", "empty", "float64", "shape", "pickled", "json-list"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cache_src")
    make_case(root / "data", CASE)
    summary = prepare_dataset(root / "data", root / "cache", CFG, progress=False)
    assert summary.prepared == [CASE]
    return root / "data", root / "cache"


def _damage(path: Path, how: str, rng: np.random.Generator) -> None:
    if how == "random-bytes":
        path.write_bytes(rng.bytes(int(rng.integers(1, 300))))
    elif how == "truncated":
        blob = path.read_bytes()
        path.write_bytes(blob[: int(len(blob) * rng.uniform(0.05, 0.95))])
    elif how == "empty":
        path.write_bytes(b"")
    elif path.suffix == ".json":
        path.write_text("[1, 2, 3]" if how == "json-list" else '{"version": 1, "case_id": 5, "affine": "x"}')
    elif how == "float64":
        np.save(path, np.load(path).astype(np.float64))
    elif how == "shape":
        np.save(path, np.load(path)[..., :-1])
    else:  # pickled / json-list on an array: an object array, which must never be unpickled
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(name=FILES, how=DAMAGE, seed=st.integers(0, 2**16))
def test_a_damaged_cache_file_is_named_and_rebuilt(prepared, name, how, seed):
    data, source = prepared
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        shutil.copytree(source, cache)
        path = cache / name if name == "index.json" else cache / CASE / name
        _damage(path, how, np.random.default_rng(seed))
        with pytest.raises(CacheError) as info:
            CaseCache(cache).load(CASE)
        assert str(path) in str(info.value) or (str(path.parent) in str(info.value) and path.name in str(info.value))

        summary = prepare_dataset(data, cache, CFG, progress=False)  # resume: the damaged case is rebuilt
        assert not summary.failed
        back = CaseCache(cache).load(CASE)
        assert back.image.shape == (4, 8, 8, 8) and back.seg.dtype == np.uint8
