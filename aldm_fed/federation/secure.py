"""Secure aggregation (SecAgg+) of the shared phases: the server learns only the sites' mean update.

Flower 1.42 implements SecAgg+ only on its legacy path: `SecAggPlusWorkflow` drives the protocol
from a `LegacyContext` (a legacy `Strategy` and `ClientManager`), and the site's `secaggplus_mod`
masks a legacy `FitRes` of unnamed arrays. Our vae and backbone rounds are Message-API rounds of
named, signed, allow-listed parameter groups. This module is the translation between the two, so
that Flower's protocol code runs unchanged:

- server, `SecureFedAvg`: each round is one run of Flower's `SecAggPlusWorkflow` (setup, share
  keys, collect masked vectors, unmask) over a `LegacyContext` made for that round: a legacy
  strategy (`_SumOnly`) that names the phase's sites and receives the unmasked sum, and, in place
  of Flower's FitIns, the round's message exactly as a plain round sends it ("arrays" + "config",
  signed: `signing.sign_content`), so a site verifies and trains on it as always.
- site, `secure_aggregation_mod`: a message carrying Flower's SecAgg+ record goes to Flower's
  `secaggplus_mod`; at the masking stage the site's usual handler trains as in a plain round and
  its reply (which passed the allow-list) becomes what Flower masks: the UPDATE (trained weights
  minus the global weights received, arrays in `records.update_order`) with the site's
  example count and metrics (`as_masked_fitres`). The final reply is checked by
  `sharing.check_secure_reply`.

Why updates and not weights: SecAgg+ clips every value (times the site's weight n_i/max n) to
+-`clipping_range` and quantises it to `quantization_range` levels; a round's update is small
against the range, a weight need not be. The server gets sum(w_i u_i) / sum(w_i) with
w_i = n_i / max_weight (Flower dequantises it), adds it to the global weights it sent, and so
computes weighted FedAvg up to the quantisation step 2 x clipping_range / quantization_range
(stochastic rounding: unbiased) per site, divided by sum(w_i).

What the server no longer has: the sites' individual updates, so no per-site update checks (NaN,
shapes, norm outliers) and no robust aggregation (`fed.aggregation` must be fedavg). Each site
checks its own update before masking it (allow-list, finite values), the server checks the
aggregate (finite, shapes) and every reply against the allow-list on arrival (`_CheckedGrid`).
A site that fails, vanishes or sends a reply the allow-list refuses mid-round is a dropped site:
SecAgg+ removes its masks with the shares of the others, and the round counts the sites that
finished.
What still travels in plain: per-site metrics (losses, example counts) and the scale phase.

Limits of Flower 1.42's implementation (stated in docs/federation.md): at least 2 sites per round; the
masks are drawn by NumPy's RandomState from a 32-bit fold of each shared secret
(flwr/common/secure_aggregation/secaggplus_utils.py `pseudo_rand_gen`), so a server willing to
search 2**32 seeds per mask could strip one; the masked update travels as int64 (2x float32).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from aldm_fed.federation.privacy import MODULUS_RANGE, SecAggSettings
from aldm_fed.federation.records import (
    for_transfer,
    from_array_record,
    params_nbytes,
    to_array_record,
    update_order,
)
from aldm_fed.federation.sharing import (
    SharingError,
    check_reply,
    check_secure_reply,
    secure_stage,
)
from aldm_fed.federation.signing import Signer, sign_content
from aldm_fed.federation.strategy import (
    COMPUTE_METRIC,
    FederationError,
    RoundCallback,
    TrafficMeter,
    round_cost,
)

__all__ = ["SecureFedAvg", "as_masked_fitres", "secure_aggregation_mod"]

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


# ------------------------------------------------------------------------------------- server


class SecureFedAvg:
    """The rounds of one FedAvg phase under SecAgg+; the callbacks and round cost of `PhaseFedAvg`.

    Args:
        phase: "vae" or "backbone".
        nodes: node id -> site name, the sites that train in this phase (at least 2).
        examples: node id -> the site's example count (its source cases, from the roll call):
            the largest is SecAgg+'s `max_weight`, so each site's weight n_i / max_weight <= 1.
        settings: `fed.privacy.secagg`.
        on_round: called after each aggregation (the server's checkpoint).
        round_offset: rounds already completed (a resumed phase).
        min_replies: the fewest sites whose masked updates a round may be aggregated from.
        signer: signs the global weights each round sends; None = unsigned.
        transfer_dtype: the wire dtype of the global weights (`fed.transfer_dtype`).
        meter: the grid's `TrafficMeter`, for the round's cost.
    """

    def __init__(
        self,
        phase: str,
        nodes: Mapping[int, str],
        examples: Mapping[int, int],
        *,
        settings: SecAggSettings,
        on_round: RoundCallback,
        round_offset: int = 0,
        min_replies: int = 1,
        signer: Signer | None = None,
        transfer_dtype: str = "float32",
        meter: TrafficMeter | None = None,
    ) -> None:
        if len(nodes) < 2:
            raise FederationError(
                f"[{phase}] fed.privacy.secagg.enabled=true needs at least 2 sites in the phase, it has "
                f"{sorted(nodes.values())}: a sum of one update is that update"
            )
        if len(nodes) * settings.quantization_range >= MODULUS_RANGE:
            raise FederationError(
                f"[{phase}] {len(nodes)} sites x fed.privacy.secagg.quantization_range={settings.quantization_range} "
                f"reaches SecAgg+'s modulus 2**32: the masked sum would wrap; lower quantization_range"
            )
        self.phase = phase
        self.nodes = dict(nodes)
        self.max_weight = float(max(max(examples.get(n, 0) for n in nodes), 1))
        self.settings = settings
        self.on_round = on_round
        self.round_offset = round_offset
        self.min_replies = min_replies
        self.signer = signer
        self.transfer_dtype = transfer_dtype
        self.meter = meter
        self._started = time.monotonic()
        self._params_nbytes = 0

    def start(
        self, *, grid: Any, initial_arrays: ArrayRecord, num_rounds: int, timeout: float, train_config: ConfigRecord
    ) -> ArrayRecord:
        """Run `num_rounds` rounds from `initial_arrays`; return the last global weights."""
        log.info("[%s] secure aggregation (SecAgg+) over sites %s: the server sees only their mean update",
                 self.phase, sorted(self.nodes.values()))
        arrays = initial_arrays
        for server_round in range(1, num_rounds + 1):
            arrays = self.round(grid, server_round, arrays, train_config, timeout)
        return arrays

    def round(
        self, grid: Any, server_round: int, arrays: ArrayRecord, train_config: ConfigRecord, timeout: float
    ) -> ArrayRecord:
        """One round: send the signed global weights, run SecAgg+, add the mean update.

        Raises:
            FederationError: the protocol halted (too few sites left for the shares), fewer than
                `min_replies` sites finished, or the aggregate is not finite.
        """
        rnd = self.round_offset + server_round
        self._started = time.monotonic()
        self._params_nbytes = params_nbytes(arrays)
        if self.meter is not None:
            self.meter.reset()
        wire, reference = for_transfer(arrays, self.transfer_dtype)  # the update is added to what sites got
        config = ConfigRecord({**dict(train_config), "phase": self.phase, "round": rnd})
        content = sign_content(self.signer, RecordDict({"arrays": wire, "config": config}))

        collected = _SumOnly(self.nodes, grid)
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=1), strategy=collected, client_manager=collected.client_manager,
        )
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = _SignedSecAggPlus(
            content,
            num_shares=self.settings.num_shares,
            reconstruction_threshold=self.settings.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.settings.clipping_range,
            quantization_range=self.settings.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=timeout,
        )
        workflow(_CheckedGrid(grid, self.nodes, f"{self.phase} round {rnd}"), context)
        if collected.mean_update is None:
            raise FederationError(
                f"{self.phase} round {rnd}: secure aggregation halted (too few sites answered a stage to "
                f"rebuild the masks: fed.privacy.secagg.reconstruction_threshold; see the log above). "
                f"Restart the server to resume from round {rnd}."
            )
        used = sorted(self.nodes[n] for n in collected.node_ids)
        dropped = sorted(set(self.nodes.values()) - set(used))
        if dropped:
            log.warning("%s round %d: site(s) %s dropped out of the secure round (their masks were removed with "
                        "the others' shares): %s", self.phase, rnd, dropped, "; ".join(collected.failures) or "no reply")
        if len(used) < self.min_replies:
            raise FederationError(
                f"{self.phase} round {rnd}: {len(used)} site(s) {used} finished the secure round, fewer than "
                f"fed.min_replies={self.min_replies}. Restart the server to resume from round {rnd}."
            )
        updated = self._apply(rnd, reference, collected.mean_update)
        metrics = self._metrics(collected.metrics)
        self.on_round(rnd, updated, metrics, used)
        loss = metrics.get("loss")
        log.info("[%s] round %d: securely averaged %d site(s) %s%s in %.1f s", self.phase, rnd, len(used), used,
                 f", loss {loss:.4g}" if isinstance(loss, float) else "", time.monotonic() - self._started)
        return updated

    def round_cost(self) -> dict[str, Any]:
        """The current round's cost (`strategy.round_cost`), all four SecAgg+ stages included."""
        cost = round_cost(self._started, self.nodes, self.meter, self.transfer_dtype, self._params_nbytes)
        return {**cost, "secure_aggregation": True}

    def _apply(self, rnd: int, reference: ArrayRecord, mean_update: list[np.ndarray]) -> ArrayRecord:
        """The global weights sent plus the mean update, each tensor in its own dtype."""
        keys = update_order(reference)
        if len(mean_update) != len(keys):
            raise FederationError(f"{self.phase} round {rnd}: the secure sum has {len(mean_update)} arrays, "
                                  f"the global weights {len(keys)}")
        groups = from_array_record(reference)
        for key, update in zip(keys, mean_update):
            group, name = key.split(".", 1)
            base = groups[group][name]
            if tuple(update.shape) != tuple(base.shape) or not np.isfinite(update).all():
                raise FederationError(f"{self.phase} round {rnd}: the secure mean update of {key} has shape "
                                      f"{tuple(update.shape)} (expected {tuple(base.shape)}) or holds NaN/Inf")
            value = base.double() + torch.from_numpy(np.asarray(update, dtype=np.float64))
            groups[group][name] = value.to(base.dtype) if base.is_floating_point() else value.round().to(base.dtype)
        return to_array_record(groups)

    @staticmethod
    def _metrics(per_site: list[tuple[str, int, dict[str, Any]]]) -> MetricRecord:
        """The sites' metrics (they travel in plain, checked on arrival by `_CheckedGrid`), weighted
        by example count like FedAvg's; compute-seconds stays per site (the round's cost)."""
        from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

        records = [RecordDict({"metrics": MetricRecord({**{k: v for k, v in metrics.items() if k != COMPUTE_METRIC},
                                                        "num-examples": count})})
                   for _, count, metrics in per_site]
        return aggregate_metricrecords(records, "num-examples") if records else MetricRecord()


class _CheckedGrid:
    """The grid as Flower's workflow sees it: every site reply is checked on arrival
    (`sharing.check_secure_reply`, the allow-list the site applied before sending), and one that
    breaks it becomes an error reply, so the workflow drops that site and removes its masks with
    the others' shares. Every other call goes to the wrapped grid.

    Args:
        grid: the server's grid (its `TrafficMeter`).
        nodes: node id -> site name, for the log.
        where: "<phase> round <n>", for the log.
    """

    def __init__(self, grid: Any, nodes: Mapping[int, str], where: str) -> None:
        self._grid = grid
        self._nodes = dict(nodes)
        self._where = where

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stages = [secure_stage(m.content) for m in messages]  # the stage each request asks for
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        sent = {m.metadata.message_id: (m, stage) for m, stage in zip(messages, stages)}
        out = []
        for reply in replies:
            request, stage = sent.get(reply.metadata.reply_to_message_id, (None, None))
            if request is not None and not reply.has_error():
                try:
                    check_secure_reply(stage, request.content, reply.content)
                except SharingError as exc:
                    site = self._nodes.get(request.metadata.dst_node_id, str(request.metadata.dst_node_id))
                    log.warning("%s: rejected the secure-aggregation reply of site %s, which drops out of the "
                                "round: %s", self._where, site, exc)
                    reply = Message(Error(code=ErrorCode.UNKNOWN, reason=f"rejected by the server: {exc}"),
                                    reply_to=request)
            out.append(reply)
        return out


class _SumOnly:
    """The legacy strategy and client manager Flower's workflow needs: it names the phase's sites
    and keeps what the unmask stage hands over (the mean update, who finished, their metrics)."""

    def __init__(self, nodes: Mapping[int, str], grid: Any) -> None:
        self.nodes = dict(nodes)
        self.client_manager = SimpleClientManager()
        self.proxies = [GridClientProxy(node, grid, run_id=0) for node in nodes]
        for proxy in self.proxies:
            self.client_manager.register(proxy)
        self.mean_update: list[np.ndarray] | None = None
        self.node_ids: list[int] = []
        self.metrics: list[tuple[str, int, dict[str, Any]]] = []
        self.failures: list[str] = []

    # The legacy Strategy interface (flwr.server.strategy.Strategy), as far as the workflow calls it.
    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
        # Placeholders: `_SignedSecAggPlus` sends the round's signed message instead.
        return [(proxy, FitIns(Parameters(tensors=[], tensor_type=""), {})) for proxy in self.proxies]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple[Any, dict]:
        if results:  # every FitRes carries the same unmasked mean (Flower sets it on each)
            self.mean_update = parameters_to_ndarrays(results[0][1].parameters)
            self.node_ids = [proxy.node_id for proxy, _ in results]
            self.metrics = [(self.nodes.get(proxy.node_id, str(proxy.node_id)), int(res.num_examples),
                             dict(res.metrics)) for proxy, res in results]
        # Flower files a failed masking reply twice and names no node: keep each reason once.
        self.failures = list(dict.fromkeys(str(f)[:300] for f in failures))
        return results[0][1].parameters if results else None, {}


class _SignedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending every site the round's signed message ("arrays" +
    "config") where Flower would send a legacy FitIns.

    Args:
        content: the round's signed message.
        options: `SecAggPlusWorkflow`'s arguments.
    """

    def __init__(self, content: RecordDict, **options: Any) -> None:
        super().__init__(**options)
        self.content = content

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        # One RecordDict per site: the masking stage adds each site's own SecAgg+ record to it.
        state.nid_to_fitins = {node: RecordDict(dict(self.content.items())) for node in state.nid_to_fitins}
        return bool(ok)


# --------------------------------------------------------------------------------------- site


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """ClientApp mod: a message of Flower's SecAgg+ protocol goes to Flower's `secaggplus_mod`,
    whose masking stage gets the site's update from `as_masked_fitres`; others pass through."""
    if secure_stage(msg.content) is None:
        return call_next(msg, context)
    def masked(m: Message, c: Context) -> Message:
        state = c.state.get(RECORD_KEY_STATE)  # Flower's protocol state, kept since the setup stage
        clip = float(state["clipping_range"]) if isinstance(state, ConfigRecord) and "clipping_range" in state else None
        return as_masked_fitres(m, call_next(m, c), clipping_range=clip)

    return secaggplus_mod(msg, context, masked)


def as_masked_fitres(request: Message, reply: Message, *, clipping_range: float | None = None) -> Message:
    """The site's plain reply to a round as the legacy FitRes Flower masks: its update (trained
    weights minus the global weights received, in float64 of the float32 weights, in
    `records.update_order`), its example count and metrics.

    Args:
        request: the server's message (the global weights as sent).
        reply: the site's plain reply (built by `sharing.site_reply`).
        clipping_range: the round's SecAgg+ clipping range; larger update values are logged.

    Raises:
        SharingError: the reply breaks the phase's allow-list or its update is not finite (the
            site then drops out of the round instead of sending it).
    """
    if reply.has_error():
        return reply
    phase = str(request.content["config"]["phase"])
    check_reply(phase, reply.content)
    sent, trained = request.content["arrays"], reply.content["arrays"]
    if set(sent) != set(trained):
        raise SharingError(f"secagg phase {phase}: the update's keys differ from the global weights'")
    metrics = dict(reply.content["metrics"])
    count = int(metrics.pop("num-examples"))
    # Differences in float64 of the float32 weights (the global ones decoded as the site trained on them).
    base, mine = from_array_record(sent), from_array_record(trained)
    updates, largest = {}, 0.0
    for key in update_order(sent):
        group, name = key.split(".", 1)
        update = mine[group][name].double().numpy() - base[group][name].double().numpy()
        if not np.isfinite(update).all():
            raise SharingError(f"secagg phase {phase}: the update of {key} holds NaN or Inf; not sending it")
        updates[key] = Array(update)
        largest = max(largest, float(np.abs(update).max(initial=0.0)))
    if clipping_range is not None and largest > clipping_range:
        log.warning("secagg phase %s: update values up to %.4g exceed fed.privacy.secagg.clipping_range=%g and are "
                    "clipped before masking; raise it", phase, largest, clipping_range)
    return Message(RecordDict({
        "fitres.parameters": ArrayRecord(updates),
        "fitres.metrics": ConfigRecord(metrics),
        "fitres.num_examples": MetricRecord({"num_examples": count}),
        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
    }), reply_to=request)
