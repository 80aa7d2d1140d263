"""`python -m benchmarks`: the one command runs every part and writes one JSON with every stage."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # `benchmarks` is a folder of the checkout, not installed
    return importlib.import_module("benchmarks.__main__")


def test_quick_mode_writes_every_stage_and_the_machine(runner, monkeypatch, tmp_path):
    # Stubbed timings: this checks the wiring (stages, columns, JSON), the slow test below times.
    monkeypatch.setattr(runner.steps_bench, "ours_per_step", lambda stage, size, n1, n2, repeats: 0.2)
    monkeypatch.setattr(runner.steps_bench, "bare_per_step", lambda stage, size, steps, repeats: 0.1)
    out = tmp_path / "bench.json"
    runner.main(["--quick", "--no-isolate", "--skip", "sampling", "imports", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["mode"] == "quick" and result["date"]
    assert {"platform", "cpu_count", "torch", "torch_threads", "device"} <= set(result["machine"])
    rows = result["parts"]["steps"]["rows"]
    assert [r["stage"] for r in rows] == list(runner.steps_bench.STAGES)
    assert {r["size"] for r in rows} == {32}
    assert all(r["overhead_ratio"] == pytest.approx(2.0) for r in rows)
    assert "federation" not in result["parts"]  # full mode only


def test_sampling_without_a_trained_run_is_skipped_not_fatal(runner, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    result = runner.run_sampling(["experiment=tiny"], "C", 2, tmp_path / "s.json")
    assert "skipped" in result and "aldm-fed train" in result["skipped"]


def test_missing_script_is_recorded_as_skipped(runner):
    assert "skipped" in runner.run_script("no_such_benchmark", [])


@pytest.mark.slow
def test_quick_mode_really_times_every_stage(runner, tmp_path):
    out = tmp_path / "bench.json"
    runner.main(["--quick", "--steps", "1", "2", "--repeats", "1", "--no-isolate", "--skip", "sampling", "imports",
                 "--out", str(out)])
    rows = json.loads(out.read_text())["parts"]["steps"]["rows"]
    assert [r["stage"] for r in rows] == list(runner.steps_bench.STAGES)
    assert all(r["bare_monai_s_per_step"] > 0 and r["voxels_per_step"] > 0 for r in rows)
