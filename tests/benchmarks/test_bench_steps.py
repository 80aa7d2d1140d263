"""The step-overhead benchmark runs and writes its table (numbers are not asserted: benchmarks
print figures, tests check they are produced)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "steps.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_steps", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two child processes, each importing torch and MONAI: ~40 s on a loaded 2-core machine
def test_step_benchmark_writes_both_columns_and_child_memory(tmp_path):
    out = tmp_path / "bench.json"
    _module().main(["--sizes", "32", "--stages", "backbone", "--steps", "1", "2", "--repeats", "1",
                    "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["stage"] == "backbone" and row["size"] == 32
    assert row["bare_monai_s_per_step"] > 0
    assert row["overhead_ratio"] == row["ours_s_per_step"] / row["bare_monai_s_per_step"]
    # each side ran in its own child process: its peak memory is its own and covers the stage
    assert row["ours_peak_mb"] >= row["ours_stage_mb"] >= 0 and row["bare_peak_mb"] > 0
    assert row["voxels_per_step"] == 32**3
    assert result["machine"]["device"] and result["machine"]["cpu_count"] >= 1


def test_batch_voxels_follow_the_configs():
    m = _module()
    assert m.batch_voxels("vae", 32) == 32**3  # train.vae.batch_size: 1
    assert m.batch_voxels("classifier_slice", 32) == 32 * 32**2  # configs/classifier/slice.yaml: 32 slices
    assert m.batch_voxels("classifier_volume", 32) == 4 * 32**3  # configs/classifier/volume.yaml: 4 volumes
