"""Staging the Flower app and running real SuperLink/SuperNode processes on localhost.

The multi-process tests use a toy app staged exactly like the real one (one query round), TLS and
SuperNode authentication with certificates from `aldm-fed certs`, and free ports.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fused_config_from_fab, parse_config_args
from omegaconf import OmegaConf

from aldm_fed import cli
from aldm_fed.config import absolute_paths, compose, flatten_config, unflatten_config
from aldm_fed.federation.app_bundle import app_source_dir, stage_app
from aldm_fed.federation.launch import run_server
from aldm_fed.federation.processes import LaunchError, free_port
from aldm_fed.federation.security import make_certificates
from aldm_fed.federation.superlink import (
    CONNECTION,
    DEFAULT_PORT,
    ServerTls,
    SuperLink,
    register_supernodes,
    run_status,
    start_superlink,
    submit_run,
)
from aldm_fed.federation.supernode import SuperNode, node_config_arg, start_supernode

# Flower's bundler builds its file filter with a pathspec API that pathspec has deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*")

TOY_SERVER = '''
"""Toy ServerApp: one query to every site; writes what the server and each site saw."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from aldm_fed.config import unflatten_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = unflatten_config(context.run_config)
    deadline = time.monotonic() + 60
    while len(nodes := list(grid.get_node_ids())) < len(cfg.fed.sites):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} sites connected")
        time.sleep(0.2)
    query = [Message(RecordDict({"q": ConfigRecord({})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = [json.loads(r.content["r"]["json"]) for r in grid.send_and_receive(query, timeout=60)]
    seen = {"server": dict(context.run_config), "sites": replies}
    Path(cfg.fed.state, "toy.json").write_text(json.dumps(seen))
'''

TOY_CLIENT = '''
"""Toy ClientApp: replies with the run config and node config it received."""

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    seen = {"run_config": dict(context.run_config), "node_config": dict(context.node_config)}
    return Message(RecordDict({"r": ConfigRecord({"json": json.dumps(seen)})}), reply_to=msg)
'''


@pytest.fixture
def toy_app(tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    for part, code in (("server", TOY_SERVER), ("client", TOY_CLIENT)):
        (root / part).mkdir(parents=True)
        (root / part / "app.py").write_text(textwrap.dedent(code))
    (root / "server" / "__pycache__").mkdir()
    (root / "server" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (root / "client" / "README.md").write_text("not copied: only .py files are")
    return root


def site_data(root: Path, site: str) -> Path:
    """A cohort folder with just the site's manifest (the toy app reads no data)."""
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    (root / "manifests" / f"{site}.json").write_text("{}")
    return root


def flower_leftovers(tmp_path: Path) -> list[str]:
    """Command lines of the running processes whose FLWR_HOME lies under tmp_path."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"FLWR_HOME={tmp_path}".encode() in environ:
            found.append(cmdline)
    return found


# ------------------------------------------------------------------------------------------------
# Staging (no processes)
# ------------------------------------------------------------------------------------------------


def test_staged_app_gives_flower_exactly_the_run_config(tmp_path, toy_app):
    cfg = absolute_paths(compose(["fed.sites=[A,B]"]), base=tmp_path)
    assert Path(cfg.paths.cohort) == tmp_path / "cohort"
    assert Path(cfg.fed.state) == tmp_path / "runs" / "default" / "federation"
    run_config = flatten_config(cfg)
    run_config["odd.value"] = 'a "quoted" \\ back\\slash\nline'  # TOML escaping survives too

    app_dir = stage_app(tmp_path / "state" / "app", run_config, source=toy_app)

    # Flower's own bundler and the function its runtime uses to build `context.run_config`.
    fab = build_fab_from_disk(app_dir)
    assert sorted(zipfile.ZipFile(io.BytesIO(fab)).namelist()) == [
        ".info/CONTENT", "client/app.py", "pyproject.toml", "server/app.py",
    ]
    seen = get_fused_config_from_fab(fab, types.SimpleNamespace(override_config={}))
    assert seen == run_config
    assert all(type(seen[k]) is type(v) for k, v in run_config.items())
    del seen["odd.value"]
    assert OmegaConf.to_container(unflatten_config(seen)) == OmegaConf.to_container(cfg, resolve=True)

    # Staging again replaces our folder; a folder that is not ours is never deleted.
    stage_app(app_dir, {"a.b": 1}, source=toy_app)
    assert get_fused_config_from_fab(build_fab_from_disk(app_dir), types.SimpleNamespace(override_config={})) == {
        "a.b": 1
    }
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an app folder staged by aldm-fed"):
        stage_app(foreign, {}, source=toy_app)
    assert (foreign / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="64-bit"):
        stage_app(tmp_path / "x", {"big": 2**63}, source=toy_app)
    (tmp_path / "half" / "server").mkdir(parents=True)
    (tmp_path / "half" / "server" / "app.py").write_text("")
    with pytest.raises(FileNotFoundError, match="client/app.py"):
        stage_app(tmp_path / "y", {}, source=tmp_path / "half")


def test_node_config_round_trips_through_flowers_parser():
    config = {"site": "A", "data-path": "/data/my cohort\\x", "state-path": "/st/it's here"}
    assert parse_config_args([node_config_arg(config)]) == config
    with pytest.raises(ValueError, match="cannot be passed"):
        node_config_arg({"site": "both ' and \" quotes"})


def test_cli_port_default_mirrors_superlink():
    assert cli.SERVER_PORT == DEFAULT_PORT


def test_the_checkouts_app_is_found():
    root = app_source_dir()
    assert (root / "server" / "app.py").is_file() and (root / "client" / "app.py").is_file()


# ------------------------------------------------------------------------------------------------
# Early, clear errors (no Flower process is started)
# ------------------------------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


def test_client_checks_its_inputs_before_starting(tmp_path, capsys):
    data = tmp_path / "cohort"
    data.mkdir()
    key, ca = tmp_path / "A.key", tmp_path / "ca.crt"
    ca.write_text("x")

    code, text = run_cli(capsys, "client", "--site", "A", "--data", str(data), "--ca", str(ca), "--key", str(key))
    assert code == 2 and "manifests/A.json" in text
    site_data(data, "A")
    code, text = run_cli(capsys, "client", "--site", "A", "--data", str(data), "--ca", str(ca), "--key", str(key))
    assert code == 2 and str(key) in text
    code, text = run_cli(capsys, "client", "--site", "A", "--data", str(data), "--certs", str(tmp_path))
    assert code == 2 and "sites/A.key" in text
    code, text = run_cli(capsys, "client", "--site", "A", "--data", str(data), "--insecure", "--key", str(key))
    assert code == 2 and "--insecure takes no certificates" in text
    code, text = run_cli(capsys, "client", "--site", "A", "--data", str(data))
    assert code == 2 and "--ca FILE and --key FILE" in text


def test_server_needs_certificates_or_insecure(tmp_path, capsys):
    code, text = run_cli(capsys, "server", f"paths.runs={tmp_path}/runs")
    assert code == 2 and "--certs DIR" in text


def test_busy_port_and_missing_binary_are_named(tmp_path, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is not available"):
            start_superlink(tmp_path, port=port, tls=None, node_auth=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match="`flower-superlink` was not found on PATH"):
        start_superlink(tmp_path, port=free_port(), tls=None, node_auth=False)


# ------------------------------------------------------------------------------------------------
# Real processes on localhost
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_federation_runs_with_tls_and_node_auth(tmp_path, toy_app):
    certs = make_certificates(tmp_path / "certs", ["A", "B"])
    cfg = compose(["fed.sites=[A,B]", f"paths.runs={tmp_path}/runs"])
    data = {site: site_data(tmp_path / f"cohort{site}", site) for site in "AB"}
    started: dict[str, SuperNode | subprocess.Popen[str]] = {}

    def start_sites(link: SuperLink) -> None:
        # Site A through the library, site B through the command a hospital runs.
        started["A"] = start_supernode(
            link.address, site="A", data_path=data["A"], state_path=tmp_path / "stateA",
            ca_cert=certs.ca_cert, private_key=certs.site_keys["A"].private, log_path=tmp_path / "A.log",
        )
        started["B"] = subprocess.Popen(
            [str(Path(sys.executable).with_name("aldm-fed")), "client", "--site", "B", "--data", str(data["B"]),
             "--server", link.address, "--certs", str(certs.root), "--state", str(tmp_path / "stateB"),
             "--max-wait", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )

    log, messages = io.StringIO(), []
    try:
        status = run_server(
            cfg, certs=certs.root, port=free_port(), app_source=toy_app, on_ready=start_sites,
            echo=messages.append, out=log,
        )
        assert status.ok, (status, log.getvalue(), (tmp_path / "runs/federation/superlink.log").read_text())
        started["A"].stop()
        # The SuperLink is gone: the `aldm-fed client` of site B notices and ends cleanly.
        b_out, _ = started["B"].communicate(timeout=30)
        assert started["B"].returncode == 0, b_out
        assert "unreachable for 3 s; stopping" in b_out
    finally:
        if "A" in started:
            started["A"].stop()
        if "B" in started and started["B"].poll() is None:
            os.killpg(started["B"].pid, signal.SIGTERM)
            started["B"].wait(timeout=30)

    assert "registered" in " ".join(messages)
    assert any("aldm-fed client --site A --data COHORT_DIR --server 127.0.0.1:" in m for m in messages)
    # Both sides got exactly the flattened config; each site its own node config.
    seen = json.loads((tmp_path / "runs" / "federation" / "toy.json").read_text())
    run_config = flatten_config(absolute_paths(cfg))  # what run_server sends: no relative path
    assert seen["server"] == run_config
    assert [s["run_config"] for s in seen["sites"]] == [run_config, run_config]
    # Site B's `--certs` also hands it the server's model-signing public key.
    assert sorted((s["node_config"] for s in seen["sites"]), key=lambda n: n["site"]) == [
        {"site": "A", "data-path": str(data["A"]), "state-path": str(tmp_path / "stateA")},
        {"site": "B", "data-path": str(data["B"]), "state-path": str(tmp_path / "stateB"),
         "signing-pub": str(certs.signing_pub.resolve())},
    ]
    # Flower unpacked the app in the sites' own state folders, not in ~/.flwr.
    assert any((tmp_path / "stateA" / "flwr" / "apps").iterdir())
    assert flower_leftovers(tmp_path) == []  # every process stopped, with its children


@pytest.mark.slow
def test_superlink_refuses_strangers_and_stops_cleanly_mid_run(tmp_path, toy_app):
    certs = make_certificates(tmp_path / "certs", ["A", "C"])
    tls = ServerTls(certs.ca_cert, certs.server_cert, certs.server_key)
    data = site_data(tmp_path / "cohort", "C")
    link = start_superlink(tmp_path / "server", port=free_port(), tls=tls)
    try:
        assert register_supernodes(link, {"A": certs.site_keys["A"].public})["A"] is not None
        assert register_supernodes(link, {"A": certs.site_keys["A"].public}) == {"A": None}
        unregistered = start_supernode(
            link.address, site="C", data_path=data, state_path=tmp_path / "C", ca_cert=certs.ca_cert,
            private_key=certs.site_keys["C"].private, max_wait_s=5, log_path=tmp_path / "C.log",
        )
        plaintext = start_supernode(
            link.address, site="C", data_path=data, state_path=tmp_path / "P", insecure=True,
            max_wait_s=3, log_path=tmp_path / "P.log",
        )
        # Meanwhile a run that waits for a site that never comes.
        app_dir = stage_app(
            tmp_path / "app", {"fed.sites": 'json:["A"]', "fed.state": str(tmp_path)}, source=toy_app
        )
        run_id = submit_run(link, app_dir)
        with unregistered, plaintext:
            assert unregistered.wait(timeout=60) != 0
            assert plaintext.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "C.log").read_text()
        nodes = link.flwr_json("supernode", "ls", CONNECTION)["nodes"]
        assert [n["status"] for n in nodes] == ["registered"]  # A's key only; nobody came online
        assert run_status(link, run_id).status == "running"
    finally:
        link.stop()
    # Stopping the SuperLink mid-run took its SuperExec and ServerApp (another session) with it.
    assert flower_leftovers(tmp_path) == []
