"""The SuperLink: start `flower-superlink`, register the sites' keys, submit, follow and stop runs.

The processes, as Flower 1.42 wants them:

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key
        --enable-supernode-auth --disable-runtime-dependency-installation
        --database <state>/superlink.db --host H --port P
    flwr supernode register sites/<S>.pub aldm-fed --name <S> --format json
    flwr run <state>/app aldm-fed --format json          -> run id
    flwr log <run id> aldm-fed --stream                   -> ends when the run has finished
    flwr ls aldm-fed --run-id <run id> --format json      -> finished:completed | failed | stopped

In Flower 1.42 the SuperLink serves the Fleet API (SuperNodes), the Control API (`flwr run`)
and the Runtime API (its own ServerApp) on ONE port. The open-source Control API has no user
authentication: whoever reaches the port can submit an app that runs on every SuperNode. Hence
the SuperLink listens on loopback unless told otherwise, and a wider `host` comes with a warning
to firewall the port to the sites' addresses.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aldm_fed.federation.processes import (
    LaunchError,
    binary,
    check_files,
    check_port_free,
    die_with_parent,
    flower_env,
    host_port,
    popen,
    reach_host,
    stop_group,
    tail,
)
from aldm_fed.io import atomic_write_text

__all__ = [
    "CONNECTION",
    "DEFAULT_PORT",
    "RunStatus",
    "ServerTls",
    "SuperLink",
    "follow_run",
    "register_supernodes",
    "run_app",
    "run_status",
    "start_superlink",
    "stop_run",
    "submit_run",
]

DEFAULT_PORT = 8000  # Flower's own default for the SuperLink
CONNECTION = "aldm-fed"  # the SuperLink connection's name in $FLWR_HOME/config.toml
_FLWR_TIMEOUT_S = 120.0  # one `flwr` CLI call (it imports Flower: ~1 s, more on a busy machine)


@dataclass(frozen=True)
class ServerTls:
    """The SuperLink's TLS files (PEM).

    Attributes:
        ca_cert: the CA certificate that signed `cert`; the SuperLink's own ServerApp and the
            `flwr` CLI verify the SuperLink with it.
        cert: the SuperLink's certificate; its subjectAltNames must include the loopback address
            (127.0.0.1) or the bound host, and every name sites connect by.
        key: the certificate's private key.
    """

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class RunStatus:
    """Where a Flower run stands (`flwr ls`).

    Attributes:
        run_id: Flower's run id.
        status: "pending", "starting", "running" or "finished:<completed|failed|stopped>".
        details: Flower's status details (the exception of a failed ServerApp), or "N/A".
    """

    run_id: int
    status: str
    details: str

    @property
    def finished(self) -> bool:
        """True once the run has ended, whichever way."""
        return self.status.startswith("finished")

    @property
    def ok(self) -> bool:
        """True if the run finished and its ServerApp completed without an exception."""
        return self.status == "finished:completed"


def _health(host: str, port: int, ca_cert: Path | None, timeout: float = 2.0) -> bool:
    """True if the SuperLink answers GET /health with 200; TLS is verified against `ca_cert`.

    Raises:
        LaunchError: the TLS certificate does not verify (waiting longer would not help).
    """
    if ca_cert is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        context = ssl.create_default_context(cafile=str(ca_cert))
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except ssl.SSLCertVerificationError as exc:
        raise LaunchError(
            f"the SuperLink's certificate does not verify for {host} against {ca_cert}:"
            f" {exc.verify_message}. The server certificate must list {host} among its hosts"
            " (aldm-fed certs --host ...) and be signed by that CA"
        ) from None
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@dataclass
class SuperLink:
    """A running `flower-superlink` and the `flwr` CLI connection to it.

    Use as a context manager, or call `stop()`.

    Attributes:
        process: the SuperLink process (leader of its own process group).
        host: the address it listens on.
        port: its port (Fleet, Control and Runtime APIs alike).
        address: where this machine reaches it (loopback when it listens on all interfaces).
        ca_cert: the CA that verifies it; None for a plaintext SuperLink.
        flwr_home: FLWR_HOME of the SuperLink and the `flwr` CLI (config.toml, unpacked apps).
        log_path: the SuperLink's own output.
    """

    process: subprocess.Popen[bytes]
    host: str
    port: int
    address: str
    ca_cert: Path | None
    flwr_home: Path
    log_path: Path

    def flwr(self, *args: str, timeout: float = _FLWR_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this SuperLink (output captured).

        Args:
            args: the CLI arguments; name the connection `CONNECTION` where one is expected.
            timeout: seconds before the call is abandoned.

        Raises:
            LaunchError: `flwr` is missing or did not finish in time.
        """
        env = flower_env(self.flwr_home)
        command = [binary("flwr", env), *args]
        try:
            # cwd: `flwr` resolves a connection name as a path to look for legacy config in.
            return subprocess.run(
                command, env=env, cwd=self.flwr_home, capture_output=True, text=True,
                timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise LaunchError(f"`{shlex.join(command)}` did not finish within {timeout:.0f} s") from None

    def flwr_json(self, *args: str) -> dict[str, Any]:
        """Run a `flwr ... --format json` command and return its JSON answer.

        Raises:
            LaunchError: no JSON in the output, or Flower reports failure (its message is kept).
        """
        result = self.flwr(*args, "--format", "json")
        text = result.stdout
        try:
            answer, _ = json.JSONDecoder().raw_decode(text, text.index("{"))
        except ValueError:
            raise LaunchError(
                f"`flwr {' '.join(args)}` gave no JSON answer (exit code {result.returncode}):"
                f" {(text + result.stderr).strip()[-2000:]}"
            ) from None
        if not answer.get("success", False):
            # Flower's message ends with the error itself, after lines echoing the connection.
            lines = str(answer.get("error-message", answer)).strip().splitlines() or ["(no message)"]
            raise LaunchError(f"`flwr {' '.join(args)}` failed: {lines[-1]}")
        return answer

    def stop(self, timeout: float = 20.0) -> int:
        """Stop the SuperLink (its ServerApp and SuperExec with it); returns its exit code."""
        # SIGTERM lets uvicorn shut down gracefully, which also terminates the SuperExec it
        # started in a session of its own; its ServerApp is stopped as a leftover descendant.
        return stop_group(self.process, timeout)

    def __enter__(self) -> SuperLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_superlink(
    state_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    tls: ServerTls | None,
    node_auth: bool = True,
    ready_timeout: float = 60.0,
) -> SuperLink:
    """Start `flower-superlink` and wait until it answers on its port.

    Its state (registered SuperNodes, runs) lives in `<state_dir>/superlink.db`, its output in
    `<state_dir>/superlink.log`, and `<state_dir>/flwr/config.toml` names it as the `flwr` CLI's
    connection `CONNECTION`.

    Args:
        state_dir: the server's federation state folder (created if missing).
        host: the address to listen on; "0.0.0.0" for every interface. Mind the module note:
            the Control API listens there too.
        port: the port of the Fleet, Control and Runtime APIs.
        tls: the TLS files; None runs plaintext HTTP (tests and closed networks only).
        node_auth: accept only SuperNodes whose public keys were registered (needs TLS).
        ready_timeout: seconds to wait for the SuperLink to answer.

    Returns:
        The running SuperLink.

    Raises:
        ValueError: node authentication without TLS.
        FileNotFoundError: a TLS file is missing.
        LaunchError: `flower-superlink` is not installed, the port is taken, the SuperLink exited
            or did not answer in time (its last output is included), or its certificate does not
            verify.
    """
    if node_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS: give the TLS files or turn node_auth off")
    if tls is not None:
        tls = ServerTls(*(Path(p).resolve() for p in (tls.ca_cert, tls.cert, tls.key)))
        check_files(tls.ca_cert, tls.cert, tls.key)
    state = Path(state_dir).resolve()
    flwr_home = state / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(flwr_home)
    command = [binary("flower-superlink", env)]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert)]
        command += ["--ssl-keyfile", str(tls.key)]
    if node_auth:
        command.append("--enable-supernode-auth")
    command += ["--disable-runtime-dependency-installation", "--database", str(state / "superlink.db")]
    command += ["--host", host, "--port", str(port)]
    check_port_free(host, port)

    reach = reach_host(host)
    address = host_port(reach, port)
    connection: dict[str, Any] = {"address": address}
    if tls is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(tls.ca_cert)  # Flower requires an absolute path
    _write_flwr_config(flwr_home, connection)

    log_path = state / "superlink.log"
    with open(log_path, "ab") as log:
        process = popen(command, env, log)
    link = SuperLink(process, host, port, address, tls.ca_cert if tls else None, flwr_home, log_path)
    try:
        _wait_ready(link, ready_timeout)
    except BaseException:
        link.stop()
        raise
    return link


def _write_flwr_config(flwr_home: Path, connection: Mapping[str, Any]) -> None:
    import tomli_w

    config = {"superlink": {"default": CONNECTION, CONNECTION: dict(connection)}}
    atomic_write_text(flwr_home / "config.toml", tomli_w.dumps(config))


def _wait_ready(link: SuperLink, timeout: float) -> None:
    host = reach_host(link.host)
    deadline = time.monotonic() + timeout
    while True:
        if link.process.poll() is not None:
            raise LaunchError(
                f"flower-superlink exited with code {link.process.returncode}; its last output"
                f" ({link.log_path}):\n{tail(link.log_path)}"
            )
        if _health(host, link.port, link.ca_cert):
            return
        if time.monotonic() > deadline:
            raise LaunchError(
                f"the SuperLink did not answer on {link.address} within {timeout:.0f} s; its last"
                f" output ({link.log_path}):\n{tail(link.log_path)}"
            )
        time.sleep(0.2)


def register_supernodes(link: SuperLink, public_keys: Mapping[str, str | os.PathLike[str]]) -> dict[str, int | None]:
    """Register sites' SuperNode public keys with the SuperLink (`flwr supernode register`).

    A key registered before (the SuperLink keeps its database) counts as registered.

    Args:
        link: the SuperLink.
        public_keys: site -> OpenSSH public key file (ECDSA on a NIST curve, e.g. P-384).

    Returns:
        site -> the new SuperNode id, or None where the key was already registered.

    Raises:
        FileNotFoundError: a key file is missing.
        LaunchError: Flower refused a key (its message is kept).
    """
    ids: dict[str, int | None] = {}
    for site, key in public_keys.items():
        path = Path(key).resolve()
        check_files(path)
        try:
            answer = link.flwr_json("supernode", "register", str(path), CONNECTION, "--name", site)
        except LaunchError as exc:
            if "already in use" not in str(exc):
                raise LaunchError(f"registering site {site!r} ({path}): {exc}") from None
            ids[site] = None
            continue
        ids[site] = int(answer["node-id"])
    return ids


def submit_run(link: SuperLink, app_dir: str | os.PathLike[str]) -> int:
    """Submit the app folder as a new run (`flwr run`); returns the run id.

    Raises:
        LaunchError: Flower refused the app (its message is kept).
    """
    answer = link.flwr_json("run", str(Path(app_dir).resolve()), CONNECTION)
    return int(answer["run-id"])


def run_status(link: SuperLink, run_id: int) -> RunStatus:
    """The run's status (`flwr ls --run-id`).

    Raises:
        LaunchError: the SuperLink does not know the run.
    """
    answer = link.flwr_json("ls", CONNECTION, "--run-id", str(run_id))
    run = answer["runs"][0]
    return RunStatus(run_id, str(run["status"]), str(run.get("status-details", "")))


def stop_run(link: SuperLink, run_id: int) -> bool:
    """Ask the SuperLink to stop a run (`flwr stop`); False if it could not (e.g. already over)."""
    try:
        link.flwr_json("stop", str(run_id), CONNECTION)
    except LaunchError:
        return False
    return True


def follow_run(
    link: SuperLink,
    run_id: int,
    *,
    out: TextIO | None = None,
    poll_s: float = 2.0,
    timeout: float | None = None,
) -> RunStatus:
    """Stream a run's log to `out` until the run has finished; returns how it finished.

    `flwr log --stream` ends when the SuperLink marks the run finished; `flwr ls` then gives the
    status. A stream that ends before (a dropped connection) is started again, skipping the lines
    already shown (the log only grows, and each stream starts from its beginning).

    Args:
        link: the SuperLink.
        run_id: the run.
        out: where the log goes (default: standard output).
        poll_s: seconds before a dropped stream is started again.
        timeout: seconds to wait for the end at most (None: no limit).

    Raises:
        LaunchError: the run did not finish within `timeout`.
    """
    out = out if out is not None else sys.stdout
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0
    while True:
        shown = _stream_log(link, run_id, out, shown, deadline)
        if (status := run_status(link, run_id)).finished:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise LaunchError(f"run {run_id} did not finish within {timeout:.0f} s")
        time.sleep(poll_s)


def _stream_log(link: SuperLink, run_id: int, out: TextIO, skip: int, deadline: float | None) -> int:
    """One `flwr log --stream`: copy its lines after the first `skip`; returns the lines seen."""
    env = flower_env(link.flwr_home)
    command = [binary("flwr", env), "log", str(run_id), CONNECTION, "--stream"]
    stream = subprocess.Popen(
        command, env=env, cwd=link.flwr_home, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        # An orphaned stream would hold the SuperLink's shutdown open (see processes.die_with_parent).
        preexec_fn=die_with_parent(),  # noqa: PLW1509
    )
    seen = [0]

    def copy() -> None:
        for line in stream.stdout or ():
            seen[0] += 1
            if seen[0] > skip:
                out.write(line)
                out.flush()

    # A thread reads, so that this (main) thread stays free for Ctrl-C and the deadline.
    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        while stream.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"run {run_id} did not finish in time")
            time.sleep(0.2)
        reader.join(timeout=5)
    finally:
        if stream.poll() is None:
            stop_group(stream, timeout=5)
    return max(skip, seen[0])


def run_app(
    link: SuperLink, app_dir: str | os.PathLike[str], *, out: TextIO | None = None, timeout: float | None = None
) -> RunStatus:
    """Submit the app, stream its log and wait for it to finish; Ctrl-C stops the run.

    Runs left unfinished in the SuperLink's database by an earlier, killed server are stopped
    first, so they cannot compete with this one for the sites.

    Args:
        link: the SuperLink.
        app_dir: the staged app folder (`stage_app`).
        out: where the log goes (default: standard output).
        timeout: seconds to wait for the run at most (None: no limit).

    Returns:
        How the run finished.

    Raises:
        LaunchError: Flower refused the app, or the run outlived `timeout` (it is stopped then).
    """
    for run in link.flwr_json("ls", CONNECTION)["runs"]:
        if not str(run["status"]).startswith("finished"):
            stop_run(link, int(run["run-id"]))
    run_id = submit_run(link, app_dir)
    try:
        return follow_run(link, run_id, out=out, timeout=timeout)
    except BaseException:
        stop_run(link, run_id)
        raise
