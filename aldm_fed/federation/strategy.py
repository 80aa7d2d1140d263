"""FedAvg for one phase of the run: a fixed set of sites, every update checked, a checkpoint per round.

Flower's `FedAvg` samples from every connected node and starts counting rounds at 1. A phase
instead trains on the sites that hold source cases, continues a resumed phase at its next round
(`round_offset`), rejects updates that break the allow-list or are not finite or do not match the
global shapes (naming the site), rejects updates whose norm is far outside the round's others
(`aggregation.norm_outliers`, with at least 3 updates), refuses to aggregate fewer than
`min_replies` valid updates (Flower has no such check), aggregates the rest with FedAvg or a
robust rule (`fed.aggregation`: median, trimmed_mean) and hands each aggregate to `on_round`
(the server's checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

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
from aldm_fed.federation.sharing import SharingError, check_reply
from aldm_fed.federation.signing import Signer, sign_content

__all__ = ["FederationError", "PhaseFedAvg", "RoundCallback", "replies_by_node"]

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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), "phase": self.phase, "round": self.round_offset + server_round})
        self._reference = arrays  # updates are measured against what the sites received
        self._started = time.monotonic()
        record = sign_content(self.signer, RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}))
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
                check_reply(self.phase, msg.content, self.expected)
            except SharingError as exc:
                log.warning("%s round %d: rejected the update of site %s: %s", self.phase, rnd, site, exc)
                continue
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
        metrics = metrics if metrics is not None else MetricRecord({})
        self.on_round(rnd, arrays, metrics, used)
        loss = metrics.get("loss")
        log.info("[%s] round %d: averaged %d site(s) %s%s in %.1f s", self.phase, rnd, len(used), used,
                 f", loss {loss:.4g}" if isinstance(loss, float) else "", time.monotonic() - self._started)
        return arrays, metrics

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
