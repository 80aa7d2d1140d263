"""The scaling and speed-up benchmarks: their cohort overrides compose, their memory probe reads
this process tree, and the speed-up table has every variant (numbers are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from aldm_fed.config import compose
from aldm_fed.data.phantom import PhantomConfig

ROOT = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [1, 3, 6])
def test_site_overrides_replace_the_cohort_sites(n):
    scaling = _module("scaling")
    cfg = compose(["experiment=tiny", *scaling.site_overrides(n, "tiny")])
    sites = PhantomConfig.from_mapping(cfg.phantom).sites
    assert [s.name for s in sites] == list("ABCDEF"[:n])  # the default A, B, C are gone, not merged
    assert [s.profile for s in sites] == ["A", "B", "C", "A", "B", "C"][:n]
    assert [s.n_source > 0 for s in sites] == [p != "C" for p in ["A", "B", "C", "A", "B", "C"][:n]]


def test_site_overrides_refuse_an_impossible_count():
    scaling = _module("scaling")
    with pytest.raises(ValueError, match="--sites"):
        scaling.site_overrides(0, "tiny")


def test_tree_memory_counts_this_process():
    scaling = _module("scaling")
    assert scaling._tree_rss_mb(os.getpid()) > 10  # at least this interpreter with torch imported


def test_speedups_table_has_every_variant(tmp_path):
    out = tmp_path / "speedups.json"
    _module("speedups").main(["--size", "32", "--networks", "backbone", "--steps", "1", "--repeats", "1",
                              "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "bf16", "bf16+fused", "bf16+fused+channels_last", "bf16, 1 thread"]
    assert all(r["s_per_step"] > 0 for r in rows)
    assert next(r for r in rows if r["variant"] == "bf16")["ratio_to_bf16"] == 1.0
