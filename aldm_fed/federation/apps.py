"""The Flower apps, thin: the ServerApp calls `coordinator.run_federation`; the ClientApp routes
each message by its phase to a function of `site`, behind the allow-list mod.

The top-level `server/app.py` and `client/app.py` (what Flower loads from the app bundle in a
deployment) are `server_app()` and `client_app()`, reading the config from Flower's run config.
The simulation passes the composed config in directly.

Which site a ClientApp is: a deployed SuperNode says so in its node config (`site`, `data-path`,
`state-path`, set by `aldm-fed client`); a simulated one has only a partition id, which picks the
i-th of `fed.sites`, with the cohort at `paths.cohort` and its state in `<fed.state>/sites/<site>`.

Global weights are verified before a site function sees them (`signing.open_global`), with the
key `verifier_of` names: a deployed site's node config `signing-pub`, a simulated site's
`<fed.state>/signing/signing.pub`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from aldm_fed.config import unflatten_config
from aldm_fed.federation import site as site_fn
from aldm_fed.federation.secure import secure_aggregation_mod
from aldm_fed.federation.sharing import allow_list_mod, audit_mod
from aldm_fed.federation.signing import Verifier, open_global, signing_paths
from aldm_fed.log import configure_logging
from aldm_fed.training.device import configure_threads

__all__ = ["OUTGOING_LOG", "Mod", "client_app", "server_app", "site_mods", "site_of", "verifier_of"]

OUTGOING_LOG = "outgoing.jsonl"  # in the site's state folder: everything the site sent

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def server_app(cfg: Any | None = None) -> ServerApp:
    """The ServerApp: walks the phases with `coordinator.run_federation`.

    Args:
        cfg: the composed config; None = rebuild it from the run config (deployment).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from aldm_fed.federation.coordinator import run_federation

        configure_logging()  # the ServerApp runs in its own process (flwr-serverapp)
        run_federation(grid, cfg if cfg is not None else unflatten_config(context.run_config))

    return app


def site_of(cfg: Any, context: Context) -> site_fn.Site:
    """The site a ClientApp serves (see the module docstring).

    Raises:
        ValueError: a node config without a site, or a partition id beyond `fed.sites`.
    """
    node = context.node_config
    if "site" in node:
        missing = [k for k in ("data-path", "state-path") if k not in node]
        if missing:
            raise ValueError(f"node config of site {node['site']} lacks {missing}; start it with `aldm-fed client`")
        return site_fn.Site(str(node["site"]), Path(str(node["data-path"])), Path(str(node["state-path"])))
    if "partition-id" in node:
        sites = list(cfg.fed.sites or [])
        pid = int(node["partition-id"])
        if pid >= len(sites):
            raise ValueError(f"simulated node {pid} has no site: fed.sites={sites}")
        name = str(sites[pid])
        return site_fn.Site(name, Path(str(cfg.paths.cohort)), Path(str(cfg.fed.state)) / "sites" / name)
    raise ValueError(f"node config {dict(node)} names no site; start the SuperNode with `aldm-fed client --site X`")


def verifier_of(cfg: Any, context: Context) -> Verifier | None:
    """The server's public signing key a ClientApp verifies global weights with.

    A deployed site trusts only its own node config (`signing-pub`, set by `aldm-fed client`),
    never a path in the run config, which the server writes; None = it runs without a key
    (`--insecure`), and loads unverified weights with a warning. A simulated site uses
    `<fed.state>/signing/signing.pub`, which `simulate` makes.

    Raises:
        FileNotFoundError: the key file is missing.
        ValueError: it is not an OpenSSH Ed25519 public key.
    """
    node = context.node_config
    if "site" in node:
        return Verifier.from_file(str(node["signing-pub"])) if "signing-pub" in node else None
    return Verifier.from_file(signing_paths(str(cfg.fed.state))[1])


def _handle(cfg: Any, msg: Message, context: Context) -> Message:
    """Route one message to the site function of its phase."""
    configure_logging()  # a simulated site is a Ray actor: its loggers are ours to set up
    site = site_of(cfg, context)
    configure_threads(cfg.device.get("num_threads"))
    config = msg.content["config"]
    phase = str(config["phase"])

    def weights(groups: tuple[str, ...]) -> dict[str, Any]:
        # Verified before any of it reaches a network or the site's disk (signing.py).
        return open_global(msg.content, verifier_of(cfg, context), groups, site=site.name)

    if phase == "hello":
        content = site_fn.hello(site, cfg, config)  # also: can the site serve this run?
    elif phase == "vae":
        content = site_fn.vae_round(cfg, site, weights(("vae",)),
                                    int(config["round"]), int(config["local-steps"]))
    elif phase == "scale":
        content = site_fn.scale_statistics(cfg, site, weights(("vae",)),
                                           json.loads(str(config["meta"])))
    elif phase == "backbone":
        content = site_fn.backbone_round(
            cfg, site, weights(("unet", "controlnet")),
            int(config["round"]), int(config["local-steps"]),
            scale_factor=float(config["scale-factor"]), scale_sha256=str(config["scale-sha256"]),
        )
    elif phase == "local":
        content = site_fn.local_phase(cfg, site, weights(("vae", "unet", "controlnet")),
                                      json.loads(str(config["vae-meta"])), json.loads(str(config["meta"])))
    else:
        raise ValueError(f"unknown phase {phase!r} (server and site run different aldm-fed versions?)")
    return Message(content=content, reply_to=msg)


def site_mods(log_path: Callable[[Context], Path]) -> list[Mod]:
    """The mods every site's ClientApp runs, outermost first: the audit log of what left
    (`sharing.audit_mod`), the allow-list (`sharing.allow_list_mod`), and Flower's SecAgg+ for
    messages of that protocol (`secure.secure_aggregation_mod`). Audit and allow-list see each
    reply as it leaves: under secure aggregation, the masked update, never the plain one.

    Args:
        log_path: the site's `outgoing.jsonl` for a context.
    """
    return [audit_mod(log_path), allow_list_mod, secure_aggregation_mod]


def client_app(cfg: Any | None = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp of a site: every reply passes the allow-list (`sharing.allow_list_mod`), then
    goes into the site's audit log (`<state>/outgoing.jsonl`, `sharing.audit_mod`); `site_mods`.

    Args:
        cfg: the composed config; None = rebuild it from the run config (deployment).
        mods: extra mods, run outside both.
    """

    def config_of(context: Context) -> Any:
        return cfg if cfg is not None else unflatten_config(context.run_config)

    def log_path(context: Context) -> Path:
        return site_of(config_of(context), context).state / OUTGOING_LOG

    app = ClientApp(mods=[*mods, *site_mods(log_path)])

    def handler(msg: Message, context: Context) -> Message:
        return _handle(config_of(context), msg, context)

    app.train()(handler)
    app.query()(handler)
    app.evaluate()(handler)
    return app
