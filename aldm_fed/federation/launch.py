"""Run a federation on Flower's Deployment Engine: stage the app, start the processes, follow the run.

`aldm-fed server` and `aldm-fed client` call `run_server` and `run_client`; tests and local
multi-site runs use the pieces. The processes, as Flower 1.42 wants them:

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key
        --enable-supernode-auth --disable-runtime-dependency-installation
        --database <state>/superlink.db --host H --port P
    flwr supernode register sites/<S>.pub aldm-fed --name <S> --format json
    flwr run <state>/app aldm-fed --format json          -> run id
    flwr log <run id> aldm-fed --stream                   -> ends when the run has finished
    flwr ls aldm-fed --run-id <run id> --format json      -> finished:completed | failed | stopped
    flower-supernode --superlink H:P --root-certificates ca.crt --auth-supernode-private-key S.key
        --node-config "site='S' data-path='...' state-path='...'" --port <free port>

Every Flower process finds its own children (`flower-superexec`, `flwr-serverapp`,
`flwr-clientapp`) by bare name, so the running interpreter's bin/ goes first on their PATH. Each
process runs in its own session: Ctrl-C at the terminal reaches only us, and we stop each child
with its whole process group. FLWR_HOME points into the state folder (the `flwr` CLI's connection
file, the app bundles Flower unpacks), telemetry and update checks are off (hospitals' machines
must not call out, and the update check keeps a process alive until it times out offline).

In Flower 1.42 the SuperLink serves the Fleet API (SuperNodes), the Control API (`flwr run`)
and the Runtime API (its own ServerApp) on ONE port. The open-source Control API has no user
authentication: whoever reaches the port can submit an app that runs on every SuperNode. Hence
the SuperLink listens on loopback unless told otherwise, and a wider `host` comes with a warning
to firewall the port to the sites' addresses.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig

from aldm_fed import __version__
from aldm_fed.io import atomic_dir, atomic_write_text

__all__ = [
    "CONNECTION",
    "DEFAULT_PORT",
    "LaunchError",
    "RunStatus",
    "ServerTls",
    "SuperLink",
    "SuperNode",
    "app_source_dir",
    "client_command",
    "follow_run",
    "free_port",
    "interrupt_on_sigterm",
    "node_config_arg",
    "register_supernodes",
    "run_app",
    "run_client",
    "run_server",
    "run_status",
    "site_files",
    "stage_app",
    "start_superlink",
    "start_supernode",
    "stop_run",
    "submit_run",
]

DEFAULT_PORT = 8000  # Flower's own default for the SuperLink
CONNECTION = "aldm-fed"  # the SuperLink connection's name in $FLWR_HOME/config.toml
PUBLISHER = "aldm-fed"  # [tool.flwr.app] publisher; also marks a folder as staged by us
_APP_PARTS = ("server", "client")
_INT64 = (-(2**63), 2**63 - 1)  # Flower carries run-config integers as sint64
_FLWR_TIMEOUT_S = 120.0  # one `flwr` CLI call (it imports Flower: ~1 s, more on a busy machine)
_RETRY_S = 5.0  # `aldm-fed client`: pause before restarting a SuperNode that could not join
_EARLY_EXIT_S = 60.0  # a SuperNode exiting sooner than this after its start did not join
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class LaunchError(RuntimeError):
    """A Flower process could not be started, reached or driven; the message says why."""


# --------------------------------------------------------------------------------------------
# The app bundle
# --------------------------------------------------------------------------------------------


def app_source_dir() -> Path:
    """The folder holding the Flower app components `server/` and `client/`.

    The checkout's root (next to `aldm_fed/`), else the copy a wheel install ships as data
    (`<prefix>/share/aldm-fed/app`, pyproject `shared-data`), found the way `config_dir()` finds
    the configs.

    Raises:
        FileNotFoundError: neither has `server/app.py` and `client/app.py`.
    """
    checkout = Path(__file__).resolve().parents[2]
    installed = Path(sysconfig.get_path("data")) / "share" / "aldm-fed" / "app"
    for root in (checkout, installed):
        if all((root / part / "app.py").is_file() for part in _APP_PARTS):
            return root
    raise FileNotFoundError(
        f"no Flower app found (looked for server/app.py and client/app.py in {checkout} and"
        f" {installed}); reinstall aldm-fed"
    )


def stage_app(
    dest: str | os.PathLike[str],
    run_config: Mapping[str, bool | int | float | str],
    *,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Build the Flower app folder that `flwr run` bundles: the app's code and its run config.

    The folder holds `server/` and `client/` (their .py files) and a pyproject.toml whose
    `[tool.flwr.app.config]` is `run_config` with each dotted key quoted, so Flower's own
    flattening gives `context.run_config == run_config` on the server and on every site.
    `dependencies` is empty: the SuperLink runs with runtime dependency installation disabled and
    every process uses this environment. Flower bundles only *.py/*.toml/*.md/*.yaml/*.json files
    and refuses bundles over 10 MB; code plus a flat config is a few tens of kB.

    Args:
        dest: the app folder, replaced as a whole if it holds an app staged before.
        run_config: Flower's run config (`aldm_fed.config.flatten_config` of the composed config).
        source: folder with `server/` and `client/` (default: `app_source_dir()`).

    Returns:
        `dest`.

    Raises:
        ValueError: a run-config value Flower cannot carry, or `dest` exists and is not an app
            staged by this function (it is never deleted then).
        FileNotFoundError: the source has no server/app.py or client/app.py.
    """
    import tomli_w

    dest = Path(dest)
    source = Path(source) if source is not None else app_source_dir()
    _check_run_config(run_config)
    for part in _APP_PARTS:
        if not (source / part / "app.py").is_file():
            raise FileNotFoundError(f"{source / part / 'app.py'}: the Flower app component is missing")
    if dest.exists() and any(dest.iterdir()) and not _is_staged_app(dest):
        raise ValueError(f"{dest} exists and is not an app folder staged by aldm-fed; not replacing it")

    pyproject = {
        "project": {
            "name": "aldm-fed",
            "version": __version__,
            "description": "aldm-fed federated run (staged by `aldm-fed server`)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                    "config": dict(run_config),
                }
            }
        },
    }
    with atomic_dir(dest) as tmp:
        for part in _APP_PARTS:
            for path in sorted((source / part).rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                target = tmp / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        (tmp / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    return dest


def _check_run_config(run_config: Mapping[str, Any]) -> None:
    for key, value in run_config.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ValueError(f"run config key {key!r} is empty or has an empty dotted part")
        if not isinstance(value, bool | int | float | str):
            raise ValueError(f"run config {key!r}: {type(value).__name__} is not bool, int, float or str")
        if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"run config {key!r}: {value} does not fit Flower's 64-bit integers")


def _is_staged_app(folder: Path) -> bool:
    import tomllib

    try:
        config = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return config.get("tool", {}).get("flwr", {}).get("app", {}).get("publisher") == PUBLISHER


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it; another process may take it later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while inside, so `finally` blocks stop the children.

    Python's default SIGTERM ends the process at once and would orphan every Flower process.
    Only the main thread can set signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def _binary(name: str, env: Mapping[str, str]) -> str:
    path = shutil.which(name, path=env.get("PATH"))
    if path is None:
        raise LaunchError(
            f"`{name}` was not found on PATH (nor next to {sys.executable}): install aldm-fed with"
            " its dependencies (flwr 1.42) in this environment, or activate its virtual environment"
        )
    return path


def _popen(command: list[str], env: Mapping[str, str], output: Any) -> subprocess.Popen[bytes]:
    # A session of its own: the terminal's Ctrl-C reaches only us, and the group can be stopped
    # as a whole (Flower's processes start children of their own).
    return subprocess.Popen(
        command, env=dict(env), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop_group(process: subprocess.Popen[Any], timeout: float) -> int:
    """Stop a process, its group and every descendant; returns the process's exit code.

    SIGTERM to the group first (Flower's processes shut down gracefully on it), then to the
    descendants that outlived the process, SIGKILL to what is left after `timeout`. Descendants
    are tracked because Flower starts the SuperLink's SuperExec in a session of its own, and its
    ServerApp, left alone, retries the vanished SuperLink for seconds before it gives up.
    """
    tree = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    # What is left of the tree outlived its parent and can do nothing useful without it.
    for pid, start in tree:
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (_group_alive(process.pid) or any(_alive(*proc) for proc in tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid, start in tree:
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return code


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...; Linux), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and ")"


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every descendant of `pid` now; empty where there is no /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (fields := _proc_stat(entry.name)) is not None:
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _alive(pid: int, start: str) -> bool:
    """True if the process `pid` that started at `start` still runs (zombies count as gone)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


def _check_files(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # The same option uvicorn sets, so a port in TIME_WAIT is not reported as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError(
                f"port {port} on {host} is not available ({exc.strerror}): another SuperLink or"
                " service uses it; pick another with --port"
            ) from None


def _reach_host(host: str) -> str:
    """The address this machine reaches a server bound to `host` by."""
    return _LOOPBACK.get(host, host)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


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
        env = _flower_env(self.flwr_home)
        command = [_binary("flwr", env), *args]
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
        return _stop_group(self.process, timeout)

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
        _check_files(tls.ca_cert, tls.cert, tls.key)
    state = Path(state_dir).resolve()
    flwr_home = state / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = _flower_env(flwr_home)
    command = [_binary("flower-superlink", env)]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert)]
        command += ["--ssl-keyfile", str(tls.key)]
    if node_auth:
        command.append("--enable-supernode-auth")
    command += ["--disable-runtime-dependency-installation", "--database", str(state / "superlink.db")]
    command += ["--host", host, "--port", str(port)]
    _check_port_free(host, port)

    reach = _reach_host(host)
    address = _join(reach, port)
    connection: dict[str, Any] = {"address": address}
    if tls is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(tls.ca_cert)  # Flower requires an absolute path
    _write_flwr_config(flwr_home, connection)

    log_path = state / "superlink.log"
    with open(log_path, "ab") as log:
        process = _popen(command, env, log)
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
    host = _reach_host(link.host)
    deadline = time.monotonic() + timeout
    while True:
        if link.process.poll() is not None:
            raise LaunchError(
                f"flower-superlink exited with code {link.process.returncode}; its last output"
                f" ({link.log_path}):\n{_tail(link.log_path)}"
            )
        if _health(host, link.port, link.ca_cert):
            return
        if time.monotonic() > deadline:
            raise LaunchError(
                f"the SuperLink did not answer on {link.address} within {timeout:.0f} s; its last"
                f" output ({link.log_path}):\n{_tail(link.log_path)}"
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
        _check_files(path)
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
    env = _flower_env(link.flwr_home)
    command = [_binary("flwr", env), "log", str(run_id), CONNECTION, "--stream"]
    stream = subprocess.Popen(
        command, env=env, cwd=link.flwr_home, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
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
            _stop_group(stream, timeout=5)
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
        return _stop_group(self.process, timeout)

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
    port: int | None = None,
    max_wait_s: float | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> SuperNode:
    """Start `flower-supernode` for one site.

    Its ClientApps get `context.node_config == {"site": site, "data-path": ..., "state-path": ...}`
    (absolute paths). FLWR_HOME is `<state_path>/flwr`, where Flower unpacks the app bundles.

    Args:
        superlink: the SuperLink's Fleet API as HOST:PORT.
        site: the site's name.
        data_path: the site's cohort folder (case folders + manifests/).
        state_path: the site's state folder (created if missing).
        ca_cert: the CA that verifies the SuperLink (TLS); required unless `insecure`.
        private_key: the site's SuperNode key (OpenSSH private key) for node authentication.
        insecure: plaintext HTTP to the SuperLink (no TLS, hence no node authentication).
        port: the local Runtime API port (default: a free one, so sites can share a machine).
        max_wait_s: give up after this long without reaching the SuperLink (None: never).
        log_path: file for the SuperNode's output (None: this process's standard output).

    Returns:
        The running SuperNode.

    Raises:
        ValueError: TLS and `insecure` both or neither given, or a key without TLS.
        FileNotFoundError: the CA or key file is missing.
        LaunchError: `flower-supernode` is not installed.
    """
    if insecure == (ca_cert is not None):
        raise ValueError("give either ca_cert (TLS) or insecure=True")
    if insecure and private_key is not None:
        raise ValueError("SuperNode authentication needs TLS: a private key cannot be used with insecure")
    state = Path(state_path).resolve()
    flwr_home = state / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = _flower_env(flwr_home)
    port = port if port is not None else free_port()
    node_config = {"site": site, "data-path": str(Path(data_path).resolve()), "state-path": str(state)}
    command = [_binary("flower-supernode", env), "--superlink", superlink]
    if insecure:
        command.append("--insecure")
    else:
        ca = Path(ca_cert).resolve()  # type: ignore[arg-type]  # not None: checked above
        _check_files(ca)
        command += ["--root-certificates", str(ca)]
    if private_key is not None:
        key = Path(private_key).resolve()
        _check_files(key)
        command += ["--auth-supernode-private-key", str(key)]
    command += ["--node-config", node_config_arg(node_config), "--port", str(port)]
    if max_wait_s is not None:
        command += ["--max-wait-time", str(max_wait_s)]
    if log_path is None:
        return SuperNode(_popen(command, env, None), site, port)
    with open(log_path, "ab") as log:
        return SuperNode(_popen(command, env, log), site, port)


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


def _tcp_reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# The two commands
# --------------------------------------------------------------------------------------------


def client_command(site: str, server: str, *, insecure: bool = False) -> str:
    """The `aldm-fed client` command line a site runs to join; COHORT_DIR stands for its data."""
    args = ["aldm-fed", "client", "--site", site, "--data", "COHORT_DIR", "--server", server]
    args += ["--insecure"] if insecure else ["--ca", "ca.crt", "--key", f"{site}.key"]
    return shlex.join(args)


def run_server(
    cfg: DictConfig,
    *,
    certs: str | os.PathLike[str] | None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    insecure: bool = False,
    app_source: str | os.PathLike[str] | None = None,
    on_ready: Callable[[SuperLink], None] | None = None,
    echo: Callable[[str], None] = print,
    out: TextIO | None = None,
) -> RunStatus:
    """`aldm-fed server`: stage the app, start the SuperLink, register the sites, run, stop.

    Args:
        cfg: the composed config; its paths are made absolute here, and it travels as the run
            config. The sites are `fed.sites`, or every `sites/*.pub` of the certificates.
        certs: the folder made by `aldm-fed certs` (ca.crt, server.crt, server.key, sites/*.pub);
            required unless `insecure`.
        host: the address the SuperLink listens on (see the module note on the Control API).
        port: its port.
        insecure: plaintext and no node authentication (closed test networks only).
        app_source: folder with the app's `server/` and `client/` (default: `app_source_dir()`).
        on_ready: called once the SuperLink is up and the sites are registered (e.g. to start
            local SuperNodes).
        echo: where messages go.
        out: where the run's log goes (default: standard output).

    Returns:
        How the run finished.

    Raises:
        ValueError: neither certificates nor `insecure`, or a listed site has no public key.
        FileNotFoundError: a certificate or key file is missing.
        LaunchError: a process could not be started or driven.
    """
    from aldm_fed.config import absolute_paths, flatten_config
    from aldm_fed.federation.security import load_certificate_set

    cfg = absolute_paths(cfg)
    state = Path(str(cfg.fed.state))
    sites = [str(s) for s in cfg.fed.sites] if cfg.fed.get("sites") else None
    tls, public_keys = None, {}
    if insecure:
        echo(
            "WARNING: --insecure: traffic is NOT encrypted and ANY SuperNode may join (no node"
            " authentication). Use only on a closed test network."
        )
    else:
        if certs is None:
            raise ValueError(
                "TLS needs the certificates: pass --certs DIR (make them with `aldm-fed certs --out"
                " DIR --sites A B ...`), or --insecure for a closed test network"
            )
        cert_set = load_certificate_set(certs, sites)
        tls = ServerTls(cert_set.ca_cert, cert_set.server_cert, cert_set.server_key)
        public_keys = {site: keys.public for site, keys in cert_set.site_keys.items()}
        if sites is not None:
            public_keys = {site: public_keys[site] for site in sites}
        if not public_keys:
            raise ValueError(f"{Path(certs) / 'sites'}: no site public keys (*.pub) to register")
        if sites is None:  # the registered sites are the federation (the server needs no cohort)
            cfg.fed.sites = sorted(public_keys)
    if host not in ("127.0.0.1", "::1", "localhost"):
        echo(
            f"WARNING: the SuperLink listens on {host}:{port}. In Flower 1.42 its Control API"
            " (which submits code that runs at every site) shares this port and has no user"
            " authentication: firewall the port to the sites' addresses."
        )

    app_dir = stage_app(state / "app", flatten_config(cfg), source=app_source)
    echo(f"app staged in {app_dir}")
    with start_superlink(state, host=host, port=port, tls=tls, node_auth=not insecure) as link:
        echo(f"SuperLink listening on {_join(host, port)} (log: {link.log_path})")
        for site, node_id in register_supernodes(link, public_keys).items():
            state_text = "registered" if node_id is not None else "already registered"
            echo(f"site {site}: key {public_keys[site]} {state_text}")
        server = _join(_advertised_host(host, tls, echo), port)
        files = "" if insecure else "; give site S the files ca.crt and sites/S.key"
        echo(f"each site joins with (COHORT_DIR: its case folders + manifests/{files}):")
        for site in sites or sorted(public_keys) or ["SITE"]:
            echo(f"  {client_command(site, server, insecure=insecure)}")
        if host in ("127.0.0.1", "::1", "localhost"):
            echo(f"  (listening on {host} only: sites on other machines need --host 0.0.0.0)")
        if on_ready is not None:
            on_ready(link)
        status = run_app(link, app_dir, out=out)
    echo(f"run {status.run_id}: {status.status}" + ("" if status.ok else f" ({status.details})"))
    return status


def _advertised_host(host: str, tls: ServerTls | None, echo: Callable[[str], None]) -> str:
    """The name sites should connect by: the bound host, else the certificate's first
    non-loopback name, else this machine's name; warns if the certificate does not cover it."""
    names: list[str] = []
    if tls is not None:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        names += san.get_values_for_type(x509.DNSName)
    advertised = host
    if host in _LOOPBACK:
        remote = [name for name in names if name != "localhost" and not _is_loopback_ip(name)]
        advertised = remote[0] if remote else socket.getfqdn()
    if tls is not None and advertised not in names:
        echo(
            f"WARNING: {tls.cert} is valid for {', '.join(names)} only: sites connecting to"
            f" {advertised} will fail TLS verification. Remake the certificates with"
            f" `aldm-fed certs --host {advertised} ...`."
        )
    return advertised


def _is_loopback_ip(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def run_client(
    *,
    site: str,
    data: str | os.PathLike[str],
    server: str,
    state: str | os.PathLike[str],
    ca_cert: str | os.PathLike[str] | None = None,
    private_key: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    port: int | None = None,
    max_wait_s: float = 600.0,
    join_wait_s: float = 600.0,
    echo: Callable[[str], None] = print,
) -> int:
    """`aldm-fed client`: run a site's SuperNode in the foreground until the server goes away.

    The SuperNode's output goes to standard output. Flower's SuperNode does not exit when it
    loses a SuperLink it was connected to (1.42 logs "Giving up reconnection" and then hangs), so
    this watches the SuperLink's port itself and stops the SuperNode once the SuperLink has been
    unreachable for `max_wait_s`. Ctrl-C (KeyboardInterrupt) stops it too and is re-raised.

    Args:
        site: the site's name.
        data: the site's cohort folder; must hold manifests/<site>.json.
        server: the SuperLink as HOST:PORT.
        state: the site's state folder (created if missing).
        ca_cert: the federation's CA certificate (TLS); required unless `insecure`.
        private_key: the site's SuperNode key (required with TLS: the server authenticates nodes).
        insecure: plaintext, for a server started with --insecure.
        port: the SuperNode's local Runtime API port (default: a free one).
        max_wait_s: how long the SuperLink may be unreachable (also at the start) before stopping.
        join_wait_s: how long a SuperNode that stops before joining (e.g. the server has not
            registered this site's key yet) is restarted.
        echo: where messages go.

    Returns:
        0 when the server went away after the site had reached it, 1 if it was never reached,
        else the exit code of the SuperNode where it stopped by itself (e.g. 1: key refused).

    Raises:
        FileNotFoundError: the data folder, its manifest, the CA or the key is missing.
        ValueError: inconsistent TLS options or a malformed `server`.
    """
    data_path = Path(data).resolve()
    manifest = data_path / "manifests" / f"{site}.json"
    if not data_path.is_dir():
        raise FileNotFoundError(f"{data_path}: the data folder does not exist")
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest for site {site!r} in the data folder")
    if not insecure and private_key is None:
        raise ValueError("the server authenticates sites: give the site's key (--key or --certs)")
    host, sep, port_text = server.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"--server {server!r}: expected HOST:PORT")
    def start() -> SuperNode:
        return start_supernode(
            server, site=site, data_path=data_path, state_path=state, ca_cert=ca_cert,
            private_key=private_key, insecure=insecure, port=port,
        )

    node = start()
    first_start = node_start = time.monotonic()
    echo(f"site {site}: SuperNode started for {server} (state: {Path(state).resolve()}); Ctrl-C stops it")
    reached = False
    last_seen = time.monotonic()
    try:
        while True:
            code = node.process.poll()
            if code is not None:
                node.stop()  # the SuperNode's own children
                # Stopped right away (Flower exits 1 for every error): most often the server has
                # not registered this site's key yet, as sites may start before the server. Keep
                # knocking for join_wait_s; Flower's message above says what it was.
                now = time.monotonic()
                if code != 0 and now - node_start < _EARLY_EXIT_S and now - first_start < join_wait_s:
                    echo(f"site {site}: the SuperNode stopped before joining (see above; e.g. this "
                         f"site's key is not registered yet); retrying in {_RETRY_S:.0f} s, for up to "
                         f"{join_wait_s:.0f} s")
                    time.sleep(_RETRY_S)
                    node, node_start = start(), time.monotonic()
                    continue
                echo(f"site {site}: SuperNode exited with code {code}")
                return code
            if _tcp_reachable(server):
                reached, last_seen = True, time.monotonic()
            elif time.monotonic() - last_seen > max_wait_s:
                echo(f"site {site}: the SuperLink at {server} has been unreachable for {max_wait_s:.0f} s; stopping")
                node.stop()
                return 0 if reached else 1
            time.sleep(2.0)
    except BaseException:
        node.stop()
        raise


def site_files(certs: str | os.PathLike[str], site: str) -> tuple[Path, Path]:
    """A site's (CA certificate, SuperNode private key) in a certificates folder.

    The folder is the one `aldm-fed certs` made (ca.crt, sites/<site>.key) or the copy a site
    received (ca.crt and <site>.key side by side).

    Raises:
        FileNotFoundError: the CA certificate or the site's key is missing (the message names it).
    """
    root = Path(certs)
    ca = root / "ca.crt"
    keys = [root / "sites" / f"{site}.key", root / f"{site}.key"]
    _check_files(ca)
    for key in keys:
        if key.is_file():
            return ca, key
    raise FileNotFoundError(f"{keys[0]}: no SuperNode key for site {site!r} (nor {keys[1]})")
