"""Compose Hydra configs for the CLI and the library.

The configs live in the checkout's top-level `configs/` (the design card); a wheel install carries
a copy as data files in `<prefix>/share/aldm-fed/configs` (pyproject `shared-data`). `compose()` is the one entry: the CLI, tests and (later) the Flower apps
all build their config through it, so a run is fully described by its override list.

Flower carries a run's settings as a flat "run config" (dotted keys -> bool | int | float | str).
`flatten_config` / `unflatten_config` turn one composed config into that and back, exactly: the
server and every site of a federated run rebuild the same config from it.
"""

from __future__ import annotations

import functools
import json
import math
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
        # One line: the CLI prints it as is; Hydra's search-path listing helps no user.
        detail = str(exc).split("\nConfig search path")[0]
        detail = "; ".join(line.strip() for line in detail.splitlines() if line.strip())
        if any(" " in o.partition("=")[2] and "'" not in o and '"' not in o for o in overrides):
            detail += " (quote a value that holds spaces: key='a b')"
        raise ValueError(f"bad config override(s) {list(overrides)}: {detail}") from None
    finally:
        GlobalHydra.instance().clear()
    _check_override_types(overrides, config_name)
    try:  # an interpolation that resolves nowhere (key=${nope}) fails here, not deep inside a run
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None)
        raise ValueError(f"bad config override(s) {list(overrides)}: {str(exc).splitlines()[0]}"
                         + (f" (while resolving {where})" if where else "")) from None
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _check_override_types(overrides: Sequence[str], config_name: str) -> None:
    """Refuse a value override whose type does not fit the option's default.

    Why: the configs are plain YAML, so Hydra accepts `data.size=abc` or `train.vae.max_steps=-5`
    and the run fails much later, far from the option. The default is the value the option has
    with the same config-group choices (`experiment=tiny`, ...) but without value overrides.

    Raises:
        ValueError: naming the option, the value given and what it must be.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups, values = [], []
    for o, text in zip(parsed, overrides, strict=True):
        is_group = o.package is not None or (config_dir() / o.key_or_group).is_dir()
        (groups if is_group else values).append((o, text))
    if not values:
        return
    defaults = _defaults(tuple(text for _, text in groups), config_name)
    for o, text in values:
        if o.is_delete() or o.is_add() or o.is_sweep_override() or o.key_or_group not in defaults:
            continue  # new keys and deletions have no default; mappings are left to Hydra
        value = o.value()
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: its type is known only once resolved
        problem = _type_problem(defaults[o.key_or_group], value)
        if problem:
            raise ValueError(f"config option {o.key_or_group}: {problem}, got {value!r} (from override {text!r}; "
                             f"default {defaults[o.key_or_group]!r})")


@functools.lru_cache(maxsize=16)
def _defaults(group_overrides: tuple[str, ...], config_name: str) -> dict[str, Any]:
    """Dotted key -> default leaf value (unresolved) for these config-group choices."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(group_overrides))
    finally:
        GlobalHydra.instance().clear()
    out: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    visit(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def _type_problem(default: Any, value: Any) -> str | None:
    """What is wrong with `value` for an option whose default is `default` (None: nothing)."""
    if default is None or (isinstance(default, str) and "${" in default):
        return None  # no type to go by
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int | float):
        whole = isinstance(default, int)
        if value is None:
            return None if not whole else "must be an integer (null is not allowed)"
        if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
            return "must be an integer" if whole else "must be a number"
        if not math.isfinite(value):
            return "must be a finite number"
        if default >= 0 and value < 0:
            return "must be >= 0"
        return None
    if isinstance(default, list):
        numbers = bool(default) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in default)
        if value is None or isinstance(value, list) or (numbers and isinstance(value, int | float)):
            return None  # a number for a list of numbers: e.g. data.spacing=2 (the same on every axis)
        return "must be a list, e.g. [a,b]"
    if isinstance(default, str):
        return None if value is None or isinstance(value, str | int | float) else "must be a single value"
    return None


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
