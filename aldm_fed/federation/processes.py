"""Process plumbing shared by the SuperLink and the SuperNodes: environment, process groups, ports.

Every Flower process finds its own children (`flower-superexec`, `flwr-serverapp`,
`flwr-clientapp`) by bare name, so the running interpreter's bin/ goes first on their PATH. Each
process runs in its own session: Ctrl-C at the terminal reaches only us, and we stop each child
with its whole process group. FLWR_HOME points into the state folder (the `flwr` CLI's connection
file, the app bundles Flower unpacks), telemetry and update checks are off (hospitals' machines
must not call out, and the update check keeps a process alive until it times out offline).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "LOOPBACK",
    "LaunchError",
    "binary",
    "check_files",
    "check_port_free",
    "flower_env",
    "free_port",
    "interrupt_on_sigterm",
    "host_port",
    "popen",
    "reach_host",
    "stop_group",
    "tail",
    "tcp_reachable",
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
    """Start `command` in a session of its own, stdout and stderr to `output` (None: ours)."""
    # A session of its own: the terminal's Ctrl-C reaches only us, and the group can be stopped
    # as a whole (Flower's processes start children of their own).
    return subprocess.Popen(
        command, env=dict(env), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_group(process: subprocess.Popen[Any], timeout: float) -> int:
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
