"""A federated run whose server process is SIGKILLed mid-phase resumes, when started again with
the same command, after its last completed round: no round is lost, none is run twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes (the simulation in a subprocess)

ARGS = [
    "experiment=tiny", "device=cpu", "fed.sites=[A,B]",
    "fed.phases.vae.rounds=3", "fed.phases.vae.local_steps=2",
    "fed.phases.backbone.rounds=1", "fed.phases.backbone.local_steps=2",
    "train.controlnet.max_steps=2", "fed.phases.local.synthesize=false", "fed.phases.local.evaluate=false",
]


def simulate_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "aldm_fed.cli", "simulate", "--no-progress", *ARGS,
            f"paths.cohort={root / 'cohort'}", f"paths.runs={root / 'runs'}"]


def test_server_killed_mid_phase_resumes_from_the_last_round(tmp_path: Path) -> None:
    state = tmp_path / "runs" / "federation"
    first_round = state / "rounds" / "vae" / "round_0001" / "meta.json"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(simulate_cmd(tmp_path), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while not first_round.exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no round completed in time"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole simulation: server, Ray driver, sites
        proc.wait()
    status = json.loads((state / "status.json").read_text())
    assert status["status"] == "running"  # killed: it never got to say anything else

    second = subprocess.run(simulate_cmd(tmp_path), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "[vae] resuming after round" in output
    rounds = [(r["phase"], r["round"]) for r in map(json.loads, (state / "rounds.jsonl").read_text().splitlines())]
    assert rounds == [("vae", 1), ("vae", 2), ("vae", 3), ("backbone", 1)]
    assert json.loads((state / "status.json").read_text())["status"] == "done"
