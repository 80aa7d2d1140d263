"""Secure aggregation (aldm_fed/federation/secure.py): Flower's own SecAgg+ protocol under our
Message-API rounds, run in process against real ClientApps with the sites' real mods (audit log,
allow-list, SecAgg+) and signed global weights; slow: a simulated tiny federation with it on.

Checks: the aggregate equals weighted FedAvg within the quantisation step and is not trivially
identical (quantisation happened); what leaves a site is uniformly masked and listed in its audit
log; a site that drops out at the masking stage is removed and named, the others still aggregate;
with no spare shares a drop-out stops the round with a clear error (no endless wait); the
allow-list refuses anything beyond the protocol's fields.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.supercore.task_identity import TaskIdentity

from aldm_fed.config import compose
from aldm_fed.federation.apps import site_mods
from aldm_fed.federation.privacy import SecAggSettings
from aldm_fed.federation.records import from_array_record, to_array_record
from aldm_fed.federation.secure import SecureFedAvg
from aldm_fed.federation.sharing import SECURE_RECORD, SharingError, check_secure_reply, site_reply
from aldm_fed.federation.signing import Signer, Verifier, ensure_signing_pair
from aldm_fed.federation.strategy import FederationError, TrafficMeter

SITES = {11: "A", 12: "B", 13: "C"}
EXAMPLES = {11: 4, 12: 2, 13: 3}
SHAPES = {"enc.weight": (6, 5), "enc.bias": (6,), "dec.weight": (3, 6, 2)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages need a run and node id (set by Flower's ServerApp / ClientApp processes).
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _global() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}


def _delta(node: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(node)
    return {k: 0.01 * torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}


class InProcessGrid:
    """Flower's Grid for ClientApps in this process: each message is copied (as if serialized),
    stamped with an id, handled by its node's app under that node's persistent Context, and a
    raised exception becomes an error reply, as Flower's runtime makes it."""

    def __init__(self, apps: dict[int, ClientApp]) -> None:
        self.apps = apps
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in apps}
        self.replies: list[tuple[Message, Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            received = Message(copy.deepcopy(msg.content), dst_node_id=msg.metadata.dst_node_id,
                               message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)
            received.metadata.__dict__["_message_id"] = msg.metadata.message_id
            node = msg.metadata.dst_node_id
            server_node, TaskIdentity._node_id = TaskIdentity._node_id, node  # replies come from the site
            try:
                reply = self.apps[node](received, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what Flower's runtime does with a ClientApp error
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
            finally:
                TaskIdentity._node_id = server_node
            self.replies.append((received, reply))
            out.append(reply)
        return out


def _leak(msg: Message, context: Context, call_next: Any) -> Message:
    """A tampered site: a mod outside the allow-list adds a record to its masked update."""
    reply = call_next(msg, context)
    if reply.has_content() and SECURE_RECORD in reply.content and "masked_params" in reply.content[SECURE_RECORD]:
        reply.content["leak"] = ConfigRecord({"case": "BraTS-001"})
    return reply


def _site_app(node: int, tmp_path: Path, verifier: Verifier, fail: str | None = None) -> ClientApp:
    """A site's ClientApp with the real mods; its 'training' adds a fixed update to the verified
    global weights (`fail`="nan": its update holds NaN, which the site refuses to send; "leak":
    its masked reply is tampered with after the site's allow-list)."""
    app = ClientApp(mods=[*([_leak] if fail == "leak" else []),
                          *site_mods(lambda context: tmp_path / SITES[node] / "outgoing.jsonl")])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        weights = verifier.verify(msg.content, ("vae",))["vae"]
        delta = _delta(node)
        if fail == "nan":
            delta["enc.bias"][0] = float("nan")
        trained = {k: weights[k] + delta[k] for k in weights}
        return Message(site_reply("vae", metrics={"num-examples": EXAMPLES[node], "loss": float(node)},
                                  arrays=to_array_record({"vae": trained})), reply_to=msg)

    return app


def _run(tmp_path: Path, *, failing: int | None = None, how: str = "nan",
         **settings: Any) -> tuple[dict[str, Any], InProcessGrid]:
    key, pub = ensure_signing_pair(tmp_path / "keys")
    verifier = Verifier.from_file(pub)
    grid = InProcessGrid({n: _site_app(n, tmp_path, verifier, fail=how if n == failing else None) for n in SITES})
    meter = TrafficMeter(grid)
    got: dict[str, Any] = {}

    def on_round(rnd: int, arrays: ArrayRecord, metrics: MetricRecord, used: list[str]) -> None:
        got.update(round=rnd, arrays=arrays, metrics=dict(metrics), used=used)

    initial = to_array_record({"vae": _global()})
    strategy = SecureFedAvg(
        "vae", SITES, EXAMPLES, settings=SecAggSettings(enabled=True, **settings), on_round=on_round,
        signer=Signer.from_file(key), meter=meter,
    )
    strategy.start(grid=meter, initial_arrays=initial, num_rounds=1, timeout=30.0,
                   train_config=ConfigRecord({"local-steps": 1}))
    got["cost"] = strategy.round_cost()
    return got, grid


def _fedavg(nodes: list[int]) -> dict[str, np.ndarray]:
    total = sum(EXAMPLES[n] for n in nodes)
    base = _global()
    return {k: base[k].double().numpy() + sum(EXAMPLES[n] * _delta(n)[k].double().numpy() for n in nodes) / total
            for k in SHAPES}


def test_secure_round_equals_weighted_fedavg_within_the_quantisation_step(tmp_path: Path) -> None:
    got, _ = _run(tmp_path)
    assert got["round"] == 1 and got["used"] == ["A", "B", "C"]
    secure = from_array_record(got["arrays"], ("vae",))["vae"]
    expected = _fedavg(list(SITES))
    settings = SecAggSettings()
    step = 2 * settings.clipping_range / settings.quantization_range
    # Each site's weighted update is rounded (stochastically) to the step; the mean divides by
    # the sum of the weights n_i / max n; plus float32 rounding of the result.
    bound = len(SITES) * step / (sum(EXAMPLES.values()) / max(EXAMPLES.values())) + 1e-6
    errors = np.concatenate([np.abs(secure[k].double().numpy() - expected[k]).ravel() for k in SHAPES])
    assert errors.max() <= bound
    assert errors.max() > 1e-7  # quantised, not passed through in plain
    # Metrics travel in plain, weighted by the example counts like FedAvg's.
    assert got["metrics"]["loss"] == pytest.approx(sum(EXAMPLES[n] * n for n in SITES) / sum(EXAMPLES.values()))
    # The round's cost covers all four stages: keys, shares and the int64 masked update (2x float32).
    cost = got["cost"]
    assert cost["secure_aggregation"] is True and set(cost["sites"]) == {"A", "B", "C"}
    for site in cost["sites"].values():
        assert 2 * cost["params_bytes_fp32"] < site["bytes_received"] < 2 * cost["params_bytes_fp32"] + 4096


def test_only_masked_updates_leave_the_sites_and_the_audit_log_lists_them(tmp_path: Path) -> None:
    _, grid = _run(tmp_path)
    masked = [r for _, r in grid.replies if SECURE_RECORD in r.content and "masked_params" in r.content[SECURE_RECORD]]
    assert len(masked) == 3
    for reply in masked:
        assert len(reply.content["fitres.parameters"]) == 0  # no plain weights
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in reply.content[SECURE_RECORD]["masked_params"]])
        # Plain quantised values lie in [0, quantization_range = 2**22]; masked ones are uniform on
        # [0, 2**32), so about 1 in 1000 falls there.
        assert (values > 2**22).mean() > 0.9
    for site in SITES.values():
        lines = [json.loads(x) for x in (tmp_path / site / "outgoing.jsonl").read_text().splitlines()]
        assert [x["phase"] for x in lines] == ["secagg:setup", "secagg:share_keys", "vae", "secagg:unmask"]
        assert all("arrays" not in x for x in lines)
        sent = lines[2]
        assert sent["secaggplus_configs"]["masked_params"]["items"] == 1 + len(SHAPES)
        assert set(sent["fitres.metrics"]) == {"loss"} and sent["fitres.num_examples"]["num_examples"] > 0


def test_a_site_that_drops_out_is_named_and_the_others_are_averaged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        got, _ = _run(tmp_path, failing=13, reconstruction_threshold=0.67)
    assert got["used"] == ["A", "B"]
    secure = from_array_record(got["arrays"], ("vae",))["vae"]
    expected = _fedavg([11, 12])
    assert max(float(np.abs(secure[k].double().numpy() - expected[k]).max()) for k in SHAPES) < 1e-4
    assert "site(s) ['C'] dropped out" in caplog.text and "holds NaN or Inf" in caplog.text


def test_the_server_drops_a_site_whose_reply_breaks_the_allow_list(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        got, _ = _run(tmp_path, failing=12, how="leak", reconstruction_threshold=0.67)
    assert got["used"] == ["A", "C"]
    secure = from_array_record(got["arrays"], ("vae",))["vae"]
    expected = _fedavg([11, 13])
    assert max(float(np.abs(secure[k].double().numpy() - expected[k]).max()) for k in SHAPES) < 1e-4
    assert "rejected the secure-aggregation reply of site B" in caplog.text and "'leak'" in caplog.text


def test_without_spare_shares_a_drop_out_stops_the_round_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match=r"vae round 1: secure aggregation halted .*reconstruction_threshold"):
        _run(tmp_path, failing=13)


def test_one_site_or_a_wrapping_sum_is_refused_up_front() -> None:
    kwargs: dict[str, Any] = {"on_round": lambda *a: None}
    with pytest.raises(FederationError, match=r"needs at least 2 sites in the phase"):
        SecureFedAvg("vae", {11: "A"}, {11: 1}, settings=SecAggSettings(enabled=True), **kwargs)
    with pytest.raises(FederationError, match=r"reaches SecAgg\+'s modulus 2\*\*32"):
        SecureFedAvg("vae", SITES, EXAMPLES, settings=SecAggSettings(enabled=True, quantization_range=2**31), **kwargs)


def _collect_request() -> RecordDict:
    return RecordDict({"arrays": to_array_record({"vae": _global()}), "config": ConfigRecord({"phase": "vae"}),
                       SECURE_RECORD: ConfigRecord({"stage": "collect_masked_vectors"})})


def _collect_reply(**change: Any) -> RecordDict:
    shapes = [(1,)] + [SHAPES[k.split(".", 1)[1]] for k in sorted(f"vae.{k}" for k in SHAPES)]
    from flwr.common import ndarray_to_bytes

    masked = [ndarray_to_bytes(np.zeros(s, dtype=np.int64)) for s in change.pop("shapes", shapes)]
    records: dict[str, Any] = {
        SECURE_RECORD: ConfigRecord({"masked_params": masked}),
        "fitres.metrics": ConfigRecord({"loss": 0.5}),
        "fitres.num_examples": MetricRecord({"num_examples": 3}),
        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
        "fitres.parameters": ArrayRecord(),
    }
    records.update(change)
    return RecordDict({k: v for k, v in records.items() if v is not None})


def test_allow_list_admits_the_protocol_fields_only() -> None:
    request = _collect_request()
    check_secure_reply("collect_masked_vectors", request, _collect_reply())
    refused = {
        "an extra record": _collect_reply(extra=ConfigRecord({"case": "BraTS-001"})),
        "plain weights": _collect_reply(**{"fitres.parameters": to_array_record({"vae": _global()})}),
        "a metric off the list": _collect_reply(**{"fitres.metrics": ConfigRecord({"case-BraTS-001": 1.0})}),
        "other shapes": _collect_reply(shapes=[(1,), (6,), (3, 6, 2), (6, 6)]),
        "a status message": _collect_reply(**{"fitres.status": ConfigRecord({"code": 0, "message": "BraTS-001"})}),
    }
    for why, reply in refused.items():
        with pytest.raises(SharingError):
            check_secure_reply("collect_masked_vectors", request, reply)
            pytest.fail(f"accepted {why}")
    setup = RecordDict({SECURE_RECORD: ConfigRecord({"stage": "setup"})})
    check_secure_reply("setup", setup, RecordDict({SECURE_RECORD: ConfigRecord({"pk1": b"k1", "pk2": b"k2"})}))
    with pytest.raises(SharingError, match=r"exactly the fields \['pk1', 'pk2'\]"):
        check_secure_reply("setup", setup, RecordDict({SECURE_RECORD: ConfigRecord({"pk1": b"k1", "pk2": b"k2", "note": "x"})}))
    with pytest.raises(SharingError, match=r"wrong type"):
        check_secure_reply("setup", setup, RecordDict({SECURE_RECORD: ConfigRecord({"pk1": b"k1", "pk2": "BraTS-001"})}))


@pytest.mark.slow
def test_a_simulated_run_with_secagg_averages_the_sites_and_only_masked_updates_leave(tmp_path: Path) -> None:
    from aldm_fed.checkpoints import load_checkpoint
    from aldm_fed.data.phantom import PhantomConfig, make_cohort
    from aldm_fed.data.volumes import site_manifests
    from aldm_fed.federation.simulation import simulate

    run_cfg = compose([
        "experiment=tiny", "device=cpu", "fed.phases.vae.rounds=1", "fed.phases.vae.local_steps=2",
        "fed.phases.backbone.rounds=1", "fed.phases.backbone.local_steps=2",
        "fed.phases.local.adapt=false", "fed.phases.local.synthesize=false", "fed.phases.local.evaluate=false",
        "fed.privacy.secagg.enabled=true",
        f"paths.cohort={tmp_path / 'cohort'}", f"paths.runs={tmp_path / 'runs'}",
    ])
    make_cohort(tmp_path / "cohort", PhantomConfig.from_mapping(run_cfg.phantom), seed=0, progress=False)
    status = simulate(run_cfg, progress=False)
    assert status["status"] == "done" and status["privacy"]["secagg"]["enabled"] is True
    state = tmp_path / "runs" / "federation"
    manifests = site_manifests(tmp_path / "cohort")
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["sites"], r["cost"]["secure_aggregation"]) for r in rounds] == [
        ("vae", ["A", "B"], True), ("backbone", ["A", "B"], True)]
    # The global model of each phase is the weighted mean of the two sites' own round results
    # (each site keeps its round on its disk), up to the quantisation step.
    for phase, groups in (("vae", ["vae"]), ("backbone", ["unet", "controlnet"])):
        server = load_checkpoint(tmp_path / "runs" / phase / "final").tensors
        local = {s: load_checkpoint(next((state / "sites" / s / "federation" / phase).glob("round_0001-*")) / "final",
                                    groups=groups).tensors for s in ("A", "B")}
        counts = {s: len(manifests[s][1].cases("source")) for s in ("A", "B")}
        worst = 0.0
        for group in groups:
            for key, value in server[group].items():
                mean = sum(counts[s] * local[s][group][key].double() for s in local) / sum(counts.values())
                worst = max(worst, float((value.double() - mean).abs().max()))
        step = 2 * SecAggSettings().clipping_range / SecAggSettings().quantization_range
        bound = 2 * step / (sum(counts.values()) / max(counts.values())) + 1e-6  # as in the in-process test
        assert 0 < worst <= bound, (phase, worst, bound)
    for site in ("A", "B"):
        lines = [json.loads(x) for x in (state / "sites" / site / "outgoing.jsonl").read_text().splitlines()]
        assert not any("arrays" in x for x in lines if x["phase"] in ("vae", "backbone"))
        assert sum(x["phase"] == "secagg:setup" for x in lines) == 2
