"""Fault injection against a real deployment on localhost: kill, corrupt, disconnect, mismatch.

    python simulations/faults.py [--only NAME ...] [--out DIR] [--keep] [--list]

Every scenario starts real `aldm-fed server` / `aldm-fed client` processes (TLS and SuperNode
authentication on, certificates from `aldm-fed certs`, free ports), injects one fault, watches
the outcome through exit codes, logs, `status.json`, `rounds.jsonl` and the files on disk, and
checks that nothing was lost (round checkpoints verified against their sha256, no half-written
file, synthetic volumes neither lost nor made twice). It prints a markdown table (fault,
expected, observed, data lost, seconds) and writes it to `<out>/faults.json` (atomically).

How faults are injected, without test hooks in the library:
- kills: SIGKILL from outside. A site is killed as a crashed machine would be (the `aldm-fed
  client` process and every descendant: SuperNode, SuperExec, the ClientApp at work); the server
  as `kill -9 PID` of the `aldm-fed server` command (its SuperLink and ServerApp must follow).
- corrupted replies and a wrong protocol: the runner stages its own copy of the Flower app whose
  ClientApp is aldm-fed's `client_app(mods=[fault_mod])`. The mod sits outside the allow-list and
  audit mods, so it tampers with a reply after the site checked and logged it, as a faulty or
  hostile site would, and only where the site's environment asks for it
  (`ALDM_FED_FAULT="vae:1=nan,vae:2=shape"`, `hello=protocol`). Since in a deployment the server
  ships the app to the sites, the server of these scenarios is `aldm-fed server` run through
  `python simulations/faults.py --serve-app DIR server ...`, which stages that app instead of the
  checkout's and is otherwise the same command.

Each scenario has a hard deadline and stops every process it started (process groups and all
descendants) whether it passes, fails or raises. The phantom cohort and the certificates are made
once per invocation and shared. A deployed tiny round costs 20-60 s on 2 cores (every message
starts a fresh `flwr-clientapp` process), so the scenarios keep rounds and steps to a minimum.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENV = "ALDM_FED_FAULT"  # the faulty site's plan, read by the staged ClientApp's mod

# The smallest run the code allows: 2 source sites, 1-3 VAE rounds of 2 steps, 1 backbone round,
# a 2-step ControlNet, no synthesis or classifiers unless the scenario needs them.
BASE = [
    "experiment=tiny", "device=cpu",
    "fed.phases.vae.local_steps=2", "fed.phases.backbone.rounds=1", "fed.phases.backbone.local_steps=2",
    "train.controlnet.max_steps=2", "train.controlnet.ckpt_every=2",
    "fed.phases.local.synthesize=false", "fed.phases.local.evaluate=false",
    "fed.wait_for_sites_s=120", "fed.round_timeout_s=180",
]
SITE_MAX_WAIT_S = 30  # `aldm-fed client --max-wait`: clients stop soon after their server is gone

# The staged ClientApp: aldm-fed's own, plus the fault mod (outermost).
FAULT_CLIENT_APP = '''"""aldm-fed's ClientApp plus a fault-injecting mod (staged by simulations/faults.py)."""

import os

import numpy as np
from flwr.app import Array

from aldm_fed.federation.apps import client_app

PLAN_ENV = "ALDM_FED_FAULT"


def plan():
    # "hello=protocol,vae:1=nan,vae:2=shape,vae:3=norm" -> {"hello": "protocol", "vae:1": "nan", ...}
    items = [p.split("=", 1) for p in os.environ.get(PLAN_ENV, "").split(",") if "=" in p]
    return {k.strip(): v.strip() for k, v in items}


def fault_mod(msg, context, call_next):
    reply = call_next(msg, context)
    config = msg.content["config"] if "config" in msg.content else {}
    phase = str(config.get("phase", "?"))
    faults = plan()
    kind = faults.get(f"{phase}:{config.get('round')}") or faults.get(phase)
    if kind is None or not reply.has_content():
        return reply
    content = reply.content
    if kind == "protocol":
        content["config"]["protocol"] = int(content["config"]["protocol"]) + 1
        content["config"]["version"] = "0.0.0-other"
        return reply
    arrays = content["arrays"]
    keys = list(arrays.keys())
    if kind == "nan":
        value = arrays[keys[0]].numpy().copy()
        value.flat[0] = np.nan
        arrays[keys[0]] = Array(value)
    elif kind == "shape":
        key = next(k for k in keys if arrays[k].numpy().ndim >= 1)
        value = arrays[key].numpy()
        arrays[key] = Array(np.zeros((value.shape[0] + 1, *value.shape[1:]), dtype=value.dtype))
    elif kind == "norm":
        for key in keys:
            value = arrays[key].numpy()
            if np.issubdtype(value.dtype, np.floating):
                arrays[key] = Array((value * 100).astype(value.dtype))
    else:
        raise ValueError(f"{PLAN_ENV}: unknown fault {kind!r}")
    return reply


app = client_app(mods=[fault_mod])
'''


# ------------------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table.

    Attributes:
        fault: what was done.
        expected: what the code should do.
        observed: what it did (measured, with the evidence).
        data_lost: "none", or what was lost / duplicated / half-written.
        seconds: the scenario's wall time (shared by the rows of one scenario).
        ok: observed matches expected and nothing was lost.
        scenario: the scenario that produced it (`--only` name).
    """

    fault: str
    expected: str
    observed: str
    data_lost: str
    seconds: float = 0.0
    ok: bool = False
    scenario: str = ""


class ScenarioError(RuntimeError):
    """A scenario could not be driven to its observation point (timeout, early exit)."""


@dataclass
class Context:
    """What every scenario shares: the tiny phantom cohort, the certificates, an output folder.

    Attributes:
        work: the folder the scenarios run in (one sub-folder each).
        cohort: the phantom cohort (sites A, B, C).
        certs: `aldm-fed certs` for sites A, B, C (the server registers only A and B).
        other_ca: a second, unrelated federation's certificates (another CA).
    """

    work: Path
    cohort: Path
    certs: Path
    other_ca: Path


def prepare(work: Path) -> Context:
    """Make the cohort and both certificate sets once (reused when already there)."""
    work.mkdir(parents=True, exist_ok=True)
    cohort, certs, other = work / "cohort", work / "certs", work / "other-ca"
    if not (cohort / "manifests" / "C.json").is_file():
        run_checked(aldm("data", "phantom", "--out", str(cohort), "experiment=tiny"), work / "prepare.log")
    if not (certs / "ca.crt").is_file():
        run_checked(aldm("certs", "--out", str(certs), "--sites", "A", "B", "C"), work / "prepare.log")
    if not (other / "ca.crt").is_file():
        run_checked(aldm("certs", "--out", str(other), "--sites", "A"), work / "prepare.log")
    return Context(work, cohort, certs, other)


# ----------------------------------------------------------------------------------- processes


def aldm(*args: str) -> list[str]:
    """The `aldm-fed` command line in this interpreter."""
    return [sys.executable, "-m", "aldm_fed.cli", *args]


def run_checked(command: list[str], log: Path) -> None:
    with open(log, "a") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        raise ScenarioError(f"`{' '.join(command)}` exited {code}; see {log}")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop(FAULT_ENV, None)
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """A started command, its log, and when it started."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def alive(self) -> bool:
        return self.process.poll() is None


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> int:
    """Send `sig` to `pid` and every descendant (a crash: nobody gets to clean up); returns how many."""
    from aldm_fed.federation.processes import descendants

    pids = [pid, *(p for p, _ in descendants(pid))]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
    return len(pids)


class Fleet:
    """The processes of one scenario; `close()` stops every one of them and their descendants."""

    def __init__(self, ctx: Context, name: str, deadline_s: float) -> None:
        self.ctx = ctx
        self.dir = ctx.work / name
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.port = _free_port()
        self.deadline = time.monotonic() + deadline_s
        self.procs: list[Proc] = []
        self.state = self.dir / "server" / "federation"  # cfg.fed.state under paths.runs

    # -- starting

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(command)}\n".encode())
            out.flush()
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
                env=child_env(env), start_new_session=True,
            )
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    def server_command(self, overrides: Sequence[str], *, fault_app: bool = False, sites: str = "A,B") -> list[str]:
        args = ["server", "--certs", str(self.ctx.certs), "--port", str(self.port), *BASE, *overrides,
                f"fed.sites=[{sites}]", f"paths.runs={self.dir / 'server'}"]
        if not fault_app:
            return aldm(*args)
        app = self.dir / "fault-app"
        stage_fault_app(app)
        return [sys.executable, str(Path(__file__).resolve()), "--serve-app", str(app), *args]

    def start_server(self, overrides: Sequence[str], *, fault_app: bool = False, sites: str = "A,B") -> Proc:
        proc = self.start("server", self.server_command(overrides, fault_app=fault_app, sites=sites))
        self.wait(lambda: "registered" in proc.text() and "each site joins" in proc.text(),
                  90, "the server registering the sites", watch=[proc])
        return proc

    def client_command(self, site: str, *tls: str, join_wait: float | None = None, data: Path | None = None) -> list[str]:
        tls = tls or ("--certs", str(self.ctx.certs))
        args = ["client", "--site", site, "--data", str(data or self.ctx.cohort), "--server", f"127.0.0.1:{self.port}",
                *tls, "--state", str(self.dir / "sites" / site), "--max-wait", str(SITE_MAX_WAIT_S)]
        if join_wait is not None:
            args += ["--join-wait", str(join_wait)]
        return aldm(*args)

    def start_client(self, site: str, *tls: str, name: str | None = None, fault: str | None = None,
                     join_wait: float | None = None, data: Path | None = None) -> Proc:
        env = {FAULT_ENV: fault} if fault else None
        command = self.client_command(site, *tls, join_wait=join_wait, data=data)
        return self.start(name or f"site-{site}", command, env)

    # -- observing

    def wait(self, done: Callable[[], Any], timeout: float, what: str, *, watch: Sequence[Proc] = (),
             poll_s: float = 0.5) -> float:
        """Poll `done` until truthy; returns the seconds waited.

        Raises:
            ScenarioError: `timeout` (or the scenario's deadline) passed, or a watched process exited.
        """
        t0 = time.monotonic()
        end = min(t0 + timeout, self.deadline)
        while True:
            if done():
                return time.monotonic() - t0
            for proc in watch:
                if not proc.alive():
                    raise ScenarioError(f"{proc.name} exited ({proc.process.returncode}) before {what}; "
                                        f"its log ends:\n{_tail(proc.text())}")
            if time.monotonic() > end:
                raise ScenarioError(f"no {what} within {timeout:.0f} s")
            time.sleep(poll_s)

    def wait_exit(self, proc: Proc, timeout: float) -> int:
        self.wait(lambda: not proc.alive(), timeout, f"exit of {proc.name}", poll_s=0.3)
        return int(proc.process.returncode)

    def rounds(self) -> list[dict[str, Any]]:
        path = self.state / "rounds.jsonl"
        out = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def round_sites(self, phase: str, rnd: int) -> list[str] | None:
        found = [r["sites"] for r in self.rounds() if r.get("phase") == phase and r.get("round") == rnd]
        return found[-1] if found else None

    def status(self) -> dict[str, Any]:
        path = self.state / "status.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    # -- stopping

    def close(self) -> None:
        from aldm_fed.federation.processes import stop_group

        for proc in reversed(self.procs):
            if proc.alive():
                stop_group(proc.process, timeout=20)
            else:  # its Flower children may have outlived it (that is a finding, but stop them)
                kill_tree(proc.process.pid, signal.SIGTERM)

    def leftovers(self) -> list[str]:
        """Flower processes still running that belong to this scenario (by their folder)."""
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(self.dir) in cmd or f":{self.port}" in cmd:
                    found.append(f"{entry.name}: {cmd[:120]}")
        return found


def stage_fault_app(dest: Path) -> Path:
    """The app source (server/, client/) whose ClientApp carries the fault mod."""
    from aldm_fed.federation.app_bundle import app_source_dir

    source = app_source_dir()
    (dest / "server").mkdir(parents=True, exist_ok=True)
    (dest / "client").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "server" / "app.py", dest / "server" / "app.py")
    (dest / "client" / "app.py").write_text(FAULT_CLIENT_APP)
    return dest


def serve_with_app(app: str, argv: list[str]) -> None:
    """`aldm-fed server ...` that stages the app in `app` instead of the checkout's."""
    from aldm_fed import cli
    from aldm_fed.federation import app_bundle

    app_bundle.app_source_dir = lambda: Path(app)  # what `stage_app` bundles; nothing else changes
    cli.main(argv)


# ------------------------------------------------------------------------------- data checks


def checkpoint_problems(folder: Path) -> tuple[int, list[str]]:
    """(checkpoints verified, problems) for every round/final checkpoint below `folder`: each must
    load with its sha256 verified and hold only finite tensors; no temporary file may be left."""
    from aldm_fed.checkpoints import load_checkpoint

    problems, ok = [], 0
    for meta in sorted(folder.rglob("meta.json")) if folder.is_dir() else []:
        if not (meta.parent / "tensors.safetensors").exists() and not any(meta.parent.glob("*.safetensors")):
            continue
        try:
            ckpt = load_checkpoint(meta.parent)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding to report
            problems.append(f"{meta.parent.relative_to(folder)}: {exc}")
            continue
        bad = [f"{g}.{k}" for g, ts in ckpt.tensors.items() for k, t in ts.items()
               if t.is_floating_point() and not bool(t.isfinite().all())]
        if bad:
            problems.append(f"{meta.parent.relative_to(folder)}: non-finite {bad[:3]}")
        ok += 1
    problems += [f"half-written: {p.relative_to(folder)}" for p in temp_files(folder)]
    return ok, problems


def temp_files(folder: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes (`aldm_fed.io`: `.NAME.*.tmp*`, `*.tmp` folders)."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name] if folder.is_dir() else []


def rounds_problems(rounds: list[dict[str, Any]]) -> list[str]:
    """Rounds logged twice or skipped, per phase."""
    problems = []
    for phase in sorted({r["phase"] for r in rounds}):
        numbers = [int(r["round"]) for r in rounds if r["phase"] == phase]
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{phase} rounds logged as {numbers}")
    return problems


def lost(problems: Sequence[str], verified: int | None = None) -> str:
    if problems:
        return "; ".join(problems)[:400]
    return "none" + (f" ({verified} checkpoints verified by sha256, all finite)" if verified else "")


def synthesis_cases(folder: Path) -> dict[str, str]:
    """Complete synthetic case folders -> sha256 of their files (a case is complete when it exists)."""
    import hashlib

    out = {}
    for case in sorted(p for p in folder.glob("*") if p.is_dir() and ".tmp" not in p.name):
        digest = hashlib.sha256()
        for file in sorted(case.iterdir()):
            digest.update(file.name.encode() + file.read_bytes())
        out[case.name] = digest.hexdigest()
    return out


def _free_port() -> int:
    from aldm_fed.federation.processes import free_port

    return free_port()


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.splitlines()[-n:])


def _grep(text: str, pattern: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if re.search(pattern, ln)]


def _short(line: str, n: int = 160) -> str:
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
    return line if len(line) <= n else line[: n - 3] + "..."


# ---------------------------------------------------------------------------------- scenarios
# Each takes the shared context and the scenario's Fleet and returns its rows; `run_scenario`
# times it, enforces the deadline and stops every process.


def scenario_security(ctx: Context, fleet: Fleet) -> list[Row]:
    """An unregistered site key, a plaintext client and a client trusting another CA are refused."""
    fleet.start_server(["fed.phases.vae.rounds=1"])
    # Site A's own key and signing.pub, but the ca.crt of another federation.
    trust = fleet.dir / "other-trust"
    (trust / "sites").mkdir(parents=True)
    shutil.copyfile(ctx.other_ca / "ca.crt", trust / "ca.crt")
    shutil.copyfile(ctx.certs / "sites" / "A.key", trust / "sites" / "A.key")
    with contextlib.suppress(FileNotFoundError):  # the model-signing key, where certs make one
        shutil.copyfile(ctx.certs / "signing.pub", trust / "signing.pub")
    cases = [
        ("site key not registered (site C; the server registered A and B)", "unregistered", "C",
         ("--certs", str(ctx.certs))),
        ("plaintext client (--insecure) against the TLS server", "plaintext", "A", ("--insecure",)),
        ("client trusting another CA (site A's key, another federation's ca.crt)", "other-ca", "A",
         ("--certs", str(trust))),
    ]
    procs = {name: fleet.start_client(site, *tls, name=name, join_wait=0) for _, name, site, tls in cases}
    ended: dict[str, float] = {}

    def all_ended() -> bool:
        for name, proc in procs.items():
            if name not in ended and not proc.alive():
                ended[name] = time.monotonic() - proc.started
        return len(ended) == len(procs)

    with contextlib.suppress(ScenarioError):
        fleet.wait(all_ended, 90, "exit of every refused client", poll_s=0.2)
    rows = []
    for fault, name, site, _ in cases:
        proc = procs[name]
        code = proc.process.returncode if name in ended else None
        reason = _grep(proc.text(), r"(?i)error|fail|refus|denied|certificate|does not|speaks TLS")
        apps = fleet.dir / "sites" / site / "flwr" / "apps"
        delivered = apps.is_dir() and any(apps.iterdir())
        if code is None:
            observed = f"still running after {time.monotonic() - proc.started:.0f} s (the SuperNode keeps retrying)"
        else:
            observed = f"client exited {code} after {ended[name]:.0f} s" + (f": {_short(reason[-1], 200)}" if reason else "")
        rows.append(Row(
            fault=fault, expected="refused: the client stops with an error, no app code reaches it",
            observed=observed, data_lost="none (app delivered to it: " + ("YES" if delivered else "no") + ")",
            ok=code not in (None, 0) and not delivered,
        ))
    return rows


def scenario_mismatch(ctx: Context, fleet: Fleet) -> list[Row]:
    """A site that speaks another protocol version is refused at the roll call, with a clear error."""
    server = fleet.start_server(["fed.phases.vae.rounds=1"], fault_app=True)
    fleet.start_client("A")
    fleet.start_client("B", fault="hello=protocol")
    code = fleet.wait_exit(server, 300)
    status = fleet.status()
    error = str(status.get("error", ""))
    rounds = fleet.state / "rounds"
    clear = "protocol" in error and "B" in error
    return [Row(
        fault="site B speaks another protocol version (hello reply: protocol+1)",
        expected="the server stops at the roll call with an error naming the site and both versions",
        observed=f"server exited {code} in {time.monotonic() - server.started:.0f} s; status "
                 f"{status.get('status')} at {status.get('phase')}: {_short(error, 220)}",
        data_lost="none (no round ran: " + ("rounds/ exists" if rounds.exists() else "no rounds/") + ")",
        ok=code != 0 and status.get("status") == "failed" and clear and not rounds.exists(),
    )]


CORRUPTIONS = {1: ("nan", "NaN in one tensor"), 2: ("shape", "a tensor with a wrong shape"),
               3: ("norm", "every tensor x100 (norm far outside the others')")}


def scenario_corrupt(ctx: Context, fleet: Fleet) -> list[Row]:
    """Site B's VAE update is corrupted in each round (NaN, wrong shape, x100 norm); A and C are sound."""
    n = len(CORRUPTIONS)
    plan = ",".join(f"vae:{r}={kind}" for r, (kind, _) in CORRUPTIONS.items())
    # Three sites with source cases: a norm outlier can only be told apart among 3 or more updates.
    cohort = ctx.work / "cohort-3src"
    if not (cohort / "manifests" / "C.json").is_file():
        run_checked(aldm("data", "phantom", "--out", str(cohort), "experiment=tiny", "phantom.sites.C.n_source=2"),
                    ctx.work / "prepare.log")
    server = fleet.start_server([f"fed.phases.vae.rounds={n}"], fault_app=True, sites="A,B,C")
    fleet.start_client("A", data=cohort)
    fleet.start_client("B", fault=plan, data=cohort)
    fleet.start_client("C", data=cohort)
    fleet.wait(lambda: fleet.round_sites("vae", n) is not None or not server.alive(), 900,
               f"VAE round {n}")
    # rounds.jsonl is on disk before the streamed run log shows the round's lines: wait for them.
    with contextlib.suppress(ScenarioError):
        fleet.wait(lambda: f"[vae] round {n}:" in server.text(), 60, f"the log of VAE round {n}")
    log = server.text()
    verified, problems = checkpoint_problems(fleet.state / "rounds")
    rows = []
    for rnd, (_, what) in CORRUPTIONS.items():
        sites = fleet.round_sites("vae", rnd)
        named = _grep(log, rf"vae round {rnd}: rejected the update of site B")
        observed = (f"round {rnd} averaged {sites}" if sites is not None else f"round {rnd} not completed") + (
            f"; log: {_short(named[0].split('rejected', 1)[-1], 170)}" if named else "; no rejection in the log")
        if not server.alive() and sites is None:
            observed += f"; server exited {server.process.returncode}: {_short(fleet.status().get('error', ''), 160)}"
        rows.append(Row(
            fault=f"site B sends {what} (VAE round {rnd})",
            expected="B's update rejected and B named in the log; the round averages A and C",
            observed=observed, data_lost=lost(problems, verified),
            ok=sites == ["A", "C"] and bool(named) and not problems,
        ))
    return rows


def _wait_training(fleet: Fleet, site: str, phase: str, rnd: int, watch: Sequence[Proc]) -> None:
    # The site's local run of the round exists once its ClientApp started training it.
    folder = fleet.dir / "sites" / site / "federation" / phase
    fleet.wait(lambda: any(folder.glob(f"round_{rnd:04d}-*")), 300, f"site {site} training {phase} round {rnd}",
               watch=watch, poll_s=0.2)


def scenario_site_killed(ctx: Context, fleet: Fleet) -> list[Row]:
    """Site B is SIGKILLed (whole process tree) mid-round and restarted at once."""
    server = fleet.start_server(["fed.phases.vae.rounds=4", "fed.min_replies=1"])
    fleet.start_client("A")
    b = fleet.start_client("B")
    _wait_training(fleet, "B", "vae", 1, [server])
    killed = kill_tree(b.process.pid)
    t_kill = time.monotonic()
    time.sleep(5)  # a supervisor restarting the site
    fleet.start_client("B", name="site-B")
    fleet.wait(lambda: fleet.round_sites("vae", 1) is not None, 400, "VAE round 1", watch=[server])
    after_kill = time.monotonic() - t_kill
    fleet.wait(lambda: fleet.round_sites("vae", 4) is not None, 600, "VAE round 4", watch=[server])
    rounds = {r: fleet.round_sites("vae", r) for r in (1, 2, 3, 4)}
    back = next((r for r in (2, 3, 4) if rounds[r] == ["A", "B"]), None)
    failed = _grep(server.text(), r"vae round 1: site B failed")
    verified, problems = checkpoint_problems(fleet.state / "rounds")
    problems += rounds_problems(fleet.rounds())
    return [Row(
        fault=f"site B SIGKILLed mid-round (VAE round 1, {killed} processes), restarted 5 s later",
        expected="round 1 finishes with A (fed.min_replies=1) without waiting out fed.round_timeout_s; "
                 "restarted B rejoins a later round (Flower admits its SuperNode again once the old "
                 "session's heartbeat has expired, ~1 min)",
        observed=f"round 1 averaged {rounds[1]} {after_kill:.0f} s after the kill (round timeout 180 s)"
                 + (f" [{_short(failed[0].split('failed:', 1)[-1], 90)}]" if failed else "")
                 + "; " + ", ".join(f"round {r} {rounds[r]}" for r in (2, 3, 4)),
        data_lost=lost(problems, verified),
        ok=rounds[1] == ["A"] and back is not None and after_kill < 170 and not problems,
    )]


def scenario_too_few(ctx: Context, fleet: Fleet) -> list[Row]:
    """Site B is killed mid-round and stays down while fed.min_replies=2: the run must stop clearly."""
    server = fleet.start_server(["fed.phases.vae.rounds=1", "fed.min_replies=2"])
    fleet.start_client("A")
    b = fleet.start_client("B")
    _wait_training(fleet, "B", "vae", 1, [server])
    kill_tree(b.process.pid)
    t_kill = time.monotonic()
    code = fleet.wait_exit(server, 400)
    status = fleet.status()
    error = str(status.get("error", ""))
    verified, problems = checkpoint_problems(fleet.state)
    return [Row(
        fault="site B SIGKILLed mid-round and not restarted, fed.min_replies=2",
        expected="the server stops with an error naming the missing site and min_replies (no endless wait)",
        observed=f"server exited {code} {time.monotonic() - t_kill:.0f} s after the kill; status "
                 f"{status.get('status')}: {_short(error, 200)}",
        data_lost=lost(problems, verified),
        ok=code != 0 and status.get("status") == "failed" and "min_replies" in error and "B" in error
        and not problems,
    )]


def scenario_server_killed(ctx: Context, fleet: Fleet) -> list[Row]:
    """`kill -9` of the `aldm-fed server` process after VAE round 1, then the same command again."""
    overrides = ["fed.phases.vae.rounds=3"]
    server = fleet.start_server(overrides)
    fleet.start_client("A")
    fleet.start_client("B")
    fleet.wait(lambda: (fleet.state / "rounds" / "vae" / "round_0001" / "meta.json").is_file(), 400,
               "VAE round 1 checkpoint", watch=[server], poll_s=0.2)
    os.kill(server.process.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    status_at_kill = fleet.status().get("status")
    # Its SuperLink must follow it (parent-death signal), else the same command finds the port taken.
    try:
        freed = fleet.wait(lambda: not _port_open(fleet.port), 60, "the port to be freed")
        port_note = f"port freed {freed:.0f} s after the kill"
    except ScenarioError:
        port_note = "port STILL TAKEN 60 s after the kill (orphaned SuperLink)"
    again = fleet.start("server", fleet.server_command(overrides))
    fleet.wait(lambda: fleet.round_sites("vae", 3) is not None, 600, "VAE round 3", watch=[again])
    resumed = _grep(again.text(), r"\[vae\] resuming after round \d+")
    rounds = [(r["phase"], r["round"]) for r in fleet.rounds()]
    verified, problems = checkpoint_problems(fleet.state / "rounds")
    problems += rounds_problems(fleet.rounds())
    return [Row(
        fault="server SIGKILLed (kill -9 of `aldm-fed server`) after VAE round 1, same command again",
        expected="the restarted server resumes after the last completed round; no round lost or run "
                 "twice; no checkpoint half-written",
        observed=f"status at the kill: {status_at_kill}; {port_note}; restart: "
                 + (_short(resumed[0].split("]", 1)[-1] if "]" in resumed[0] else resumed[0], 80)
                    if resumed else "no resume line")
                 + f"; rounds logged {[r for _, r in rounds]} in {time.monotonic() - t_kill:.0f} s after the kill",
        data_lost=lost(problems, verified),
        ok=bool(resumed) and "STILL" not in port_note and not problems,
    )]


SYNTH = ["fed.phases.local.synthesize=true", "synthesis.num_samples=6", "synthesis.batch_size=1",
         "synthesis.num_steps=10", "fed.phases.vae.rounds=1"]


def scenario_local_killed(ctx: Context, fleet: Fleet) -> list[Row]:
    """Site A is SIGKILLed while synthesizing in the local phase, restarted, and the run redone."""
    server = fleet.start_server(SYNTH)
    fleet.start_client("A")
    b = fleet.start_client("B")
    out = fleet.dir / "sites" / "A" / "sites" / "A" / "synthesis"
    a_proc = next(p for p in fleet.procs if p.name == "site-A")
    # synthesis.json is written before the first volume too: count the complete case folders.
    fleet.wait(lambda: 2 <= len(synthesis_cases(out)) < 6, 900,
               "site A synthesizing (2 cases written)", watch=[server, a_proc], poll_s=0.1)
    kill_tree(a_proc.process.pid)
    t_kill = time.monotonic()
    before = synthesis_cases(out)
    time.sleep(5)
    fleet.start_client("A", name="site-A")
    # The server sees A's message lost (Flower's heartbeat, ~60 s), waits until A answers a roll
    # call again (fed.rejoin_wait_s) and sends it the local phase again. Should A still end up
    # failed, the documented fallback is the same server command once more.
    code = fleet.wait_exit(server, 900)
    status = fleet.status()
    log_a = _grep(server.text(), r"\[local\] site A:")
    resent = bool(_grep(server.text(), r"sending the local phase again"))
    middle = synthesis_cases(out)
    a_ok = bool(log_a) and log_a[-1].rstrip().endswith("ok")
    first = (f"run 1: exit {code} {time.monotonic() - t_kill:.0f} s after the kill, local phase "
             f"{'sent again' if resent else 'NOT sent again'}, A "
             f"{_short(log_a[-1].split(':', 3)[-1].strip(), 50) if log_a else 'no line'} with "
             f"{len(middle)} of 6 volumes")
    runs = 1
    if not a_ok:
        if not b.alive():
            fleet.start_client("B", name="site-B")
        again = fleet.start("server", fleet.server_command(SYNTH))
        code = fleet.wait_exit(again, 600)
        status = fleet.status()
        log_a = _grep(again.text(), r"\[local\] site A:")
        a_ok = bool(log_a) and log_a[-1].rstrip().endswith("ok")
        runs = 2
    after = synthesis_cases(out)
    manifest = json.loads((out / "synthesis.json").read_text()) if (out / "synthesis.json").is_file() else {}
    ids = [s.get("synth_id", s.get("id")) for s in manifest.get("samples", [])]
    problems = [f"case {k} changed or vanished" for k, h in list(before.items()) + list(middle.items())
                if after.get(k) != h]
    if len(ids) != len(set(ids)):
        problems.append(f"duplicate ids in synthesis.json: {ids}")
    if len(after) != 6:
        problems.append(f"{len(after)} case folders, 6 expected")
    problems += [f"half-written: {p.name}" for p in temp_files(out)]
    return [Row(
        fault=f"site A SIGKILLed while synthesizing ({len(before)} of 6 volumes written), restarted after 5 s",
        expected="the server sends A the local phase again once it is back; A resumes: the volumes already "
                 "made are kept, the rest made once; no volume lost or duplicated",
        observed=first + (f"; run 2 (the same server command): exit {code}, A "
                          f"{'ok' if a_ok else 'not ok'}" if runs == 2 else "")
                 + f"; status {status.get('status')}; A has {len(after)} volumes, the "
                   f"{len(before)} from before the kill unchanged: {all(after.get(k) == h for k, h in before.items())}",
        data_lost=lost(problems),
        ok=code == 0 and status.get("status") == "done" and a_ok and not problems,
    )]


def _port_open(port: int) -> bool:
    from aldm_fed.federation.processes import tcp_reachable

    return tcp_reachable(f"127.0.0.1:{port}", timeout=1.0)


SCENARIOS: dict[str, tuple[Callable[[Context, Fleet], list[Row]], float]] = {
    # name: (function, hard deadline in seconds)
    "security": (scenario_security, 240),
    "mismatch": (scenario_mismatch, 420),
    "corrupt": (scenario_corrupt, 1200),
    "site-killed": (scenario_site_killed, 1200),
    "too-few": (scenario_too_few, 720),
    "server-killed": (scenario_server_killed, 1200),
    "local-killed": (scenario_local_killed, 1800),
}


def run_scenario(ctx: Context, name: str) -> list[Row]:
    """Run one scenario with its deadline; every process it started is stopped afterwards."""
    function, deadline = SCENARIOS[name]
    fleet = Fleet(ctx, name, deadline)
    t0 = time.monotonic()
    try:
        rows = function(ctx, fleet)
    except Exception as exc:  # noqa: BLE001 - a failed scenario is a row, the others still run
        rows = [Row(fault=f"{name}: {(function.__doc__ or '').strip()}", expected="(see the scenario)",
                    observed=f"scenario failed: {type(exc).__name__}: {_short(str(exc), 600)}",
                    data_lost="unknown")]
    finally:
        fleet.close()
    seconds = round(time.monotonic() - t0, 1)
    left = fleet.leftovers()
    for row in rows:
        row.seconds, row.scenario = seconds, name
        if left:
            row.observed += f"; {len(left)} process(es) outlived the cleanup"
            row.ok = False
    for pid_cmd in left:  # never leave them running
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_cmd.split(":", 1)[0]), signal.SIGKILL)
    return rows


def table(rows: Sequence[Row]) -> str:
    """The markdown table."""
    lines = ["| fault | expected | observed | data lost | s | ok |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.fault, r.expected, r.observed, r.data_lost, f"{r.seconds:.0f}", "yes" if r.ok else "NO"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-app"]:
        serve_with_app(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--out", type=Path, default=Path("faults-out"), help="where faults.json goes")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder (default: a temporary one; cohort and certs are reused from it)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, states)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (function, deadline) in SCENARIOS.items():
            print(f"{name:14s} {(function.__doc__ or '').strip()} (deadline {deadline:.0f} s)")
        return 0
    from aldm_fed.io import atomic_write_json

    work = args.work or Path(tempfile.mkdtemp(prefix="aldm-fed-faults-"))
    rows: list[Row] = []
    try:
        ctx = prepare(work.resolve())
        for name in args.only or list(SCENARIOS):
            print(f"--- {name} ...", flush=True)
            new = run_scenario(ctx, name)
            for row in new:
                print(f"    {'ok ' if row.ok else 'NO '} {row.fault}: {row.observed}", flush=True)
            rows += new
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        elif rows:
            print(f"logs and states: {work}")
    print()
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "faults.json", {"rows": [asdict(r) for r in rows],
                                                 "all_ok": all(r.ok for r in rows)})
    print(f"\nwritten: {args.out / 'faults.json'}")
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
