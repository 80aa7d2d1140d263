"""A site's SuperNode: start `flower-supernode`, as Flower 1.42 wants it:

    flower-supernode --superlink H:P --root-certificates ca.crt --auth-supernode-private-key S.key
        --node-config "site='S' data-path='...' state-path='...' signing-pub='...'" --port <free port>
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aldm_fed.federation.processes import binary, check_files, flower_env, free_port, popen, stop_group

__all__ = ["SuperNode", "node_config_arg", "start_supernode"]


@dataclass
class SuperNode:
    """A running `flower-supernode` of one site. Use as a context manager, or call `stop()`.

    Attributes:
        process: the SuperNode process (leader of its own process group, with its SuperExec and
            ClientApps).
        site: the site's name.
        port: the port of its local Runtime API (ClientApps connect to it; loopback only).
    """

    process: subprocess.Popen[bytes]
    site: str
    port: int

    def stop(self, timeout: float = 20.0) -> int:
        """Stop the SuperNode and its ClientApps; returns its exit code."""
        return stop_group(self.process, timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the SuperNode to exit by itself; returns its exit code.

        Raises:
            subprocess.TimeoutExpired: still running after `timeout` seconds.
        """
        return self.process.wait(timeout=timeout)

    def __enter__(self) -> SuperNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_supernode(
    superlink: str,
    *,
    site: str,
    data_path: str | os.PathLike[str],
    state_path: str | os.PathLike[str],
    ca_cert: str | os.PathLike[str] | None = None,
    private_key: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    signing_pub: str | os.PathLike[str] | None = None,
    port: int | None = None,
    max_wait_s: float | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> SuperNode:
    """Start `flower-supernode` for one site.

    Its ClientApps get `context.node_config == {"site": site, "data-path": ..., "state-path": ...}`
    (absolute paths), plus `"signing-pub"` when `signing_pub` is given. FLWR_HOME is
    `<state_path>/flwr`, where Flower unpacks the app bundles.

    Args:
        superlink: the SuperLink's Fleet API as HOST:PORT.
        site: the site's name.
        data_path: the site's cohort folder (case folders + manifests/).
        state_path: the site's state folder (created if missing).
        ca_cert: the CA that verifies the SuperLink (TLS); required unless `insecure`.
        private_key: the site's SuperNode key (OpenSSH private key) for node authentication.
        insecure: plaintext HTTP to the SuperLink (no TLS, hence no node authentication).
        signing_pub: the server's model-signing public key (signing.pub): the site's ClientApps
            refuse global weights it did not sign. None = they load them unverified (warning).
        port: the local Runtime API port (default: a free one, so sites can share a machine).
        max_wait_s: give up after this long without reaching the SuperLink (None: never).
        log_path: file for the SuperNode's output (None: this process's standard output).

    Returns:
        The running SuperNode.

    Raises:
        ValueError: TLS and `insecure` both or neither given, or a key without TLS.
        FileNotFoundError: the CA, key or signing.pub file is missing.
        LaunchError: `flower-supernode` is not installed.
    """
    if insecure == (ca_cert is not None):
        raise ValueError("give either ca_cert (TLS) or insecure=True")
    if insecure and private_key is not None:
        raise ValueError("SuperNode authentication needs TLS: a private key cannot be used with insecure")
    state = Path(state_path).resolve()
    flwr_home = state / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(flwr_home)
    port = port if port is not None else free_port()
    node_config = {"site": site, "data-path": str(Path(data_path).resolve()), "state-path": str(state)}
    if signing_pub is not None:
        check_files(Path(signing_pub))
        node_config["signing-pub"] = str(Path(signing_pub).resolve())
    command = [binary("flower-supernode", env), "--superlink", superlink]
    if insecure:
        command.append("--insecure")
    else:
        ca = Path(ca_cert).resolve()  # type: ignore[arg-type]  # not None: checked above
        check_files(ca)
        command += ["--root-certificates", str(ca)]
    if private_key is not None:
        key = Path(private_key).resolve()
        check_files(key)
        command += ["--auth-supernode-private-key", str(key)]
    command += ["--node-config", node_config_arg(node_config), "--port", str(port)]
    if max_wait_s is not None:
        command += ["--max-wait-time", str(max_wait_s)]
    if log_path is None:
        return SuperNode(popen(command, env, None), site, port)
    with open(log_path, "ab") as log:
        return SuperNode(popen(command, env, log), site, port)


def node_config_arg(node_config: Mapping[str, str]) -> str:
    """The `--node-config` text for string values, exactly as Flower parses it back.

    Flower splits on `key=value` pairs and reads each value as TOML: single-quoted TOML literal
    strings keep backslashes and spaces as they are.

    Raises:
        ValueError: a key or value Flower's parser cannot carry (whitespace or "=" in a key, a
            value with both quote kinds).
    """
    parts = []
    for key, value in node_config.items():
        if not key or any(c.isspace() or c in "='\"" for c in key):
            raise ValueError(f"node config key {key!r} cannot be passed to Flower")
        if "'" not in value and "\n" not in value:
            parts.append(f"{key}='{value}'")
        elif '"' not in value and "\n" not in value:
            parts.append(f"{key}={json.dumps(value, ensure_ascii=False)}")  # a TOML basic string too
        else:
            raise ValueError(f"node config {key}: {value!r} cannot be passed to Flower (quotes or newline)")
    return " ".join(parts)
