"""The Flower app bundle: the app's code (`server/`, `client/`) and its run config, staged as the
folder that `flwr run` bundles.

Flower carries the run config as flat `key = value` pairs (dotted keys, bool/int/float/str, integers
as sint64); every process uses this environment, so the bundle lists no dependencies.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aldm_fed import __version__
from aldm_fed.io import atomic_dir

__all__ = ["PUBLISHER", "app_source_dir", "stage_app"]

PUBLISHER = "aldm-fed"  # [tool.flwr.app] publisher; also marks a folder as staged by us
_APP_PARTS = ("server", "client")
_INT64 = (-(2**63), 2**63 - 1)  # Flower carries run-config integers as sint64


def app_source_dir() -> Path:
    """The folder holding the Flower app components `server/` and `client/`.

    The checkout's root (next to `aldm_fed/`), else the copy a wheel install ships as data
    (`<prefix>/share/aldm-fed/app`, pyproject `shared-data`), found the way `config_dir()` finds
    the configs.

    Raises:
        FileNotFoundError: neither has `server/app.py` and `client/app.py`.
    """
    checkout = Path(__file__).resolve().parents[2]
    installed = Path(sysconfig.get_path("data")) / "share" / "aldm-fed" / "app"
    for root in (checkout, installed):
        if all((root / part / "app.py").is_file() for part in _APP_PARTS):
            return root
    raise FileNotFoundError(
        f"no Flower app found (looked for server/app.py and client/app.py in {checkout} and"
        f" {installed}); reinstall aldm-fed"
    )


def stage_app(
    dest: str | os.PathLike[str],
    run_config: Mapping[str, bool | int | float | str],
    *,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Build the Flower app folder that `flwr run` bundles: the app's code and its run config.

    The folder holds `server/` and `client/` (their .py files) and a pyproject.toml whose
    `[tool.flwr.app.config]` is `run_config` with each dotted key quoted, so Flower's own
    flattening gives `context.run_config == run_config` on the server and on every site.
    `dependencies` is empty: the SuperLink runs with runtime dependency installation disabled and
    every process uses this environment. Flower bundles only *.py/*.toml/*.md/*.yaml/*.json files
    and refuses bundles over 10 MB; code plus a flat config is a few tens of kB.

    Args:
        dest: the app folder, replaced as a whole if it holds an app staged before.
        run_config: Flower's run config (`aldm_fed.config.flatten_config` of the composed config).
        source: folder with `server/` and `client/` (default: `app_source_dir()`).

    Returns:
        `dest`.

    Raises:
        ValueError: a run-config value Flower cannot carry, or `dest` exists and is not an app
            staged by this function (it is never deleted then).
        FileNotFoundError: the source has no server/app.py or client/app.py.
    """
    import tomli_w

    dest = Path(dest)
    source = Path(source) if source is not None else app_source_dir()
    _check_run_config(run_config)
    for part in _APP_PARTS:
        if not (source / part / "app.py").is_file():
            raise FileNotFoundError(f"{source / part / 'app.py'}: the Flower app component is missing")
    if dest.exists() and any(dest.iterdir()) and not _is_staged_app(dest):
        raise ValueError(f"{dest} exists and is not an app folder staged by aldm-fed; not replacing it")

    pyproject = {
        "project": {
            "name": "aldm-fed",
            "version": __version__,
            "description": "aldm-fed federated run (staged by `aldm-fed server`)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                    "config": dict(run_config),
                }
            }
        },
    }
    with atomic_dir(dest) as tmp:
        for part in _APP_PARTS:
            for path in sorted((source / part).rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                target = tmp / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        (tmp / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    return dest


def _check_run_config(run_config: Mapping[str, Any]) -> None:
    for key, value in run_config.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ValueError(f"run config key {key!r} is empty or has an empty dotted part")
        if not isinstance(value, bool | int | float | str):
            raise ValueError(f"run config {key!r}: {type(value).__name__} is not bool, int, float or str")
        if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"run config {key!r}: {value} does not fit Flower's 64-bit integers")


def _is_staged_app(folder: Path) -> bool:
    import tomllib

    try:
        config = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return config.get("tool", {}).get("flwr", {}).get("app", {}).get("publisher") == PUBLISHER
