"""The real thing on localhost: `aldm-fed server` and two `aldm-fed client` processes, TLS and
SuperNode authentication on, the tiny pipeline end to end.

Checks: the run completes (server exit 0, then the clients stop by themselves); the global
weights changed and every site installed them bit for bit; each site's ControlNet is its own and
stays in that site's state folder; the server holds no site model.
(Refusal of unregistered keys and plaintext clients: tests/federation/test_launch.py.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aldm_fed.checkpoints import load_checkpoint
from aldm_fed.config import compose
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.federation.apps import OUTGOING_LOG
from aldm_fed.federation.global_models import initial_weights
from aldm_fed.federation.processes import free_port
from aldm_fed.federation.security import make_certificates

pytestmark = pytest.mark.slow

RUN = [
    "experiment=tiny", "device=cpu",
    "fed.phases.vae.rounds=1", "fed.phases.vae.local_steps=2",
    "fed.phases.backbone.rounds=1", "fed.phases.backbone.local_steps=2",
    "train.controlnet.max_steps=2", "train.controlnet.ckpt_every=2", "fed.wait_for_sites_s=120",
    # Synthesis and the classifiers run as in the simulation test (test_simulation.py); here
    # each message costs a fresh `flwr-clientapp` process (~5 s of imports), so they stay off.
    "fed.phases.local.synthesize=false", "fed.phases.local.evaluate=false",
]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "aldm_fed.cli", *args]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"the server did not listen on {port} in {timeout} s")


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_server_and_two_clients_over_tls(tmp_path: Path, secure: bool) -> None:
    # secure: the FedAvg rounds under SecAgg+ (aldm_fed/federation/secure.py); its protocol state
    # must survive between messages, each of which runs in a fresh `flwr-clientapp` process.
    run = [*RUN, "fed.privacy.secagg.enabled=true"] if secure else RUN
    cfg = compose(run)
    make_cohort(tmp_path / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    certs = tmp_path / "certs"
    make_certificates(certs, ["A", "B"])
    port = free_port()
    server_log = tmp_path / "server.log"
    procs: list[subprocess.Popen] = []
    try:
        with open(server_log, "w") as out:
            server = subprocess.Popen(
                cli("server", "--certs", str(certs), "--port", str(port), *run, f"paths.runs={tmp_path / 'server'}"),
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            )
        procs.append(server)
        wait_for_port(port, server, server_log)
        for site in ("A", "B"):
            with open(tmp_path / f"{site}.log", "w") as out:
                procs.append(subprocess.Popen(
                    cli("client", "--site", site, "--data", str(tmp_path / "cohort"), "--server", f"127.0.0.1:{port}",
                        "--certs", str(certs), "--state", str(tmp_path / site), "--max-wait", "5"),
                    stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                ))
        assert server.wait(timeout=400) == 0, server_log.read_text()[-4000:]
        for proc, site in zip(procs[1:], ("A", "B"), strict=True):
            assert proc.wait(timeout=60) == 0, (tmp_path / f"{site}.log").read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    runs = tmp_path / "server"
    status = json.loads((runs / "federation" / "status.json").read_text())
    assert status["status"] == "done" and status["sites"] == ["A", "B"]

    vae = load_checkpoint(runs / "vae" / "final")
    start = initial_weights(cfg, "vae")["vae"]
    assert any(not torch.equal(vae.tensors["vae"][k], start[k]) for k in start)
    backbone = load_checkpoint(runs / "backbone" / "final", groups=[])

    def fedavg(phase: str) -> list[str]:  # SecAgg+: keys, shares, the masked update, the unmasking shares
        return ["secagg:setup", "secagg:share_keys", phase, "secagg:unmask"] if secure else [phase]

    nets = {}
    for site in ("A", "B"):
        state = tmp_path / site
        for stage, ckpt in (("vae", vae), ("backbone", backbone)):
            installed = load_checkpoint(state / stage / "final", groups=[])
            assert installed.meta["weights"]["sha256"] == ckpt.meta["weights"]["sha256"]
        nets[site] = load_checkpoint(state / "sites" / site / "controlnet" / "final").tensors["controlnet"]
        lines = [json.loads(line) for line in (state / OUTGOING_LOG).read_text().splitlines()]
        assert [x["phase"] for x in lines] == ["hello", *fedavg("vae"), "scale", *fedavg("backbone"), "local"]
        assert secure == (not any("arrays" in x for x in lines))  # under SecAgg+ only masked updates left
    assert not all(torch.equal(nets["A"][k], nets["B"][k]) for k in nets["A"])
    assert not (runs / "sites").exists() and not (tmp_path / "A" / "sites" / "B").exists()
