"""FedAvg for one phase of the run: a fixed set of sites, every update checked, a checkpoint per round.

Flower's `FedAvg` samples from every connected node and starts counting rounds at 1. A phase
instead trains on the sites that hold source cases, continues a resumed phase at its next round
(`round_offset`), rejects updates that break the allow-list or are not finite or do not match the
global shapes (naming the site), rejects updates whose norm is far outside the round's others
(`aggregation.norm_outliers`, with at least 3 updates), refuses to aggregate fewer than
`min_replies` valid updates (Flower has no such check), aggregates the rest with FedAvg or a
robust rule (`fed.aggregation`: median, trimmed_mean) and hands each aggregate to `on_round`
(the server's checkpoint).

Transfer dtype (`fed.transfer_dtype`): the global weights go out cast to it (and signed as
sent); replies, checked as they arrived, are cast back to float32 before the norm check and
aggregation, which always run in float32.

Round cost: `TrafficMeter` wraps the server's grid and counts the weight bytes of every message
sent and reply received (`ArrayRecord.count_bytes`: the arrays' serialized payload, NumPy headers
and key names included; not the config, signature or gRPC framing) and each reply's
`compute-seconds` (the time the site spent in its training function). `PhaseFedAvg.round_cost`
adds the round's wall time at the server: overhead = wall - the slowest site's compute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aldm_fed.federation.aggregation import (
    MIN_UPDATES_FOR_NORM_CHECK,
    RobustSettings,
    aggregate_arrays,
    norm_outliers,
    trimmed_count,
    update_norms,
)
from aldm_fed.federation.records import for_transfer, from_array_record, params_nbytes, to_array_record
from aldm_fed.federation.sharing import SECURE_RECORD, SharingError, check_reply
from aldm_fed.federation.signing import Signer, sign_content

__all__ = ["COMPUTE_METRIC", "FederationError", "PhaseFedAvg", "RoundCallback", "TrafficMeter", "replies_by_node",
           "round_cost"]

COMPUTE_METRIC = "compute-seconds"  # a reply's seconds inside the site's training function

log = logging.getLogger(__name__)

# (global round, aggregated arrays, aggregated metrics, sites whose updates were averaged)
RoundCallback = Callable[[int, ArrayRecord, MetricRecord, list[str]], None]


class FederationError(RuntimeError):
    """The federated run cannot go on (too few valid updates, missing sites, mismatched sites)."""


class PhaseFedAvg(FedAvg):
    """Weighted FedAvg (by `num-examples`) over the sites of one phase.

    Args:
        phase: "vae" or "backbone" (the allow-list entry replies are checked against).
        nodes: node id -> site name, the sites that train in this phase.
        expected: flat key -> shape of the global weights (every update must match).
        on_round: called after each aggregation, before the next round starts.
        round_offset: rounds already completed (a resumed phase).
        min_replies: the fewest valid updates a round may be aggregated from.
        robust: the aggregator and the norm-outlier rule (`fed.aggregation`, `fed.robust`);
            None = FedAvg with the default norm rule (`RobustSettings()`).
        signer: signs the global weights each round sends (`signing`); None = unsigned.
        transfer_dtype: the wire dtype of the global weights' floating tensors (`fed.transfer_dtype`).
        meter: the grid's `TrafficMeter` (per-site bytes and compute of `round_cost`); None = no
            byte counts.
    """

    def __init__(
        self,
        phase: str,
        nodes: Mapping[int, str],
        *,
        expected: Mapping[str, tuple[int, ...]],
        on_round: RoundCallback,
        round_offset: int = 0,
        min_replies: int = 1,
        robust: RobustSettings | None = None,
        signer: Signer | None = None,
        transfer_dtype: str = "float32",
        meter: TrafficMeter | None = None,
    ) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(nodes),
                         min_available_nodes=len(nodes))
        self.phase = phase
        self.nodes = dict(nodes)
        self.expected = dict(expected)
        self.on_round = on_round
        self.round_offset = round_offset
        self.min_replies = min_replies
        self.signer = signer
        self.robust = robust if robust is not None else RobustSettings()
        self._reference: ArrayRecord | None = None  # the global weights sent this round
        self._sent: list[Message] = []
        self._started = time.monotonic()
        self.transfer_dtype = transfer_dtype
        self.meter = meter
        self._params_nbytes = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), "phase": self.phase, "round": self.round_offset + server_round})
        self._started = time.monotonic()  # the round's wall time starts here: casting and signing count
        self._params_nbytes = params_nbytes(arrays)
        if self.meter is not None:
            self.meter.reset()
        wire, self._reference = for_transfer(arrays, self.transfer_dtype)  # norms against what sites got
        record = sign_content(self.signer, RecordDict({self.arrayrecord_key: wire, self.configrecord_key: config}))
        # Kept: the grid stamps each with its message id, which tells whose reply an error is.
        self._sent = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in self.nodes]
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.round_offset + server_round
        valid: list[Message] = []
        for node, msg in replies_by_node(self._sent, list(replies)).items():
            site = self.nodes.get(node, f"node {node}")
            if msg.has_error():
                log.warning("%s round %d: site %s failed: %s", self.phase, rnd, site,
                            str(msg.error.reason).strip().splitlines()[-1][:500])
                continue
            try:
                check_reply(self.phase, msg.content, self.expected)  # as it arrived, in its wire dtype
            except SharingError as exc:
                log.warning("%s round %d: rejected the update of site %s: %s", self.phase, rnd, site, exc)
                continue
            _to_float32(msg.content, self.arrayrecord_key)  # norms and aggregation in float32 only
            valid.append(msg)
        valid = self._drop_norm_outliers(rnd, valid)
        used = sorted(self.nodes[m.metadata.src_node_id] for m in valid)
        if len(valid) < self.min_replies:
            missing = sorted(set(self.nodes.values()) - set(used))
            raise FederationError(
                f"{self.phase} round {rnd}: {len(valid)} valid update(s) (from {used or 'no site'}), "
                f"fewer than fed.min_replies={self.min_replies}; no reply or a rejected one from "
                f"{missing} (see the log above). Restart the server to resume from round {rnd}."
            )
        arrays, metrics = self._aggregate(server_round, rnd, valid)
        if arrays is None:
            raise FederationError(f"{self.phase} round {rnd}: nothing to aggregate")
        metrics = MetricRecord({k: v for k, v in (metrics or {}).items() if k != COMPUTE_METRIC})  # per site
        self.on_round(rnd, arrays, metrics, used)
        loss = metrics.get("loss")
        log.info("[%s] round %d: averaged %d site(s) %s%s in %.1f s", self.phase, rnd, len(used), used,
                 f", loss {loss:.4g}" if isinstance(loss, float) else "", time.monotonic() - self._started)
        return arrays, metrics

    def round_cost(self) -> dict[str, Any]:
        """The current round's cost (`round_cost`)."""
        return round_cost(self._started, self.nodes, self.meter, self.transfer_dtype, self._params_nbytes)

    def _site(self, msg: Message) -> str:
        return self.nodes.get(msg.metadata.src_node_id, f"node {msg.metadata.src_node_id}")

    def _drop_norm_outliers(self, rnd: int, valid: list[Message]) -> list[Message]:
        """Reject the updates whose norm is far outside the others' (see `aggregation`)."""
        if not self.robust.norm_check or self._reference is None or not valid:
            return valid
        factor = float(self.robust.norm_factor or 0.0)
        norms = {self._site(m): update_norms(m.content[self.arrayrecord_key], self._reference) for m in valid}
        log.debug("%s round %d: update norms %s", self.phase, rnd, norms)
        if len(valid) < MIN_UPDATES_FOR_NORM_CHECK:
            # With 2 updates the median is their mean: nothing tells which one is wild. Both are
            # aggregated (the alternative, rejecting both, stops every 2-site federation).
            for group in sorted({g for per_site in norms.values() for g in per_site}):
                values = [per_site.get(group, 0.0) for per_site in norms.values()]
                if len(values) == 2 and max(values) > factor * min(values):
                    log.warning(
                        "%s round %d: update norms of group %r differ by more than fed.robust.norm_factor=%g "
                        "(%s) but with %d updates the outlier cannot be told apart; aggregating both "
                        "(the norm check needs at least %d)", self.phase, rnd, group, factor,
                        ", ".join(f"{s} {n[group]:.4g}" for s, n in sorted(norms.items())),
                        len(values), MIN_UPDATES_FOR_NORM_CHECK)
            return valid
        outliers = norm_outliers(norms, factor)
        for site, why in sorted(outliers.items()):
            log.warning("%s round %d: rejected the update of site %s: %s", self.phase, rnd, site, why)
        return [m for m in valid if self._site(m) not in outliers]

    def _aggregate(
        self, server_round: int, rnd: int, valid: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg (Flower's own), or the coordinate-wise median / trimmed mean of `fed.aggregation`."""
        method = self.robust.aggregation
        if method == "fedavg":
            return super().aggregate_train(server_round, valid)
        if method == "trimmed_mean" and trimmed_count(len(valid), self.robust.trim_fraction) == 0:
            log.warning("%s round %d: trimmed_mean over %d updates with fed.robust.trim_fraction=%g trims "
                        "nothing (an unweighted mean)", self.phase, rnd, len(valid), self.robust.trim_fraction)
        contents = [m.content for m in valid]
        arrays = aggregate_arrays(contents, method, weighted_by_key=self.weighted_by_key,
                                  trim_fraction=self.robust.trim_fraction, arrays_key=self.arrayrecord_key)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def round_cost(
    started: float, nodes: Mapping[int, str], meter: TrafficMeter | None, transfer_dtype: str, params_nbytes: int
) -> dict[str, Any]:
    """A round's cost (the names of `rounds.jsonl`'s "cost"; docs/contracts.md).

    wall_s runs from `started` (the round's first cast, sign and send; `time.monotonic`) to now
    (replies checked, decoded and aggregated); per site, the bytes of weights sent to it and
    received from it and the compute-seconds it reported; overhead_s = wall_s - the largest
    compute_s, and its fraction of wall_s. Sites that did not reply have no compute_s.

    Args:
        started: when the round started.
        nodes: node id -> site name, the round's sites.
        meter: the grid's `TrafficMeter` (None: no per-site figures).
        transfer_dtype: the wire dtype of the global weights.
        params_nbytes: the shared parameters' size at float32 (`records.params_nbytes`).
    """
    wall = time.monotonic() - started
    sites: dict[str, dict[str, Any]] = {}
    traffic = meter.snapshot() if meter is not None else {}
    for node, name in sorted(nodes.items(), key=lambda kv: kv[1]):
        sites[name] = {k: v for k, v in traffic.get(node, {}).items() if v is not None}
    computes = [s["compute_s"] for s in sites.values() if "compute_s" in s]
    slowest = max(computes) if computes else 0.0
    return {
        "wall_s": round(wall, 3),
        "max_compute_s": round(slowest, 3),
        "overhead_s": round(wall - slowest, 3),
        "overhead_fraction": round((wall - slowest) / wall, 4) if wall > 0 else None,
        "transfer_dtype": transfer_dtype,
        "params_bytes_fp32": params_nbytes,
        "sites": sites,
    }


def _to_float32(content: RecordDict, key: str) -> None:
    """Cast a checked reply's weights back to float32 in place (a no-op for float32 replies)."""
    record = content[key]
    if any(array.dtype != "float32" and array.dtype.startswith(("float", "bfloat")) for array in record.values()):
        content[key] = to_array_record(from_array_record(record))


class TrafficMeter:
    """The server's grid, counting what each site's messages carried.

    Every call goes to the wrapped grid; `send_and_receive` also records, per destination node,
    the bytes of the weights sent (`ArrayRecord.count_bytes` of "arrays") and, per reply, the
    bytes of the weights received and its `compute-seconds`, before any strategy touches the
    replies (central DP rewrites them in float32). Under secure aggregation the bytes of the
    SecAgg+ records count too (keys, encrypted shares, the masked update: `sharing.SECURE_RECORD`),
    over all four stages of a round.

    Args:
        grid: Flower's grid.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._traffic: dict[int, dict[str, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def reset(self) -> None:
        """Forget the counts (a new round starts)."""
        self._traffic = {}

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """node id -> {"bytes_sent", "bytes_received", "compute_s"} since the last `reset`."""
        return {node: dict(values) for node, values in self._traffic.items()}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            entry = self._traffic.setdefault(msg.metadata.dst_node_id, {})
            entry["bytes_sent"] = entry.get("bytes_sent", 0) + _weight_bytes(msg.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for node, reply in replies_by_node(messages, replies).items():
            if reply.has_error():
                continue
            entry = self._traffic.setdefault(node, {})
            entry["bytes_received"] = entry.get("bytes_received", 0) + _weight_bytes(reply.content)
            metrics = next((reply.content[k] for k in ("metrics", "fitres.metrics") if k in reply.content), {})
            compute = metrics.get(COMPUTE_METRIC)
            if isinstance(compute, int | float) and not isinstance(compute, bool):
                entry["compute_s"] = round(float(compute), 3)
        return replies


def _weight_bytes(content: RecordDict) -> int:
    total = sum(record.count_bytes() for record in content.values() if isinstance(record, ArrayRecord))
    secure = content.get(SECURE_RECORD)
    if isinstance(secure, ConfigRecord):
        for value in secure.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, bytes) else 0
    return total


def replies_by_node(sent: list[Message], replies: list[Message]) -> dict[int, Message]:
    """Each reply under the node its request went to.

    Not `reply.metadata.src_node_id` alone: an error the SuperLink makes itself (node gone, message
    expired) comes from the SuperLink's own node id, not from the site. The grid stamps every sent
    message with its id, and each reply names the message it answers.
    """
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    out: dict[int, Message] = {}
    for reply in replies:
        out[dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)] = reply
    return out
