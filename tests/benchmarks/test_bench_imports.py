"""benchmarks/imports.py times imports in fresh interpreters and reports what they loaded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "imports.py"


def test_import_benchmark_reports_loaded_packages(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_imports", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "imports.json"
    module.main(["--repeats", "1", "--targets", "aldm_fed.cli", "numpy", "--out", str(out)])
    rows = {r["module"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["numpy"]["loaded"] == ["numpy"] and rows["numpy"]["process_s"] >= rows["numpy"]["import_s"] > 0
    assert "torch" not in rows["aldm_fed.cli"]["loaded"]
