"""The step-overhead benchmark runs and writes its table (numbers are not asserted: benchmarks
print figures, tests check they are produced)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "steps.py"


def test_step_benchmark_writes_both_columns(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_steps", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    module.main(["--sizes", "32", "--stages", "backbone", "--steps", "1", "2", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["stage"] == "backbone" and row["size"] == 32
    assert row["bare_monai_s_per_step"] > 0
    assert row["overhead_ratio"] == row["ours_s_per_step"] / row["bare_monai_s_per_step"]
    assert result["machine"]["device"]
