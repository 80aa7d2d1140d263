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
        "--k", "2", "--n-val", "1", "--n-oracle", "1", "--labels", str(cohort / "labels.csv"),
    )
    assert result.returncode == 0, result.stderr
    raw = json.loads(out.read_text())
    assert len(raw["splits"]["target"]) == 2 and raw["label_column"] == "grade"
    assert len(raw["splits"]["val"]) == 1 and len(raw["splits"]["oracle"]) == 1 and raw["version"] == 2


def test_bad_override_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["config", "show", "data.no_such_key=1"])
    assert info.value.code == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data", "check", "{tmp}/nope", "--no-progress"], "nope"),
        (["data", "prepare", "{tmp}/empty", "--out", "{tmp}/cache"], "no BraTS-style case folders"),
        (["data", "prepare", "{tmp}/nope", "--out", "{tmp}/cache"], "not a folder"),
        (["data", "check", "{cohort}/A", "--no-progress", "--json", "{tmp}/empty"], "empty"),
        (["data", "manifest", "{cohort}/A", "--site", "A", "--out", "{tmp}/m.json", "--labels", "{tmp}/blank.csv"], "blank.csv"),
        (["data", "manifest", "{cohort}/A", "--site", "A", "--out", "{tmp}/m.json", "--labels", "{tmp}/other.csv"], "no row matches"),
        (["data", "phantom", "--out", "{tmp}/blank.csv", "--no-progress", "phantom=tiny"], "blank.csv"),
    ],
)
def test_bad_input_is_one_clear_error(cohort, tmp_path, args, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.csv").write_text(",,\n , ,\n")
    (tmp_path / "other.csv").write_text("case_id,grade\nX-1,HGG\n")
    result = run(*(a.format(tmp=tmp_path, cohort=cohort) for a in args))
    assert result.returncode in (1, 2), result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert expected in result.stdout + result.stderr


def test_train_every_stage_then_synthesize(cohort, tmp_path):
    """The README's generative commands, in order, on the tiny cohort (plumbing, not quality)."""
    common = [
        "experiment=tiny", f"paths.cohort={cohort}", f"paths.cache={tmp_path / 'cache'}",
        f"paths.runs={tmp_path / 'runs'}", "train.vae.max_steps=3", "train.backbone.max_steps=3",
        "train.controlnet.max_steps=2", "synthesis.num_samples=2", "synthesis.num_steps=3",
    ]
    for stage in ("vae", "scale", "backbone"):
        result = run("train", stage, "--no-progress", *common)
        assert result.returncode == 0, result.stderr
    early = run("synthesize", "--no-progress", *common)  # no site given
    assert early.returncode == 2 and "--site" in early.stderr
    result = run("train", "controlnet", "--site", "C", "--no-progress", *common)
    assert result.returncode == 0, result.stderr
    result = run("synthesize", "--site", "C", "--no-progress", *common)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "sites" / "C" / "synthesis"
    made = sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(made) == 2 and (out / "montage.png").is_file() and (out / "synthesis.json").is_file()
    again = run("train", "vae", "--no-progress", *common)  # a finished stage is a no-op
    assert again.returncode == 0 and "skipped: True" in again.stdout

    # The sampling benchmark runs on the trained run (figures are printed, not asserted).
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
    result = subprocess.run(
        [sys.executable, str(bench), *common, "--site", "C", "--n", "2", "--samplers", "ddim:2,ddim:3",
         "--out", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [2, 3] and all(r["s_per_volume"] > 0 for r in rows)


def test_stage_order_is_enforced(cohort, tmp_path):
    result = run(
        "train", "backbone", "--no-progress", "experiment=tiny", f"paths.cohort={cohort}",
        f"paths.cache={tmp_path / 'cache'}", f"paths.runs={tmp_path / 'runs'}",
    )
    assert result.returncode == 2 and "aldm-fed train vae" in result.stderr


def test_cli_stage_list_matches_the_library():
    from aldm_fed.cli import STAGES
    from aldm_fed.training.artifacts import STAGES as LIBRARY_STAGES

    assert STAGES == LIBRARY_STAGES
