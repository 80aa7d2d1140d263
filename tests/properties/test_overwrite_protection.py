"""Commands that write never replace what is already on disk unless told to (--force / --overwrite).

Each example puts a sentinel file (random name and bytes) where a command would write, runs the
command, and checks the sentinel survived byte for byte, nothing else was written, and the exit is
non-zero with a message naming the folder or file.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from props_helpers import TINY, assert_clear_failure, invoke, make_case

SENTINEL_NAMES = st.sampled_from(["labels.csv", "notes.txt", "ünïcödé.md", "index.json", "report.md", "cohort data"])


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _command(command: str, tmp: Path, out: Path) -> list[str | Path]:
    if command == "phantom":
        return ["data", "phantom", "--out", out, "--no-progress", "phantom=tiny"]
    if command == "prepare":
        return ["data", "prepare", tmp / "data", "--out", out, "--no-progress", *TINY]
    if command == "synthesize":  # refused before any model is loaded, so no trained run is needed
        return ["synthesize", "--site", "A", "--out", out, "--no-progress", "experiment=tiny",
                f"paths.runs={tmp / 'runs'}", f"paths.cohort={tmp / 'data'}"]
    if command == "evaluate":
        return ["evaluate", "--site", "A", "--out", out, "--no-progress", "experiment=tiny",
                f"paths.runs={tmp / 'runs'}", f"paths.cohort={tmp / 'data'}"]
    raise AssertionError(command)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(["phantom", "prepare", "synthesize", "evaluate"]), name=SENTINEL_NAMES,
       content=st.binary(min_size=0, max_size=64))
def test_a_folder_of_other_files_is_left_alone(command, name, content):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_case(tmp / "data", "BraTS-GLI-00001-000")
        out = tmp / "out folder"
        out.mkdir()
        if command == "evaluate":
            name = "report.md"  # evaluate writes report.{md,csv,json,html} only
        elif command == "prepare" and name == "index.json":
            content = b'{"not": "a cache"}'
        (out / name).write_bytes(content)
        before = _snapshot(tmp)
        result = invoke(*_command(command, tmp, out))
        assert_clear_failure(result, str(out), codes=(2,))
        assert "--force" in result.err or "--overwrite" in result.err
        assert _snapshot(tmp) == before  # the sentinel survived and nothing was added
        assert not (tmp / "runs").exists()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=200))
def test_data_manifest_never_replaces_a_file_without_force(content):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_case(tmp / "A", "BraTS-GLI-00001-000")
        out = tmp / "manifests" / "A.json"
        out.parent.mkdir()
        out.write_bytes(content)
        result = invoke("data", "manifest", tmp / "A", "--site", "A", "--k", "1", "--out", out)
        assert_clear_failure(result, str(out), "--force")
        assert out.read_bytes() == content
        forced = invoke("data", "manifest", tmp / "A", "--site", "A", "--k", "1", "--out", out, "--force")
        assert forced.code == 0, forced.text
        assert json.loads(out.read_text())["splits"]["target"] == ["BraTS-GLI-00001-000"]


def test_certs_keep_every_key_unless_forced(tmp_path):
    out = tmp_path / "certs"
    assert invoke("certs", "--out", out, "A").code == 0
    before = _snapshot(out)
    again = invoke("certs", "--out", out, "A")  # the same site again: its key exists
    assert_clear_failure(again, "--force")
    assert _snapshot(out) == before
    more = invoke("certs", "--out", out, "B")  # a new site: added, every existing key kept byte for byte
    assert more.code == 0, more.text
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"}
    assert "sites/B.key" in after


def test_resuming_into_own_output_is_allowed(tmp_path):
    """The guard is about other files: a folder the command made before is resumed, as documented."""
    make_case(tmp_path / "data", "BraTS-GLI-00001-000")
    cache = tmp_path / "cache"
    first = invoke("data", "prepare", tmp_path / "data", "--out", cache, "--no-progress", *TINY)
    assert first.code == 0, first.text
    before = _snapshot(cache)
    again = invoke("data", "prepare", tmp_path / "data", "--out", cache, "--no-progress", *TINY)
    assert again.code == 0 and " 0 prepared" in again.out and "1 already cached" in again.out, again.text
    assert {k: v for k, v in _snapshot(cache).items() if k != "index.json"} == {
        k: v for k, v in before.items() if k != "index.json"}
    (cache / "notes.txt").write_text("mine")  # a user's file beside a cache does not block resuming
    assert invoke("data", "prepare", tmp_path / "data", "--out", cache, "--no-progress", *TINY).code == 0
    assert (cache / "notes.txt").read_text() == "mine"
