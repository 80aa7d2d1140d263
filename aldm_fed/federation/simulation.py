"""`aldm-fed simulate`: every site on this machine through Flower's simulation engine, with the
same ServerApp and ClientApp as a deployment, on the embedded phantom cohort by default.

Each simulated site is its own Ray actor with `fed.simulation.cpus_per_site` CPUs (by default
the machine's CPUs shared by all sites, so that all run at once: `site_cpus`) and its own state
folder (`<fed.state>/sites/<site>`); they share only the cohort folder, from which each reads its
own manifest and cases. Progress: one log line per round and per site step; Flower's own INFO
lines go to `<fed.state>/flower.log` (`flower_log`), and to the terminal only with `verbose`.

The global models are signed and verified as in a deployment: the run makes its own signing
pair in `<fed.state>/signing/` (private key 0600; `signing.ensure_signing_pair`), the server
signs with it and every simulated site verifies with its public half.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from aldm_fed.config import absolute_paths
from aldm_fed.federation.apps import Mod, client_app, server_app
from aldm_fed.federation.coordinator import STATUS_FILE, expected_sites
from aldm_fed.federation.signing import ensure_signing_pair
from aldm_fed.federation.strategy import FederationError
from aldm_fed.training.device import available_cpus

__all__ = ["FLOWER_LOG", "flower_log", "simulate", "site_cpus"]

log = logging.getLogger(__name__)


def site_cpus(total: int, n_sites: int, setting: float | None) -> float:
    """Ray CPUs for each simulated site (`fed.simulation.cpus_per_site`).

    `None` shares the `total` CPUs among all sites so that they all run at once. Why: with 2 cores
    and one CPU per site, three sites' local phases ran two, then one, with a core idle for the
    last third of the phase (measured: 585 of its 1273 s). The share is rounded DOWN (to a whole
    number above 1, as Ray requires, and to 0.01 below), so that `int(total / share)` actors fit.

    Args:
        total: the CPUs Ray is given.
        n_sites: the simulated sites.
        setting: the config value; a number is used as it is (checked positive).
    """
    if setting is not None:
        try:
            value = float(setting)
        except (TypeError, ValueError):
            raise ValueError(f"fed.simulation.cpus_per_site must be a number or null, got {setting!r}") from None
        if value <= 0 or (value > 1 and not value.is_integer()):
            raise ValueError(f"fed.simulation.cpus_per_site must be a fraction in (0, 1], a whole number "
                             f"(Ray's rule) or null, got {setting}")
        return value
    share = total / max(1, n_sites)
    return float(math.floor(share)) if share >= 1 else max(0.01, math.floor(share * 100) / 100)


FLOWER_LOG = "flower.log"  # <fed.state>/flower.log: Flower's own lines and ours, every level from INFO


def simulate(cfg: Any, *, mods: Sequence[Mod] = (), progress: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Run the federated pipeline with every site simulated on this machine.

    Makes the phantom cohort at `paths.cohort` first when that folder is missing or empty
    (`phantom` config group).

    Args:
        cfg: the composed config.
        mods: extra ClientApp mods (tests record every reply with one).
        progress: show the phantom's progress bar.
        verbose: also print Flower's own INFO lines (strategy banners, per-round summaries);
            without it the terminal shows our progress lines and warnings only. Both ways every
            line goes to `<fed.state>/flower.log`.

    Returns:
        The run's final status (`<fed.state>/status.json`): `status`, `report`, `seconds`, ...

    Raises:
        FederationError: the run did not finish (the status file holds the error).
    """
    from flwr.simulation import run_simulation

    cfg = absolute_paths(cfg)
    cohort = Path(cfg.paths.cohort)
    if not (cohort / "manifests").is_dir():
        from aldm_fed.data.phantom import PhantomConfig, make_cohort

        # Never write a phantom into someone's data folder: only into a missing or empty one, or
        # one holding nothing but what an interrupted phantom run writes (it resumes).
        phantom_names = {*map(str, cfg.phantom.sites), "labels.csv", "cohort.json", "previews"}
        if cohort.is_dir() and any(p.name not in phantom_names for p in cohort.iterdir()):
            raise ValueError(
                f"{cohort}: no manifests/ folder; make one per site with `aldm-fed data manifest`, or "
                f"point paths.cohort at an empty folder for the embedded phantom cohort"
            )

        log.info("no cohort at %s: making the embedded phantom cohort there", cohort)
        make_cohort(cohort, PhantomConfig.from_mapping(cfg.phantom), seed=int(cfg.seed), progress=progress)
    cfg.fed.sites = expected_sites(cfg)
    total = available_cpus()
    cpus = site_cpus(total, len(cfg.fed.sites), cfg.fed.simulation.cpus_per_site)
    if cfg.device.get("num_threads") is None:
        cfg.device.num_threads = max(1, int(cpus))  # sites that share the cores must not oversubscribe them
    status_path = Path(cfg.fed.state) / STATUS_FILE
    status_path.unlink(missing_ok=True)
    ensure_signing_pair(cfg.fed.state)  # no certificates here: the run's own key pair
    log.info("simulating sites %s (%s CPU each); state in %s", list(cfg.fed.sites), cpus, cfg.fed.state)
    # Flower's Ray backend writes this process's sys.path into os.environ["PYTHONPATH"] for its
    # actors and leaves it there; every later child process of ours would inherit it.
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        with flower_log(Path(cfg.fed.state) / FLOWER_LOG, verbose=verbose):
            run_simulation(
                server_app=server_app(cfg),
                client_app=client_app(cfg, mods=mods),
                num_supernodes=len(cfg.fed.sites),
                backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                                "init_args": {"num_cpus": total}},
            )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    try:
        status = json.loads(status_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise FederationError(f"the simulated run ended without a status at {status_path}; see the log above") from None
    if status.get("status") != "done":
        raise FederationError(f"the simulated run failed in phase {status.get('phase')}: {status.get('error')}")
    return status


class _Unless(logging.Filter):
    """Drops records whose message starts with one of `prefixes` (known, harmless lines)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


@contextlib.contextmanager
def flower_log(path: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Flower's lines and ours into `path`; Flower's console lines only at `verbose` (warnings always).

    Why: a run printed pages of Flower INFO lines (strategy banners, metric dumps) around our own
    per-round and per-site lines. Both stay in the file, next to the run's state.

    Args:
        path: the log file (appended to: a resumed run keeps its history).
        verbose: leave Flower's console at INFO.
    """
    from flwr.common.logger import FLOWER_LOGGER, ConsoleHandler

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    ours = logging.getLogger("aldm_fed")
    consoles = [h for h in FLOWER_LOGGER.handlers if isinstance(h, ConsoleHandler)]
    before = [h.level for h in consoles]
    # fraction_evaluate=0 is deliberate: sites evaluate in the local phase, not in Flower's
    # evaluate round, so Flower's warning about it says nothing to act on.
    skip = _Unless("fraction_evaluate is set to 0.0")
    FLOWER_LOGGER.addHandler(handler)
    ours.addHandler(handler)
    for h in consoles:
        h.addFilter(skip)
        if not verbose:
            h.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Ray's tip that a future Ray will stop hiding GPUs from actors asking for none: our
            # sites ask for none (num_gpus 0) and run on CPU, today's behaviour; nothing to change.
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            yield path
    finally:
        for h, level in zip(consoles, before):
            h.removeFilter(skip)
            h.setLevel(level)
        FLOWER_LOGGER.removeHandler(handler)
        ours.removeHandler(handler)
        handler.close()
