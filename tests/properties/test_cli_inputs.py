"""Bad command lines: random config overrides and bad paths end in one clear line and exit 1 or 2.

Through the real console entry (`aldm_fed.cli.main`), as a user would run `aldm-fed`.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from props_helpers import TINY, assert_clear_failure, invoke, make_case

from aldm_fed.config import compose, flatten_config

CONFIG = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _defaults() -> dict[str, object]:
    return {k: v for k, v in flatten_config(compose([])).items() if not k.startswith("paths.")}


def _keys(kind: type) -> list[str]:
    return sorted(k for k, v in _defaults().items() if type(v) is kind)


def _one_line_error(result) -> str:
    assert result.code == 2, f"exit {result.code}:\n{result.text}{result.traceback}"
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    return lines[0]


WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
VALUE_TEXT = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    WORD, st.sampled_from(["null", "true", "false", "[]", "[1,2]", "{}", "''", "nan", "-inf", "1e400", "${nope}", "${data.size}"]),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8),
)


@CONFIG
@given(data=st.data(), case=st.sampled_from(["unknown", "not-an-int", "negative", "not-a-bool", "anything"]))
def test_config_overrides_are_refused_in_one_line_naming_the_option(data, case):
    if case == "unknown":
        key = f"data.{data.draw(WORD)}"
        if key in _defaults():
            return
        result = invoke("config", "show", f"{key}=1")
        assert key.split(".")[-1] in _one_line_error(result)
    elif case == "not-an-int":
        key = data.draw(st.sampled_from(_keys(int)))
        value = data.draw(WORD | st.floats(allow_nan=False).filter(lambda v: v != int(v) if abs(v) < 1e15 else True)
                          .map(repr))
        result = invoke("config", "show", f"{key}={value}")
        assert key in _one_line_error(result)
    elif case == "negative":
        key = data.draw(st.sampled_from([k for k in _keys(int) + _keys(float) if _defaults()[k] >= 0]))
        result = invoke("config", "show", f"{key}={data.draw(st.integers(-10**6, -1))}")
        line = _one_line_error(result)
        assert key in line and ">= 0" in line
    elif case == "not-a-bool":
        key = data.draw(st.sampled_from(_keys(bool)))
        result = invoke("config", "show", f"{key}={data.draw(st.integers(0, 5) | WORD)}")
        assert key in _one_line_error(result)
    else:  # any value for any option: accepted, or refused in one line that names it
        key = data.draw(st.sampled_from(sorted(_defaults())))
        override = f"{key}={data.draw(VALUE_TEXT)}"
        result = invoke("config", "show", override)
        assert result.code is not None, result.traceback
        if result.code != 0:
            assert key in _one_line_error(result) or override in result.err


# ------------------------------------------------------------------------------------------ paths

def _spell(path: Path, style: str) -> str:
    """The same path as a user might type it: absolute, relative to the cwd, or through `..`."""
    if style == "relative":
        return os.path.relpath(path)
    if style == "dotdot":
        return str(path.parent / ".." / path.parent.name / path.name)
    return str(path)


PATH_KINDS = st.sampled_from(["missing", "empty-folder", "file", "folder-without-cases"])
NAMES = st.sampled_from(["data", "dätä ünïcode", "case folder", "Ωmega", "-dash", "x" * 60])


def _make(tmp: Path, kind: str, name: str) -> Path:
    path = tmp / name
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "file":
        path.write_bytes(b"not a folder")
    elif kind == "folder-without-cases":
        (path / "notes").mkdir(parents=True)
        (path / "notes" / "readme.txt").write_text("hello")
    return path


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=PATH_KINDS, name=NAMES, style=st.sampled_from(["absolute", "relative", "dotdot"]),
       command=st.sampled_from(["check", "prepare", "manifest"]))
def test_a_bad_data_root_is_named(kind, name, style, command):
    with tempfile.TemporaryDirectory() as tmp:
        root = _spell(_make(Path(tmp), kind, name), style)
        if command == "check":
            result = invoke("data", "check", "--no-progress", "--", root, *TINY)
        elif command == "prepare":
            result = invoke("data", "prepare", "--out", Path(tmp) / "cache", "--no-progress", "--", root, *TINY)
        else:
            result = invoke("data", "manifest", "--site", "A", "--out", Path(tmp) / "m.json", "--", root)
        assert_clear_failure(result, root, codes=(1,) if command == "check" else (2,))
        assert not (Path(tmp) / "cache").exists() and not (Path(tmp) / "m.json").exists()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["file", "folder"]), command=st.sampled_from(["check-json", "manifest-out", "labels"]))
def test_a_file_where_a_folder_is_expected_and_back(kind, command):
    with tempfile.TemporaryDirectory(prefix="wrong kind ") as tmp:
        tmp = Path(tmp)
        make_case(tmp / "A", "BraTS-GLI-00001-000")
        target = tmp / "target.json"
        if kind == "folder":
            target.mkdir()
        else:
            target.write_bytes(b"sentinel")
        if command == "check-json":
            if kind == "file":
                return  # --json replaces its report file, as documented
            result = invoke("data", "check", tmp / "A", "--no-progress", "--json", target, *TINY)
        elif command == "manifest-out":
            result = invoke("data", "manifest", tmp / "A", "--site", "A", "--k", "1", "--out", target)
        else:
            result = invoke("data", "manifest", tmp / "A", "--site", "A", "--k", "1", "--out", tmp / "m.json",
                            "--labels", target)
            assert not (tmp / "m.json").exists()
        assert_clear_failure(result, str(target))
        assert target.is_dir() if kind == "folder" else target.read_bytes() == b"sentinel"


def test_training_on_a_missing_unicode_cohort_names_it(tmp_path):
    cohort = tmp_path / "kohörte ñ"
    unquoted = invoke("train", "vae", "--no-progress", "experiment=tiny", f"paths.cohort={cohort}")
    assert_clear_failure(unquoted, str(cohort), "quote")  # Hydra's grammar wants quotes around spaces
    result = invoke("train", "vae", "--no-progress", "experiment=tiny", f"paths.cohort='{cohort}'",
                    f"paths.runs={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}")
    assert_clear_failure(result, str(cohort))
    assert re.search("manifest", result.err)
    assert not (tmp_path / "runs").exists()
