"""Run a federation on Flower's Deployment Engine: stage the app, start the processes, follow the run.

`aldm-fed server` and `aldm-fed client` call `run_server` and `run_client`; tests and local
multi-site runs use the pieces, each in the module of its concept:

    app_bundle    the app folder that `flwr run` bundles: the app's code and its run config
    superlink     `flower-superlink` and the `flwr` CLI: register the sites, submit and follow runs
    supernode     a site's `flower-supernode`
    processes     what both share: the Flower environment, process groups, ports

The server stages the app, starts the SuperLink, registers the sites' public keys and runs the
app until it finishes; each site runs its SuperNode until the server goes away. The SuperLink's
Control API has no user authentication, hence it listens on loopback unless told otherwise (see
`superlink`).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig

from aldm_fed.federation.app_bundle import stage_app
from aldm_fed.federation.processes import (
    LOOPBACK,
    check_files,
    host_port,
    tcp_reachable,
    tls_mismatch,
)
from aldm_fed.federation.superlink import (
    DEFAULT_PORT,
    RunStatus,
    ServerTls,
    SuperLink,
    register_supernodes,
    run_app,
    start_superlink,
)
from aldm_fed.federation.supernode import SuperNode, start_supernode

__all__ = ["client_command", "run_client", "run_server", "signing_pub_file", "site_files"]

_RETRY_S = 5.0  # `aldm-fed client`: pause before restarting a SuperNode that could not join
_EARLY_EXIT_S = 60.0  # a SuperNode exiting sooner than this after its start did not join


def client_command(site: str, server: str, *, insecure: bool = False) -> str:
    """The `aldm-fed client` command line a site runs to join; COHORT_DIR stands for its data."""
    args = ["aldm-fed", "client", "--site", site, "--data", "COHORT_DIR", "--server", server]
    tls = ["--ca", "ca.crt", "--key", f"{site}.key", "--signing-pub", "signing.pub"]
    args += ["--insecure"] if insecure else tls
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
        certs: the folder made by `aldm-fed certs` (ca.crt, server.crt, server.key, sites/*.pub,
            signing.key/.pub: the global models are signed with signing.key); required unless
            `insecure`. Without it the run signs with a key pair of its own in
            `<fed.state>/signing/`, whose signing.pub sites must be given to verify.
        host: the address the SuperLink listens on (see `superlink`'s note on the Control API).
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
    from aldm_fed.federation.signing import ensure_signing_pair, install_signing_pair

    cfg = absolute_paths(cfg)
    state = Path(str(cfg.fed.state))
    sites = [str(s) for s in cfg.fed.sites] if cfg.fed.get("sites") else None
    tls, public_keys = None, {}
    if insecure:
        echo(
            "WARNING: --insecure: traffic is NOT encrypted and ANY SuperNode may join (no node"
            " authentication). Use only on a closed test network."
        )
        _, pub = ensure_signing_pair(state)
        echo(
            "WARNING: --insecure: the global models are signed with a key of this run only; sites"
            f" verify them only when started with --signing-pub {pub} (a copy of it)"
        )
    else:
        if certs is None:
            raise ValueError(
                "TLS needs the certificates: pass --certs DIR (make them with `aldm-fed certs --out"
                " DIR --sites A B ...`), or --insecure for a closed test network"
            )
        cert_set = load_certificate_set(certs, sites)
        tls = ServerTls(cert_set.ca_cert, cert_set.server_cert, cert_set.server_key)
        # The ServerApp (another process) signs with the pair in fed.state (signing.server_signer).
        install_signing_pair(cert_set.signing_key, cert_set.signing_pub, state)
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
        echo(f"SuperLink listening on {host_port(host, port)} (log: {link.log_path})")
        for site, node_id in register_supernodes(link, public_keys).items():
            state_text = "registered" if node_id is not None else "already registered"
            echo(f"site {site}: key {public_keys[site]} {state_text}")
        server = host_port(_advertised_host(host, tls, echo), port)
        files = "" if insecure else "; give site S the files ca.crt, signing.pub and sites/S.key"
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
    if host in LOOPBACK:
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
    signing_pub: str | os.PathLike[str] | None = None,
    port: int | None = None,
    max_wait_s: float = 120.0,
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
        signing_pub: the server's model-signing public key (signing.pub); the site refuses
            global weights it did not sign. Required with TLS; with `insecure` optional (without
            it the site loads unverified weights, with a warning).
        port: the SuperNode's local Runtime API port (default: a free one).
        max_wait_s: how long the SuperLink may be unreachable (also at the start) before stopping.
        join_wait_s: how long a SuperNode that stops before joining (e.g. the server has not
            registered this site's key yet) is restarted.
        echo: where messages go.

    Returns:
        0 when the server went away after the site had reached it, 1 if it was never reached,
        1 as well when its TLS setting does not match the server's (plaintext against TLS, another
        CA), else the exit code of the SuperNode where it stopped by itself (e.g. 1: key refused).

    Raises:
        FileNotFoundError: the data folder, its manifest, the CA, the key or signing.pub is missing.
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
    for path in (ca_cert, private_key):
        if path is not None:
            check_files(Path(path))
    if signing_pub is not None:
        from aldm_fed.federation.signing import Verifier  # imports torch: only when needed

        Verifier.from_file(signing_pub)  # fail here, not at the first global model
    elif not insecure:
        raise ValueError(
            "the site verifies the global models it receives: give the server's signing.pub"
            " (--signing-pub FILE, or --certs DIR holding it)"
        )
    else:
        echo(f"WARNING: site {site} has no --signing-pub: it will load global models WITHOUT verifying"
             " the server's signature")
    host, sep, port_text = server.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"--server {server!r}: expected HOST:PORT")
    def start() -> SuperNode:
        return start_supernode(
            server, site=site, data_path=data_path, state_path=state, ca_cert=ca_cert,
            private_key=private_key, insecure=insecure, signing_pub=signing_pub, port=port,
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
            if tcp_reachable(server):
                # Flower's SuperNode retries a TLS mismatch forever: check it once, say what it is.
                if not reached and (problem := tls_mismatch(server, None if insecure else ca_cert)):
                    echo(f"site {site}: {problem}; stopping")
                    node.stop()
                    return 1
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
    check_files(ca)
    for key in keys:
        if key.is_file():
            return ca, key
    raise FileNotFoundError(f"{keys[0]}: no SuperNode key for site {site!r} (nor {keys[1]})")


def signing_pub_file(certs: str | os.PathLike[str]) -> Path:
    """The server's model-signing public key in a certificates folder (`aldm-fed certs`' folder,
    or the copy a site received): `<certs>/signing.pub`.

    Raises:
        FileNotFoundError: it is missing (the message says what it is for).
    """
    path = Path(certs) / "signing.pub"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no signing.pub, the server's public key that global models are verified with;"
            " copy it from the server's certificates folder (or give --signing-pub FILE)"
        )
    return path
