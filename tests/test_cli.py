"""The `aldm-fed` command end to end on a tiny phantom cohort (the README's data commands)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aldm_fed.cli import main

TINY = ["phantom=tiny", "data.size=32", "data.spacing=null"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script in a fresh process, as a user would."""
    exe = Path(sys.executable).with_name("aldm-fed")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "cohort"
    result = run("data", "phantom", "--out", str(out), "--no-progress", *TINY)
    assert result.returncode == 0, result.stderr
    assert "cohort" in result.stdout and "files written" in result.stdout
    return out


def test_version_and_help():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("aldm-fed ")
    result = run("--help")
    assert result.returncode == 0 and "data" in result.stdout


def test_phantom_check_prepare(cohort, tmp_path):
    check = run("data", "check", str(cohort), "--no-progress", "--json", str(tmp_path / "r.json"), *TINY)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_cases"] == report["n_ok"] > 0

    cache = tmp_path / "cache"
    prep = run("data", "prepare", str(cohort), "--out", str(cache), "--no-progress", *TINY)
    assert prep.returncode == 0, prep.stderr
    index = json.loads((cache / "index.json").read_text())
    case = index["cases"][0] if isinstance(index["cases"], list) else next(iter(index["cases"]))
    image = np.load(cache / case / "image.npy", mmap_mode="r")
    assert image.shape == (4, 32, 32, 32)
    again = run("data", "prepare", str(cohort), "--out", str(cache), "--no-progress", *TINY)
    assert again.returncode == 0 and " 0 prepared" in again.stdout  # resumed, nothing redone


def test_check_reports_every_problem_and_fails(cohort, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cohort / "A", broken / "A")
    cases = sorted(p for p in (broken / "A").iterdir() if p.is_dir())
    truncated = next(cases[0].glob("*-t2w.nii.gz"))
    truncated.write_bytes(truncated.read_bytes()[:200])
    next(cases[1].glob("*-t1c.nii.gz")).unlink()
    result = run("data", "check", str(broken), "--no-progress", *TINY)
    assert result.returncode == 1
    assert cases[0].name in result.stdout and cases[1].name in result.stdout
    assert truncated.name in result.stdout


def test_manifest_command(cohort, tmp_path):
    out = tmp_path / "m" / "A.json"
    result = run(
        "data", "manifest", str(cohort / "A"), "--site", "A", "--out", str(out),
        "--k", "2", "--labels", str(cohort / "labels.csv"),
    )
    assert result.returncode == 0, result.stderr
    raw = json.loads(out.read_text())
    assert len(raw["splits"]["target"]) == 2 and raw["label_column"] == "grade"


def test_bad_override_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["config", "show", "data.no_such_key=1"])
    assert info.value.code == 2
    assert "no_such_key" in capsys.readouterr().err


def test_missing_folder_is_reported(tmp_path):
    result = run("data", "check", str(tmp_path / "nope"), "--no-progress")
    assert result.returncode != 0
    assert "nope" in (result.stdout + result.stderr)

