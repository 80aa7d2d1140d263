"""`aldm-fed simulate` refuses inputs it must not touch, before starting anything."""

from __future__ import annotations

import pytest

from aldm_fed.config import compose
from aldm_fed.federation.simulation import simulate


def test_simulate_never_writes_a_phantom_into_a_data_folder(tmp_path) -> None:
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "case_001").mkdir()
    with pytest.raises(ValueError, match="no manifests"):
        simulate(compose(["experiment=tiny", f"paths.cohort={tmp_path / 'mydata'}",
                          f"paths.runs={tmp_path / 'runs'}"]), progress=False)
    assert [p.name for p in (tmp_path / "mydata").iterdir()] == ["case_001"]
