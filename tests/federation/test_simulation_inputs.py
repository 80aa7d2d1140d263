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


def test_flower_lines_go_to_the_log_file_and_the_console_shows_warnings_only(tmp_path):
    """The terminal of a run shows our lines and warnings; Flower's INFO lines only at --verbose;
    every line in <fed.state>/flower.log."""
    import logging
    import warnings

    from flwr.common.logger import FLOWER_LOGGER, ConsoleHandler

    from aldm_fed.federation.simulation import flower_log

    console = [h for h in FLOWER_LOGGER.handlers if isinstance(h, ConsoleHandler)]
    assert console
    levels = [h.level for h in console]
    path = tmp_path / "state" / "flower.log"
    with flower_log(path) as log_path:
        assert all(h.level == logging.WARNING for h in console)
        FLOWER_LOGGER.info("Starting PhaseFedAvg strategy:")
        FLOWER_LOGGER.warning("fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        logging.getLogger("aldm_fed.federation.coordinator").warning("[vae] round 1: ours")
        record = logging.LogRecord("flwr", logging.WARNING, __file__, 1, "fraction_evaluate is set to 0.0.", None, None)
        assert not all(f.filter(record) for f in console[0].filters)  # dropped from the console
    assert [h.level for h in console] == levels and not console[0].filters  # restored
    text = log_path.read_text()
    assert "Starting PhaseFedAvg strategy" in text and "[vae] round 1: ours" in text
    with flower_log(path, verbose=True):
        assert [h.level for h in console] == levels  # --verbose: Flower's INFO on the console too
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # anything not filtered would raise
            with flower_log(path):
                warnings.warn("Tip: In future versions of Ray, Ray will no longer ...", FutureWarning)
                with pytest.raises(FutureWarning):  # only that one is silenced
                    warnings.warn("something else", FutureWarning)
