"""FedAvg for one phase of the run: a fixed set of sites, every update checked, a checkpoint per round.

Flower's `FedAvg` samples from every connected node and starts counting rounds at 1. A phase
instead trains on the sites that hold source cases, continues a resumed phase at its next round
(`round_offset`), rejects updates that break the allow-list or are not finite or do not match the
global shapes (naming the site), refuses to aggregate fewer than `min_replies` valid updates
(Flower has no such check), and hands each aggregate to `on_round` (the server's checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aldm_fed.federation.sharing import SharingError, check_reply

__all__ = ["FederationError", "PhaseFedAvg", "RoundCallback"]

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
    ) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(nodes),
                         min_available_nodes=len(nodes))
        self.phase = phase
        self.nodes = dict(nodes)
        self.expected = dict(expected)
        self.on_round = on_round
        self.round_offset = round_offset
        self.min_replies = min_replies
        self._started = time.monotonic()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), "phase": self.phase, "round": self.round_offset + server_round})
        self._started = time.monotonic()
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in self.nodes]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.round_offset + server_round
        valid: list[Message] = []
        for msg in replies:
            site = self.nodes.get(msg.metadata.src_node_id, f"node {msg.metadata.src_node_id}")
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
        used = sorted(self.nodes[m.metadata.src_node_id] for m in valid)
        if len(valid) < self.min_replies:
            missing = sorted(set(self.nodes.values()) - set(used))
            raise FederationError(
                f"{self.phase} round {rnd}: {len(valid)} valid update(s) (from {used or 'no site'}), "
                f"fewer than fed.min_replies={self.min_replies}; no reply or a rejected one from "
                f"{missing} (see the log above). Restart the server to resume from round {rnd}."
            )
        arrays, metrics = super().aggregate_train(server_round, valid)
        if arrays is None:
            raise FederationError(f"{self.phase} round {rnd}: nothing to aggregate")
        metrics = metrics if metrics is not None else MetricRecord({})
        self.on_round(rnd, arrays, metrics, used)
        loss = metrics.get("loss")
        log.info("[%s] round %d: averaged %d site(s) %s%s in %.1f s", self.phase, rnd, len(used), used,
                 f", loss {loss:.4g}" if isinstance(loss, float) else "", time.monotonic() - self._started)
        return arrays, metrics
