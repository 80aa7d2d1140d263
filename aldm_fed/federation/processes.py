"""Process plumbing shared by the SuperLink and the SuperNodes: environment, process groups, ports.

Every Flower process finds its own children (`flower-superexec`, `flwr-serverapp`,
`flwr-clientapp`) by bare name, so the running interpreter's bin/ goes first on their PATH. Each
process runs in its own session: Ctrl-C at the terminal reaches only us, and we stop each child
with its whole process group. FLWR_HOME points into the state folder (the `flwr` CLI's connection
file, the app bundles Flower unpacks), telemetry and update checks are off (hospitals' machines
must not call out, and the update check keeps a process alive until it times out offline).

A Flower process in a session of its own outlives a parent that is killed outright (`kill -9`, the
OOM killer): the SuperLink would keep the port (the same `aldm-fed server` command could not start
again) and its ServerApp would drive the run unattended. On Linux each child therefore asks the
kernel for SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`), which Flower handles as a
graceful stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "LOOPBACK",
    "LaunchError",
    "binary",
    "check_files",
    "check_port_free",
    "descendants",
    "die_with_parent",
    "flower_env",
    "free_port",
    "interrupt_on_sigterm",
    "host_port",
    "popen",
    "reach_host",
    "stop_group",
    "tail",
    "tcp_reachable",
    "tls_mismatch",
]

# The wildcard addresses a server may bind -> the loopback address this machine reaches it by.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class LaunchError(RuntimeError):
    """A Flower process could not be started, reached or driven; the message says why."""


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


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a Flower process: this interpreter's bin/ first on PATH, FLWR_HOME, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def binary(name: str, env: Mapping[str, str]) -> str:
    """The path of the executable `name` on `env`'s PATH; LaunchError (saying how to fix it) if missing."""
    path = shutil.which(name, path=env.get("PATH"))
    if path is None:
        raise LaunchError(
            f"`{name}` was not found on PATH (nor next to {sys.executable}): install aldm-fed with"
            " its dependencies (flwr 1.42) in this environment, or activate its virtual environment"
        )
    return path


def popen(command: list[str], env: Mapping[str, str], output: Any) -> subprocess.Popen[bytes]:
    """Start `command` in a session of its own, stdout and stderr to `output` (None: ours).

    On Linux, and when called from the main thread, the child gets SIGTERM if this process dies
    without stopping it (see the module docstring).
    """
    # A session of its own: the terminal's Ctrl-C reaches only us, and the group can be stopped
    # as a whole (Flower's processes start children of their own).
    return subprocess.Popen(
        command, env=dict(env), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        # preexec_fn only calls prctl/getppid/kill: nothing a lock held by another thread guards.
        start_new_session=True, preexec_fn=die_with_parent(),  # noqa: PLW1509
    )


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGTERM when this process dies; None where
    that cannot be had (not Linux) or would misfire (Linux signals the death of the creating
    THREAD, so only the main thread, which lives as long as the process, may use it)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def stop_group(process: subprocess.Popen[Any], timeout: float) -> int:
    """Stop a process, its group and every descendant; returns the process's exit code.

    SIGTERM to the group first (Flower's processes shut down gracefully on it), then to the
    descendants that outlived the process, SIGKILL to what is left after `timeout`. Descendants
    are tracked because Flower starts the SuperLink's SuperExec in a session of its own, and its
    ServerApp, left alone, retries the vanished SuperLink for seconds before it gives up.
    """
    tree = descendants(process.pid)
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


def descendants(pid: int) -> list[tuple[int, str]]:
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


def check_files(*paths: Path) -> None:
    """Raise FileNotFoundError naming the first of `paths` that is not a file."""
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")


def check_port_free(host: str, port: int) -> None:
    """Raise LaunchError if `port` on `host` cannot be bound now."""
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


def reach_host(host: str) -> str:
    """The address this machine reaches a server bound to `host` by."""
    return LOOPBACK.get(host, host)


def host_port(host: str, port: int) -> str:
    """HOST:PORT, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file, or "(no output)" if it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def tcp_reachable(address: str, timeout: float = 2.0) -> bool:
    """True if a TCP connection to `address` (HOST:PORT) opens within `timeout` seconds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def tls_mismatch(address: str, ca_cert: str | os.PathLike[str] | None, timeout: float = 5.0) -> str | None:
    """Why a client cannot talk to the server at `address` with this TLS setting, or None.

    A SuperNode whose TLS does not match the SuperLink's (a plaintext client against a TLS
    server, a CA that did not sign the server's certificate) only logs "Connection attempt
    failed, retrying" and retries forever; this handshake tells the two cases apart at once.

    Args:
        address: HOST:PORT of the server.
        ca_cert: the CA the client trusts; None for a plaintext (--insecure) client.
        timeout: seconds for the connection and the handshake.

    Returns:
        A message saying what does not match and how to fix it; None when the setting fits, or
        when the server cannot be reached (nothing to say yet).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None
    with raw:
        if ca_cert is None:
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.check_hostname = False
            probe.verify_mode = ssl.CERT_NONE
            try:
                with probe.wrap_socket(raw, server_hostname=host):
                    pass
            except (ssl.SSLError, OSError):
                return None  # no TLS handshake: a plaintext server, as the client expects
            return (f"the server at {address} speaks TLS but this client is plaintext (--insecure): give it"
                    " the federation's CA and its key (--certs DIR, or --ca FILE --key FILE)")
        context = ssl.create_default_context(cafile=str(ca_cert))
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            return (f"the server at {address} presented a certificate that does not verify against"
                    f" {ca_cert} ({exc.verify_message}): use the ca.crt of the server's federation, and a"
                    f" server certificate that lists {host} (aldm-fed certs --host {host})")
        except (ssl.SSLError, OSError) as exc:
            return (f"no TLS handshake with the server at {address} ({exc}): is it running with"
                    " --insecure? Then this client needs --insecure too (closed test networks only)")
