"""Small validators shared by the network and scheduler factories.

Factories take a plain mapping or an OmegaConf `DictConfig` (one Hydra group, e.g. `model.vae`).
Every problem is raised as a `ValueError` that names the offending key as `<group>.<key>`, so a
typo in a YAML file points at itself instead of at a MONAI constructor three frames down.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "as_plain_dict",
    "check_keys",
    "get_bool",
    "get_bool_list",
    "get_float",
    "get_int",
    "get_int_list",
    "get_int_or_list",
    "get_str",
]


def as_plain_dict(cfg: Mapping[str, Any] | Any, group: str) -> dict[str, Any]:
    """Return `cfg` as a plain dict (resolving OmegaConf interpolations).

    Args:
        cfg: a mapping or an OmegaConf `DictConfig`.
        group: config group name used in error messages (e.g. ``"model.vae"``).
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            container = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(container, dict)
            return {str(k): v for k, v in container.items()}
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{group}: expected a mapping of settings, got {type(cfg).__name__}")
    return {str(k): v for k, v in cfg.items()}


def check_keys(
    cfg: Mapping[str, Any], group: str, required: Iterable[str], optional: Iterable[str] = ()
) -> None:
    """Raise a ValueError naming every missing required key and every unknown key."""
    required = set(required)
    known = required | set(optional)
    missing = sorted(required - set(cfg))
    unknown = sorted(set(cfg) - known)
    problems = [f"{group}.{k}: missing (required)" for k in missing]
    problems += [f"{group}.{k}: unknown key (known: {', '.join(sorted(known))})" for k in unknown]
    if problems:
        raise ValueError("; ".join(problems))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def get_int(cfg: Mapping[str, Any], key: str, group: str, *, minimum: int = 1) -> int:
    v = cfg[key]
    if not _is_int(v) or v < minimum:
        raise ValueError(f"{group}.{key}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def get_float(
    cfg: Mapping[str, Any],
    key: str,
    group: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    inclusive_min: bool = True,
) -> float:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{group}.{key}: expected a number, got {v!r}")
    v = float(v)
    too_small = minimum is not None and (v < minimum if inclusive_min else v <= minimum)
    too_large = maximum is not None and v > maximum
    if too_small or too_large:
        lo = "-inf" if minimum is None else f"{minimum}"
        hi = "inf" if maximum is None else f"{maximum}"
        raise ValueError(f"{group}.{key}: {v} is outside [{lo}, {hi}]")
    return v


def get_bool(cfg: Mapping[str, Any], key: str, group: str) -> bool:
    v = cfg[key]
    if not isinstance(v, bool):
        raise ValueError(f"{group}.{key}: expected true/false, got {v!r}")
    return v


def get_str(cfg: Mapping[str, Any], key: str, group: str, choices: Sequence[str]) -> str:
    v = cfg[key]
    if v not in choices:
        raise ValueError(f"{group}.{key}: expected one of {list(choices)}, got {v!r}")
    return str(v)


def get_int_list(cfg: Mapping[str, Any], key: str, group: str, *, minimum: int = 1) -> list[int]:
    v = cfg[key]
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) == 0:
        raise ValueError(f"{group}.{key}: expected a non-empty list of integers, got {v!r}")
    if not all(_is_int(x) and x >= minimum for x in v):
        raise ValueError(f"{group}.{key}: expected integers >= {minimum}, got {list(v)!r}")
    return [int(x) for x in v]


def get_bool_list(cfg: Mapping[str, Any], key: str, group: str, length: int) -> list[bool]:
    v = cfg[key]
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{group}.{key}: expected a list of true/false, got {v!r}")
    if len(v) != length or not all(isinstance(x, bool) for x in v):
        raise ValueError(
            f"{group}.{key}: expected {length} true/false values (one per level of channels), "
            f"got {list(v)!r}"
        )
    return [bool(x) for x in v]


def get_int_or_list(cfg: Mapping[str, Any], key: str, group: str, length: int) -> list[int]:
    """An int applies to every level; a list must have one entry per level."""
    v = cfg[key]
    if _is_int(v):
        if v < 1:
            raise ValueError(f"{group}.{key}: expected an integer >= 1, got {v!r}")
        return [int(v)] * length
    values = get_int_list(cfg, key, group)
    if len(values) != length:
        raise ValueError(
            f"{group}.{key}: expected one value per level ({length}), got {values!r}"
        )
    return values
