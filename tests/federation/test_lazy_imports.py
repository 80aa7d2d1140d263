"""Process start-up: what a fresh interpreter loads for our entry points (behaviour, not timing).

`aldm-fed --help` and every `aldm-fed <cmd> --help` must not pay for torch/MONAI/Flower/Hydra: the
CLI imports them inside the commands. The Flower app module still loads MONAI (see the strict
expected failure below): `sharing`'s allow-list is built at import time from
`aldm_fed.evaluation.site` and `aldm_fed.synthesis.audit`, and `signing` imports
`aldm_fed.training.common`, whose `aldm_fed.models` package imports MONAI's networks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "monai", "flwr", "hydra", "sklearn", "matplotlib", "scipy", "nibabel")


def _loaded_after(code: str) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["client", "--help"], ["simulate", "--help"]])
def test_cli_help_loads_no_heavy_package(args):
    code = f"from aldm_fed.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass"
    assert _loaded_after(code) == []

