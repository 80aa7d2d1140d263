"""`aldm-fed simulate`: every site on this machine through Flower's simulation engine, with the
same ServerApp and ClientApp as a deployment, on the embedded phantom cohort by default.

Each simulated site is its own Ray actor with `fed.simulation.cpus_per_site` CPUs and its own
state folder (`<fed.state>/sites/<site>`); they share only the cohort folder, from which each
reads its own manifest and cases. Progress: one log line per round and per site step.

The global models are signed and verified as in a deployment: the run makes its own signing
pair in `<fed.state>/signing/` (private key 0600; `signing.ensure_signing_pair`), the server
signs with it and every simulated site verifies with its public half.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aldm_fed.config import absolute_paths
from aldm_fed.federation.apps import Mod, client_app, server_app
from aldm_fed.federation.coordinator import STATUS_FILE, expected_sites
from aldm_fed.federation.signing import ensure_signing_pair
from aldm_fed.federation.strategy import FederationError

__all__ = ["simulate"]

log = logging.getLogger(__name__)


def simulate(cfg: Any, *, mods: Sequence[Mod] = (), progress: bool = True) -> dict[str, Any]:
    """Run the federated pipeline with every site simulated on this machine.

    Makes the phantom cohort at `paths.cohort` first when that folder is missing or empty
    (`phantom` config group).

    Args:
        cfg: the composed config.
        mods: extra ClientApp mods (tests record every reply with one).
        progress: show the phantom's progress bar.

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
    cpus = float(cfg.fed.simulation.cpus_per_site)
    if cfg.device.get("num_threads") is None:
        cfg.device.num_threads = max(1, int(cpus))  # one actor per core pair must not oversubscribe
    status_path = Path(cfg.fed.state) / STATUS_FILE
    status_path.unlink(missing_ok=True)
    ensure_signing_pair(cfg.fed.state)  # no certificates here: the run's own key pair
    log.info("simulating sites %s (%s CPU each); state in %s", list(cfg.fed.sites), cpus, cfg.fed.state)
    # Flower's Ray backend writes this process's sys.path into os.environ["PYTHONPATH"] for its
    # actors and leaves it there; every later child process of ours would inherit it.
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(
            server_app=server_app(cfg),
            client_app=client_app(cfg, mods=mods),
            num_supernodes=len(cfg.fed.sites),
            backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}},
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
