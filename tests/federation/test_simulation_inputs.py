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


def test_sites_share_the_cores_so_that_all_run_at_once() -> None:
    """`cpus_per_site: null`: as many Ray actors fit as there are sites (Flower sizes its pool as
    int(total / share)), with a share Ray accepts (a fraction <= 1 or a whole number)."""
    from aldm_fed.federation.simulation import site_cpus

    for total in (1, 2, 3, 4, 8, 16):
        for n in range(1, 13):
            share = site_cpus(total, n, None)
            assert 0 < share and (share <= 1 or share.is_integer())
            assert int(total / share) >= min(n, total * 100), (total, n, share)
    assert site_cpus(2, 3, None) == 0.66 and site_cpus(2, 1, None) == 2.0 and site_cpus(8, 3, None) == 2.0
    assert site_cpus(2, 3, 1) == 1.0  # a number pins it (at most two sites at once on 2 cores)
    for bad in (0, -1, 1.5, "abc"):
        with pytest.raises(ValueError, match="cpus_per_site"):
            site_cpus(2, 3, bad)
