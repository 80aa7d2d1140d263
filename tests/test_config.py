"""Composing the config, and flattening it into Flower's run config and back (exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from aldm_fed.config import JSON_PREFIX, absolute_paths, compose, flatten_config, unflatten_config


def test_flatten_round_trip_of_the_whole_config() -> None:
    cfg = compose(["experiment=tiny", "fed.sites=[A,B]"])
    flat = flatten_config(cfg)
    # Flower's run config holds only these scalar types.
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert flat["data.modalities"].startswith(JSON_PREFIX) and flat["data.size"] == 32
    assert OmegaConf.to_container(unflatten_config(flat)) == OmegaConf.to_container(cfg, resolve=True)


def test_flatten_is_unambiguous_for_tricky_values() -> None:
    tricky = {"a": {"none": None, "empty": {}, "list": [1, "x"], "s": "json:not-json", "t": "", "f": 1.5,
                    "b": False}}
    back = OmegaConf.to_container(unflatten_config(flatten_config(tricky)))
    assert back == tricky


def test_bad_keys_and_values_are_refused() -> None:
    with pytest.raises(ValueError, match="a.b"):
        flatten_config({"a.b": 1})
    with pytest.raises(ValueError, match="bad JSON"):
        unflatten_config({"x": "json:[1,"})
    with pytest.raises(ValueError, match="clashes"):
        unflatten_config({"a": 1, "a.b": 2})


def test_absolute_paths(tmp_path: Path) -> None:
    cfg = absolute_paths(compose(["paths.runs=runs/x"]), base=tmp_path)
    assert cfg.paths.runs == str(tmp_path / "runs" / "x")
    assert cfg.fed.state == str(tmp_path / "runs" / "x" / "federation")
    assert Path(cfg.paths.cohort).is_absolute() and Path(cfg.paths.cache).is_absolute()
