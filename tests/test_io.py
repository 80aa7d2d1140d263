from __future__ import annotations

import os

import numpy as np
import pytest

from aldm_fed.io import atomic_dir, atomic_save_npy, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]  # no temporary left behind


def test_crash_during_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk vanished"):
        atomic_write_json(path, {"v": 2})
    monkeypatch.undo()
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_npy_round_trip(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    atomic_save_npy(tmp_path / "x.npy", arr)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy", mmap_mode="r"), arr)


def test_atomic_dir_is_all_or_nothing(tmp_path):
    target = tmp_path / "case"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed")
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


def test_files_get_normal_permissions_unless_asked(tmp_path):
    from aldm_fed.io import atomic_path

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "public.txt", "x")
        with atomic_path(tmp_path / "secret.key", mode=0o600) as tmp:
            tmp.write_text("k")
    finally:
        os.umask(old)
    assert (tmp_path / "public.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600


def test_atomic_dir_recovers_from_a_kill_between_its_renames(tmp_path):
    target = tmp_path / "case"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    os.replace(target, tmp_path / ".case.old")  # what a kill after the first rename leaves
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            raise RuntimeError("killed again")
    assert (target / "a").read_text() == "1"  # the previous complete version is back
