"""The install exposes exactly one import name, `aldm_fed`, and finds its configs."""

from __future__ import annotations

import subprocess
import sys

from aldm_fed.config import config_dir


def test_only_aldm_fed_is_importable_from_outside_the_checkout(tmp_path):
    code = (
        "import importlib.util, aldm_fed\n"
        "leaks = [n for n in ('server', 'client', 'simulations', 'tests', 'configs')"
        " if importlib.util.find_spec(n) is not None]\n"
        "print(aldm_fed.__version__, leaks)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    version, leaks = out.stdout.split(" ", 1)
    assert leaks.strip() == "[]", f"top-level names leaked into site-packages: {leaks}"


def test_configs_are_found():
    assert (config_dir() / "config.yaml").is_file()
    for group in ("data", "phantom", "model/vae", "scheduler", "train", "experiment", "synthesis"):
        assert any((config_dir() / group).glob("*.yaml")), group
