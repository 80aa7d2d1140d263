"""Compose Hydra configs for the CLI and the library.

The configs live in the checkout's top-level `configs/` (the design card); a wheel install carries
a copy as data files in `<prefix>/share/aldm-fed/configs` (pyproject `shared-data`). `compose()` is the one entry: the CLI, tests and (later) the Flower apps
all build their config through it, so a run is fully described by its override list.

Flower carries a run's settings as a flat "run config" (dotted keys -> bool | int | float | str).
`flatten_config` / `unflatten_config` turn one composed config into that and back, exactly: the
server and every site of a federated run rebuild the same config from it.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["JSON_PREFIX", "absolute_paths", "compose", "config_dir", "flatten_config", "unflatten_config"]

# Values Flower's run config cannot hold (lists, None, empty mappings) travel as JSON text with
# this prefix; a plain string that happens to start with it is encoded the same way, so decoding
# is never ambiguous.
JSON_PREFIX = "json:"
RunConfigValue = bool | int | float | str


def config_dir() -> Path:
    """The folder of Hydra configs: the checkout's `configs/`, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / "config.yaml").is_file():
        return checkout
    installed = Path(sysconfig.get_path("data")) / "share" / "aldm-fed" / "configs"
    if (installed / "config.yaml").is_file():
        return installed
    raise FileNotFoundError(
        f"no Hydra configs found (looked in {checkout} and {installed}); reinstall aldm-fed"
    )


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose `config_name` with Hydra overrides (e.g. ``["experiment=tiny", "data.size=32"]``).

    Raises:
        ValueError: an override names an unknown key or group (Hydra's message is kept).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ValueError(f"bad config override(s) {list(overrides)}: {exc}") from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_readonly(cfg, False)
    return cfg


def flatten_config(cfg: Any) -> dict[str, RunConfigValue]:
    """A composed config as Flower's run config: dotted keys -> bool | int | float | str.

    Interpolations are resolved first (the receiving side has no Hydra defaults to resolve them
    against). Lists, None and empty mappings become ``"json:<JSON>"`` strings.

    Args:
        cfg: a DictConfig or a plain nested mapping.

    Raises:
        ValueError: a key contains a dot (it could not be split back).
    """
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, RunConfigValue] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                key = str(key)
                if "." in key or not key:
                    raise ValueError(f"config key {prefix + key!r} cannot be flattened (empty or has a dot)")
                visit(value, f"{prefix}{key}.")
            return
        name = prefix[:-1]
        if isinstance(node, bool | int | float) or (isinstance(node, str) and not node.startswith(JSON_PREFIX)):
            out[name] = node
        else:
            out[name] = JSON_PREFIX + json.dumps(node if not isinstance(node, Mapping) else dict(node))

    visit(container, "")
    return out


def unflatten_config(run_config: Mapping[str, Any]) -> DictConfig:
    """The config that `flatten_config` flattened (Flower's `context.run_config`).

    Args:
        run_config: dotted keys -> values.

    Raises:
        ValueError: a ``json:`` value that is not JSON, or keys that clash ("a" and "a.b").
    """
    root: dict[str, Any] = {}
    for name in sorted(run_config):
        value = run_config[name]
        if isinstance(value, str) and value.startswith(JSON_PREFIX):
            try:
                value = json.loads(value[len(JSON_PREFIX):])
            except json.JSONDecodeError as exc:
                raise ValueError(f"run config {name!r}: bad JSON value ({exc})") from None
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"run config key {name!r} clashes with the value of {part!r}")
            node = child
        if leaf in node and isinstance(node[leaf], dict):
            raise ValueError(f"run config key {name!r} clashes with keys below it")
        node[leaf] = value
    return OmegaConf.create(root)


def absolute_paths(cfg: Any, base: str | Path | None = None) -> DictConfig:
    """A resolved copy of `cfg` whose `paths.*` and `fed.state` are absolute.

    Flower runs the ServerApp and ClientApps in other processes and folders than the command
    that started them; relative paths would point elsewhere there.

    Args:
        cfg: the composed config.
        base: what relative paths are relative to; None = the current directory.
    """
    root = Path(base) if base is not None else Path.cwd()
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def absolute(value: Any) -> Any:
        return str((root / str(value)).resolve()) if value is not None else None

    for key in list(out.get("paths", {})):
        out.paths[key] = absolute(out.paths[key])
    if out.get("fed") is not None and out.fed.get("state") is not None:
        out.fed.state = absolute(out.fed.state)
    return out
