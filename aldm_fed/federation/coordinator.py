"""The server's walk through a federated run (what the ServerApp calls).

1. Roll call: wait for the expected sites, ask each who it is (`hello`: name, protocol, case
   counts); refuse duplicates, strangers, other protocol versions, sites whose code builds
   other network shapes and sites whose data lacks the run's modalities (`compatibility`).
2. VAE: FedAvg rounds over the sites with source cases (`PhaseFedAvg`).
3. Scale: every site installs the global VAE; the source sites send the count, sum and sum of
   squares of their latents; the server pools them into the one scale factor.
4. Backbone: FedAvg rounds of UNet + source ControlNet over the source sites.
5. Local: every site gets the global models, adapts its own ControlNet, synthesizes, trains and
   tests its classifiers, and sends back metrics only; the server writes the report.

Each phase resumes: a phase with a `final/` is skipped, a FedAvg phase continues after its last
round checkpoint (`global_models.ServerState`). `status.json` in `fed.state` says where the run is
(`running` with the phase, `done` with the report, or `failed` with the error), for the launcher
and for people. Every message that carries global weights (vae, scale, backbone, local) is
signed with the server's Ed25519 key (`signing.server_signer`); sites refuse what does not verify.

Transfer dtype: the FedAvg rounds send the global weights in `fed.transfer_dtype` and sites reply
in it (`records`); the scale and local phases always send float32, because a site installs those
weights as the global `final/` and checks them bit for bit against the server's sha256. Each round's
cost (wall time, overhead beyond the sites' compute, weight bytes per site) goes into
`rounds.jsonl` ("cost"), its per-phase summary into `status.json` and the report ("federation_cost").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from aldm_fed import __version__
from aldm_fed.checkpoints import Checkpoint, load_checkpoint, plain_config
from aldm_fed.data.volumes import site_manifests
from aldm_fed.federation.aggregation import RobustSettings
from aldm_fed.federation.compatibility import encode_shapes, model_shapes, shapes_fingerprint
from aldm_fed.federation.global_models import ServerState, backbone_meta, initial_weights, vae_meta
from aldm_fed.federation.privacy import CentralDP, PrivacySettings, releases_before, run_privacy
from aldm_fed.federation.records import from_array_record, to_array_record, transfer_dtype
from aldm_fed.federation.secure import SecureFedAvg
from aldm_fed.federation.sharing import PROTOCOL, SharingError, check_reply
from aldm_fed.federation.signing import Signer, server_signer, sign_content
from aldm_fed.federation.strategy import FederationError, PhaseFedAvg, TrafficMeter, replies_by_node
from aldm_fed.io import atomic_write_json
from aldm_fed.training.artifacts import checkpoint_identity, write_final
from aldm_fed.training.scale import LatentStats, scale_factor_from_stats

__all__ = ["STATUS_FILE", "SiteInfo", "cost_summary", "expected_sites", "run_federation"]

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


@dataclass(frozen=True)
class SiteInfo:
    """A site as it introduced itself (case counts only)."""

    node_id: int
    name: str
    n_source: int
    n_target: int
    n_test: int


def expected_sites(cfg: Any) -> list[str]:
    """The federation's sites: `fed.sites`, else every site with a manifest in `paths.cohort`.

    Raises:
        ValueError: neither is available (a server without the cohort must list `fed.sites`).
    """
    if cfg.fed.get("sites"):
        return [str(s) for s in cfg.fed.sites]
    try:
        return list(site_manifests(str(cfg.paths.cohort)))
    except FileNotFoundError:
        raise ValueError(
            f"which sites take part? set fed.sites=[A,B,...] (no manifests in {cfg.paths.cohort} to read them from)"
        ) from None


def run_federation(grid: Grid, cfg: Any) -> dict[str, Any]:
    """Run (or resume) the whole federated pipeline; return the final status.

    Args:
        grid: Flower's grid (deployment or simulation).
        cfg: the composed config, paths absolute.

    Raises:
        FederationError: missing sites, too few valid updates, a site that failed the local phase
            when none succeeded.
    """
    state = ServerState(cfg)
    state.root.mkdir(parents=True, exist_ok=True)
    signer = server_signer(state.root)  # signs every message that carries global weights
    status: dict[str, Any] = {"status": "running", "version": __version__, "started": _now()}
    t0 = time.monotonic()

    def mark(**fields: Any) -> None:
        status.update(fields)
        atomic_write_json(state.root / STATUS_FILE, status)

    try:
        _check_transfer(cfg)  # refuse bad fed.privacy / fed.transfer_dtype options before waiting for sites
        mark(phase="hello")
        sites = _roll_call(grid, cfg)
        source = {n: s.name for n, s in sites.items() if s.n_source > 0}
        if not source:
            raise FederationError(f"no connected site holds source cases ({[s.name for s in sites.values()]})")
        mark(phase="vae", sites=sorted(s.name for s in sites.values()), privacy=run_privacy(cfg, len(source)))
        examples = {n: s.n_source for n, s in sites.items()}  # SecAgg+ weighs sites by their source cases
        vae_ckpt = _fedavg_phase(grid, cfg, state, "vae", source, extra={}, signer=signer, examples=examples)
        mark(phase="scale", cost=cost_summary(state.rounds()))
        scale_ckpt = _scale_phase(grid, cfg, state, sites, vae_ckpt, signer)
        mark(phase="backbone")
        bb_ckpt = _fedavg_phase(
            grid, cfg, state, "backbone", source,
            extra={"scale-factor": float(scale_ckpt.meta["scale_factor"]),
                   "scale-sha256": checkpoint_identity(scale_ckpt)["sha256"]},
            vae_ckpt=vae_ckpt, scale_ckpt=scale_ckpt, signer=signer, examples=examples,
        )
        mark(phase="local", cost=cost_summary(state.rounds()))
        results = _local_phase(grid, cfg, state, sites, vae_ckpt, bb_ckpt, signer)
        report = _report(cfg, state, sites, results, time.monotonic() - t0)
        mark(status="done", phase="done", finished=_now(), report=str(report),
             seconds=round(time.monotonic() - t0, 1))
    except Exception as exc:
        mark(status="failed", error=f"{type(exc).__name__}: {exc}", finished=_now())
        raise
    log.info("federated run done in %.0f s; report: %s", time.monotonic() - t0, status["report"])
    return status


def _check_transfer(cfg: Any) -> None:
    """`fed.transfer_dtype` and `fed.privacy` together (central DP clips the replies as NumPy
    arrays, and NumPy has no bfloat16)."""
    dp = PrivacySettings.from_config(cfg).dp
    dtype = transfer_dtype(cfg)
    if dp.enabled and dtype == "bfloat16":
        raise ValueError("fed.transfer_dtype=bfloat16 cannot be combined with fed.privacy.dp.enabled=true "
                         "(central DP clips the replies as NumPy arrays, which have no bfloat16); "
                         "use fed.transfer_dtype=float16 or float32")


def cost_summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per FedAvg phase, the mean cost of its logged rounds (`rounds.jsonl` lines with "cost").

    Args:
        rounds: the logged rounds (`ServerState.rounds`).

    Returns:
        phase -> rounds, transfer_dtype, params_bytes_fp32, and the means over rounds of wall_s,
        max_compute_s, overhead_s, overhead_fraction, and of bytes_sent / bytes_received per site.
    """
    out: dict[str, dict[str, Any]] = {}
    for phase in dict.fromkeys(r["phase"] for r in rounds if isinstance(r.get("cost"), dict)):
        costs = [r["cost"] for r in rounds if r["phase"] == phase and isinstance(r.get("cost"), dict)]

        def mean(values: list[Any]) -> float | None:
            values = [float(v) for v in values if isinstance(v, int | float)]
            return round(sum(values) / len(values), 4) if values else None

        per_site = [s for c in costs for s in c.get("sites", {}).values()]
        out[phase] = {
            "rounds": len(costs),
            "transfer_dtype": costs[-1].get("transfer_dtype"),
            "params_bytes_fp32": costs[-1].get("params_bytes_fp32"),
            **{key: mean([c.get(key) for c in costs])
               for key in ("wall_s", "max_compute_s", "overhead_s", "overhead_fraction")},
            "bytes_sent_per_site": mean([s.get("bytes_sent") for s in per_site]),
            "bytes_received_per_site": mean([s.get("bytes_received") for s in per_site]),
        }
    return out


# ------------------------------------------------------------------------------------ phases


def _roll_call(grid: Grid, cfg: Any) -> dict[int, SiteInfo]:
    """Wait for the sites, then ask who they are and whether they can serve this run
    (`compatibility`: the shapes of the shared networks their code builds, their data)."""
    expected = expected_sites(cfg)
    RobustSettings.from_cfg(cfg.fed)  # a bad fed.aggregation / fed.robust fails now, not after round 1
    hello = _hello_content(cfg)
    fingerprint = str(hello["config"]["model-sha256"])
    needed = int(cfg.fed.get("min_sites") or len(expected))
    deadline = time.monotonic() + float(cfg.fed.wait_for_sites_s)
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise FederationError(
                f"{len(nodes)} of the {needed} sites needed connected within fed.wait_for_sites_s="
                f"{cfg.fed.wait_for_sites_s}s (expected sites: {expected}); start the missing "
                f"`aldm-fed client --site X` processes, or lower fed.min_sites"
            )
        log.info("waiting for sites: %d of %d connected", len(nodes), needed)
        time.sleep(2.0)
    replies = _ask(grid, nodes, MessageType.QUERY, hello, float(cfg.fed.round_timeout_s))
    sites: dict[int, SiteInfo] = {}
    for node, msg in replies.items():
        if msg.has_error():
            raise FederationError(f"node {node} failed the roll call: {_reason(msg)}")
        check_reply("hello", msg.content)
        info, counts = msg.content["config"], msg.content["metrics"]
        name = str(info["site"])
        if int(info["protocol"]) != PROTOCOL:
            raise FederationError(
                f"site {name} speaks protocol {info['protocol']} (aldm-fed {info.get('version')}), this "
                f"server {PROTOCOL} (aldm-fed {__version__}); install the same aldm-fed version everywhere"
            )
        if str(info.get("model-sha256", "")) != fingerprint:  # the site checks first, naming the key
            raise FederationError(
                f"site {name} builds the shared networks with other shapes than this server (model "
                f"fingerprint {str(info.get('model-sha256', 'none'))[:12]}, here {fingerprint[:12]}); "
                f"install the same aldm-fed and MONAI versions everywhere"
            )
        if name not in expected:
            raise FederationError(f"site {name!r} connected but is not one of fed.sites={expected}")
        if name in {s.name for s in sites.values()}:
            raise FederationError(f"two nodes both say they are site {name!r}")
        sites[node] = SiteInfo(node, name, int(counts["n-source"]), int(counts["n-target"]), int(counts["n-test"]))
    for s in sorted(sites.values(), key=lambda s: s.name):
        log.info("site %s: %d source, %d target, %d test cases", s.name, s.n_source, s.n_target, s.n_test)
    return sites


def _hello_content(cfg: Any) -> RecordDict:
    """The roll call's question: protocol and the shapes of the shared networks (built on the meta
    device: no weights)."""
    shapes = model_shapes(cfg)
    return RecordDict({"config": ConfigRecord({"phase": "hello", "protocol": PROTOCOL,
                                               "model-sha256": shapes_fingerprint(shapes),
                                               "model-shapes": encode_shapes(shapes)})})


def _fedavg_phase(
    grid: Grid,
    cfg: Any,
    state: ServerState,
    phase: str,
    nodes: Mapping[int, str],
    *,
    extra: Mapping[str, Any],
    vae_ckpt: Checkpoint | None = None,
    scale_ckpt: Checkpoint | None = None,
    signer: Signer | None = None,
    examples: Mapping[int, int] | None = None,
) -> Checkpoint:
    """FedAvg rounds of `phase`, resumed from the last round; then the global `final/`.

    With `fed.privacy.secagg.enabled` the rounds run under SecAgg+ (`secure.SecureFedAvg`,
    weighing each site by `examples`), else as `PhaseFedAvg` (inside central DP if that is on).

    A `final/` is current when it has the configured number of rounds on the same inputs (the
    backbone: the same global VAE and scale factor). Raising `rounds` continues from the last
    round; new inputs (a VAE trained further) start the phase over.
    """
    settings = cfg.fed.phases[phase]
    rounds, local_steps = int(settings.rounds), int(settings.local_steps)
    inputs = ({} if phase == "vae" else
              {"vae": checkpoint_identity(vae_ckpt), "scale": checkpoint_identity(scale_ckpt)})
    privacy = PrivacySettings.from_config(cfg)
    dp = privacy.dp
    if dp.enabled:  # other DP settings start the phase over (its epsilon assumes one setting)
        inputs["privacy"] = {"dp": dataclasses.asdict(dp)}
    final = state.layout.final(phase)
    if (final / "meta.json").is_file():
        fed = json.loads((final / "meta.json").read_text()).get("federated", {})
        if fed.get("rounds") == rounds and fed.get("inputs") == inputs:
            log.info("[%s] already complete: %s", phase, final)
            return load_checkpoint(final)
    done, last = state.last_round(phase, inputs)
    if done > rounds:
        raise FederationError(
            f"[{phase}] {done} rounds already ran in {state.root}, more than fed.phases.{phase}.rounds="
            f"{rounds}; raise it or start a new run (run_name)"
        )
    groups = last.tensors if last is not None else initial_weights(cfg, phase)
    state.truncate_log(phase, done)
    if done:
        log.info("[%s] resuming after round %d of %d", phase, done, rounds)

    meter = TrafficMeter(grid)  # weight bytes per site, counted as they cross the grid
    inner: list[Any] = []  # the FedAvg strategy (inside central DP, if on): its round cost

    def on_round(rnd: int, arrays: Any, metrics: Any, used: list[str]) -> None:
        cost = inner[0].round_cost() if inner else {}
        state.save_round(phase, rnd, from_array_record(arrays),
                         {"sites": used, "metrics": dict(metrics), "inputs": inputs}, log_only={"cost": cost})
        if cost:
            log.info("[%s] round %d: %.1f s, %.0f%% beyond the slowest site's compute; %s weights, %d bytes "
                     "to each site (%d at float32)", phase, rnd, cost["wall_s"], 100 * (cost["overhead_fraction"] or 0),
                     cost["transfer_dtype"], max((s.get("bytes_sent", 0) for s in cost["sites"].values()), default=0),
                     cost["params_bytes_fp32"])

    if done < rounds and privacy.secagg.enabled:
        initial = to_array_record(groups)
        inner.append(SecureFedAvg(
            phase, nodes, examples or {}, settings=privacy.secagg, on_round=on_round, round_offset=done,
            min_replies=int(cfg.fed.min_replies), signer=signer, transfer_dtype=transfer_dtype(cfg), meter=meter,
        ))
        inner[0].start(grid=meter, initial_arrays=initial, num_rounds=rounds - done,
                       timeout=float(cfg.fed.round_timeout_s),
                       train_config=ConfigRecord({"local-steps": local_steps, **extra}))
        _, last = state.last_round(phase, inputs)
    elif done < rounds:
        initial = to_array_record(groups)
        def build(callback: Any) -> PhaseFedAvg:
            inner.append(PhaseFedAvg(
                phase, nodes, expected={k: tuple(a.shape) for k, a in initial.items()},
                on_round=callback, round_offset=done, min_replies=int(cfg.fed.min_replies), signer=signer,
                robust=RobustSettings.from_cfg(cfg.fed), transfer_dtype=transfer_dtype(cfg), meter=meter,
            ))
            return inner[0]

        # Central DP noises each aggregate before `on_round` checkpoints it (privacy.CentralDP).
        strategy = (CentralDP(build, dp, on_round, population=len(nodes),
                              releases_before=releases_before(cfg, phase))
                    if dp.enabled else build(on_round))
        strategy.start(
            grid=meter, initial_arrays=initial, num_rounds=rounds - done,
            timeout=float(cfg.fed.round_timeout_s),
            train_config=ConfigRecord({"local-steps": local_steps, **extra}),
        )
        _, last = state.last_round(phase, inputs)
    if last is None:  # rounds=0
        raise FederationError(f"[{phase}] fed.phases.{phase}.rounds must be at least 1")
    sites, metrics = list(last.meta.get("sites", [])), dict(last.meta.get("metrics", {}))
    if phase == "vae":
        meta = vae_meta(cfg, rounds=rounds, local_steps=local_steps, sites=sites, metrics=metrics)
    else:
        assert vae_ckpt is not None and scale_ckpt is not None
        meta = backbone_meta(cfg, vae_ckpt=vae_ckpt, scale_ckpt=scale_ckpt, rounds=rounds,
                             local_steps=local_steps, sites=sites, metrics=metrics)
    meta["federated"]["inputs"] = inputs
    write_final(state.layout.stage_dir(phase), last.tensors, meta,
                {"stage": phase, "summary": metrics, "federated": meta["federated"]})
    log.info("[%s] global model: %s", phase, final)
    return load_checkpoint(final)


def _scale_phase(
    grid: Grid, cfg: Any, state: ServerState, sites: Mapping[int, SiteInfo], vae_ckpt: Checkpoint,
    signer: Signer | None = None,
) -> Checkpoint:
    """Install the global VAE everywhere; pool the source sites' latent sums into the factor."""
    final = state.layout.final("scale")
    if (final / "meta.json").is_file():
        meta = json.loads((final / "meta.json").read_text())
        if meta.get("sources", {}).get("vae") == checkpoint_identity(vae_ckpt):
            log.info("[scale] already complete: %s", final)
            return load_checkpoint(final)
    content = sign_content(signer, RecordDict({
        "arrays": to_array_record(vae_ckpt.tensors),
        "config": ConfigRecord({"phase": "scale", "meta": json.dumps(vae_ckpt.meta)}),
    }))
    replies = _ask(grid, list(sites), MessageType.QUERY, content, float(cfg.fed.round_timeout_s))
    parts, used = [], []
    for node, msg in replies.items():
        name = sites[node].name if node in sites else f"node {node}"
        if msg.has_error():
            log.warning("[scale] site %s failed: %s", name, _reason(msg))
            continue
        try:
            check_reply("scale", msg.content)
        except SharingError as exc:
            log.warning("[scale] rejected the statistics of site %s: %s", name, exc)
            continue
        m = msg.content["metrics"]
        if int(m["latent-count"]) > 0:
            parts.append(LatentStats(int(m["latent-count"]), float(m["latent-sum"]), float(m["latent-sum-sq"])))
            used.append(name)
    if len(used) < int(cfg.fed.min_replies):
        raise FederationError(f"[scale] latent statistics from {len(used)} source site(s) {used}; "
                              f"fed.min_replies={cfg.fed.min_replies}")
    stats = LatentStats.merge(parts)
    factor = scale_factor_from_stats(stats)
    metrics = {"scale_factor": factor, "latent_std": stats.std, "latent_mean": stats.mean,
               "n_values": float(stats.count)}
    meta = {"stage": "scale", "step": 0, "scale_factor": factor, "stats": stats.to_dict(),
            "sources": {"vae": checkpoint_identity(vae_ckpt)}, "federated": {"sites": sorted(used)},
            "metrics": metrics}
    write_final(state.layout.stage_dir("scale"), {"stats": stats.to_tensors()}, meta,
                {"stage": "scale", "metrics": metrics, "stats": stats.to_dict()})
    log.info("[scale] factor %.4f from %d latent values of sites %s", factor, stats.count, sorted(used))
    return load_checkpoint(final)


def _local_phase(
    grid: Grid,
    cfg: Any,
    state: ServerState,
    sites: Mapping[int, SiteInfo],
    vae_ckpt: Checkpoint,
    bb_ckpt: Checkpoint,
    signer: Signer | None = None,
) -> dict[str, dict[str, Any]]:
    """Every site adapts, synthesizes and evaluates locally; collect their metrics."""
    # The VAE travels again so that a site that lost its state (or joined late) can still adapt.
    content = sign_content(signer, RecordDict({
        "arrays": to_array_record({**vae_ckpt.tensors, **bb_ckpt.tensors}),
        "config": ConfigRecord({"phase": "local", "vae-meta": json.dumps(vae_ckpt.meta),
                                "meta": json.dumps(bb_ckpt.meta)}),
    }))
    t0 = time.monotonic()
    replies = _ask_until_back(grid, cfg, sites, content)
    results: dict[str, dict[str, Any]] = {}
    for node, info in sites.items():
        msg = replies.get(node)
        if msg is None:
            results[info.name] = {"status": "no reply", "metrics": {}}
        elif msg.has_error():
            results[info.name] = {"status": f"failed: {_reason(msg)}", "metrics": {}}
        else:
            try:
                check_reply("local", msg.content)
                results[info.name] = {"status": "ok", "metrics": dict(msg.content["metrics"])}
            except SharingError as exc:
                results[info.name] = {"status": f"rejected: {exc}", "metrics": {}}
        log.info("[local] site %s: %s", info.name, results[info.name]["status"])
    if not any(r["status"] == "ok" for r in results.values()):
        raise FederationError(f"[local] no site completed the local phase: {results}")
    log.info("[local] %d of %d sites done in %.0f s", sum(r["status"] == "ok" for r in results.values()),
             len(sites), time.monotonic() - t0)
    return results


def _report(cfg: Any, state: ServerState, sites: Mapping[int, SiteInfo], results: Mapping[str, Mapping[str, Any]],
            seconds: float) -> Path:
    from aldm_fed.evaluation.report import write_report

    context = {
        "run": str(cfg.run_name),
        "mode": "federated",
        "sites": {s.name: {"source": s.n_source, "target": s.n_target, "test": s.n_test, "status": results[s.name]["status"]}
                  for s in sorted(sites.values(), key=lambda s: s.name)},
        "phases": plain_config(cfg.fed.phases),
        # each round's cost in full stays in rounds.jsonl; the report has its per-phase means
        "rounds": [{k: v for k, v in r.items() if k != "cost"} for r in state.rounds()],
        "federation_cost": cost_summary(state.rounds()),
        "privacy": run_privacy(cfg, sum(s.n_source > 0 for s in sites.values())),
        "seconds": round(seconds, 1),
        "global_models": {p: str(state.layout.final(p)) for p in ("vae", "scale", "backbone")},
    }
    metrics = {name: r["metrics"] for name, r in results.items() if r["status"] == "ok"}
    paths = write_report(state.root, metrics, title=f"aldm-fed federated run {cfg.run_name}", context=context)
    return Path(paths["md"]) if "md" in paths else next(iter(paths.values()))


# Replies that mean the site's process went away (killed, crashed, disconnected), not that its work
# failed: the site, restarted, resumes the work from its disk, so the message is worth sending again.
_LOST = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                   ErrorCode.NODE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED})
_MAX_SENDS = 3


def _ask_until_back(grid: Grid, cfg: Any, sites: Mapping[int, SiteInfo], content: RecordDict) -> dict[int, Message]:
    """The local phase's request to every site; a site whose process was lost gets it again once
    it answers a roll call again (within `fed.rejoin_wait_s`, and `fed.round_timeout_s` in all; at
    most `_MAX_SENDS` times, so a site that crashes on every try cannot hold the run).

    A roll-call answer, not `grid.get_node_ids()`, tells that a site is back: the SuperLink lists
    registered nodes before their SuperNode has reconnected.
    """
    deadline = time.monotonic() + float(cfg.fed.round_timeout_s)
    rejoin = float(cfg.fed.get("rejoin_wait_s", 0) or 0)
    replies: dict[int, Message] = {}
    pending = list(sites)
    for _ in range(_MAX_SENDS):
        got = _ask(grid, pending, MessageType.EVALUATE, content, max(1.0, deadline - time.monotonic()))
        replies.update(got)
        lost = [n for n in pending if n not in got or (got[n].has_error() and got[n].error.code in _LOST)]
        if not lost or rejoin <= 0:
            break
        names = sorted(sites[n].name for n in lost)
        log.warning("[local] site(s) %s went away mid-phase; waiting up to %.0f s (fed.rejoin_wait_s) for them "
                    "to reconnect and resume from their disk", names, rejoin)
        until = min(deadline, time.monotonic() + rejoin)
        hello, pending = _hello_content(cfg), []
        while time.monotonic() < until and not pending:
            time.sleep(5.0)
            probe = _ask(grid, lost, MessageType.QUERY, hello, max(1.0, min(60.0, until - time.monotonic())))
            pending = [n for n, m in probe.items() if not m.has_error()]
        if not pending:
            break
        log.info("[local] site(s) %s reconnected: sending the local phase again",
                 sorted(sites[n].name for n in pending))
    return replies


def _ask(grid: Grid, nodes: list[int], kind: str, content: RecordDict, timeout: float) -> dict[int, Message]:
    """Send the same content to `nodes`; their replies by node id (missing: no reply in time)."""
    messages = [Message(content=content, message_type=kind, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    return replies_by_node(messages, replies)


def _reason(msg: Message) -> str:
    """The last line of a failed site's error (Flower wraps it in a long remote traceback)."""
    lines = [ln.strip(" '>") for ln in str(msg.error.reason).splitlines() if ln.strip(" '>")]
    last = lines[-1] if lines else "unknown error"
    return last.removeprefix("Exception ClientAppException occurred. Message: ")[:500]


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


