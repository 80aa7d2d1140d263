"""Half-precision transfer of the shared weights (`fed.transfer_dtype`) and the per-round cost.

Checks: the wire cast round trip (float16, bfloat16, buffers untouched) and its byte count; the
signature covers the weights as sent (a tampered half-precision message is refused); the
allow-list accepts half-precision replies but still refuses a wrong shape, a foreign dtype and a
float16 overflow, naming `fed.transfer_dtype`; PhaseFedAvg sends in the wire dtype, aggregates in
float32 and reports the round's cost; the traffic meter counts bytes and compute per site.
No Flower process is started (the tiny simulation's rounds.jsonl is checked in test_simulation).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from aldm_fed.federation.coordinator import _check_transfer, cost_summary
from aldm_fed.federation.records import (
    BF16_STYPE,
    from_array_record,
    params_nbytes,
    to_array_record,
    transfer_dtype,
)
from aldm_fed.federation.sharing import SharingError, check_reply
from aldm_fed.federation.signing import (
    SignatureError,
    Signer,
    Verifier,
    ensure_signing_pair,
)
from aldm_fed.federation.strategy import PhaseFedAvg, TrafficMeter

HALF = ("float16", "bfloat16")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower stamps a run and node id on every Message it builds (set in its app processes).
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def weights(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {"unet": {"w": torch.randn(64, 32, generator=g), "steps": torch.tensor([7]),
                     "flag": torch.tensor([True, False])},
            "controlnet": {"b": torch.randn(256, generator=g)}}


def over_the_wire(content: RecordDict) -> RecordDict:
    """What the other end receives: Flower's protobuf serialisation and back."""
    proto = ProtoRecordDict()
    proto.ParseFromString(recorddict_to_proto(content).SerializeToString())
    return recorddict_from_proto(proto)


def reply(arrays: ArrayRecord, **metrics: float) -> RecordDict:
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1, **metrics})})


# ------------------------------------------------------------------------------ the cast


@pytest.mark.parametrize("dtype", HALF)
def test_cast_round_trip_is_the_rounded_float32_and_buffers_are_untouched(dtype: str) -> None:
    groups = weights()
    record = over_the_wire(RecordDict({"arrays": to_array_record(groups, dtype)}))["arrays"]
    back = from_array_record(record)
    wire = getattr(torch, dtype)
    for name, state in groups.items():
        for key, tensor in state.items():
            got = back[name][key]
            if tensor.is_floating_point():
                assert got.dtype == torch.float32
                assert torch.equal(got, tensor.to(wire).float())  # exactly the rounded value
                assert not torch.equal(got, tensor)  # and it was rounded
            else:
                assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    sent = from_array_record(record, as_sent=True)
    assert sent["unet"]["w"].dtype == wire and sent["unet"]["steps"].dtype == torch.int64


def test_float32_transfer_is_bit_identical() -> None:
    groups = weights()
    back = from_array_record(to_array_record(groups))
    assert all(torch.equal(back[n][k], t) for n, s in groups.items() for k, t in s.items())


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_halves_the_bytes(dtype: str) -> None:
    groups = weights()
    full, half = to_array_record(groups), to_array_record(groups, dtype)
    floats = sum(t.numel() for s in groups.values() for t in s.values() if t.is_floating_point())
    assert params_nbytes(full) == params_nbytes(half) == 4 * floats + 8 + 2  # + the int64 and bool buffers
    ratio = half.count_bytes() / full.count_bytes()
    assert 0.5 <= ratio < 0.6, ratio  # NumPy headers and key names do not halve
    if dtype == "bfloat16":
        assert half["unet.w"].stype == BF16_STYPE and len(half["unet.w"].data) == 2 * 64 * 32


def test_unknown_transfer_dtype_is_refused_by_option_name() -> None:
    with pytest.raises(ValueError, match=r"fed.transfer_dtype='float8'"):
        to_array_record(weights(), "float8")
    with pytest.raises(ValueError, match=r"fed.transfer_dtype='int8'"):
        transfer_dtype(OmegaConf.create({"fed": {"transfer_dtype": "int8"}}))
    assert transfer_dtype(OmegaConf.create({"fed": {}})) == "float32"


def test_float16_overflow_is_refused_naming_the_option() -> None:
    big = {"vae": {"w": torch.tensor([1.0, 7.0e4])}}
    with pytest.raises(ValueError, match=r"vae.w: values up to 7e\+04 overflow to inf in fed.transfer_dtype=float16"):
        to_array_record(big, "float16")
    assert from_array_record(to_array_record(big, "bfloat16"))["vae"]["w"][1] == pytest.approx(7.0e4, rel=1e-2)


# ------------------------------------------------------------------------------ signatures


@pytest.fixture
def keys(tmp_path) -> tuple[Signer, Verifier]:
    key, pub = ensure_signing_pair(tmp_path / "server")
    return Signer.from_file(key), Verifier.from_file(pub)


def signed(signer: Signer, arrays: ArrayRecord) -> RecordDict:
    config = ConfigRecord({"phase": "backbone", "round": 1, "local-steps": 5})
    return RecordDict({"arrays": arrays, "config": signer.sign(arrays, config)})


@pytest.mark.parametrize("dtype", HALF)
def test_signed_half_precision_message_verifies_and_a_tampered_one_is_refused(keys, dtype: str) -> None:
    signer, verifier = keys
    content = over_the_wire(signed(signer, to_array_record(weights(), dtype)))
    got = verifier.verify(content, ("unet", "controlnet"))
    assert got["unet"]["w"].dtype == torch.float32  # sites train in float32
    assert torch.equal(got["unet"]["w"], weights()["unet"]["w"].to(getattr(torch, dtype)).float())

    arrays = ArrayRecord(dict(content["arrays"].items()))
    a = arrays["controlnet.b"]
    data = bytearray(a.data)
    data[-1] ^= 0x01  # one bit of one half-precision value
    arrays["controlnet.b"] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(data))
    with pytest.raises(SignatureError, match="altered on the way"):
        verifier.verify(RecordDict({"arrays": arrays, "config": content["config"]}), ("unet", "controlnet"))


def test_the_signature_covers_the_wire_dtype(keys) -> None:
    # The float32 record of the same (half-representable) values is another message.
    signer, verifier = keys
    half = to_array_record(weights(), "float16")
    as_float32 = to_array_record(from_array_record(half))
    content = signed(signer, half)
    with pytest.raises(SignatureError, match="altered on the way"):
        verifier.verify(RecordDict({"arrays": as_float32, "config": content["config"]}), ("unet", "controlnet"))


# ------------------------------------------------------------------------------ allow-list


@pytest.mark.parametrize("dtype", ["float32", *HALF])
def test_allow_list_accepts_each_transfer_dtype_and_refuses_a_wrong_shape(dtype: str) -> None:
    groups = {"vae": weights()["unet"]}
    expected = {k: tuple(a.shape) for k, a in to_array_record(groups).items()}
    check_reply("vae", reply(to_array_record(groups, dtype), **{"compute-seconds": 1.5}), expected)
    wrong = {"vae": {**groups["vae"], "w": torch.zeros(64, 31)}}
    with pytest.raises(SharingError, match=r"vae.w has shape \(64, 31\), expected \(64, 32\)"):
        check_reply("vae", reply(to_array_record(wrong, dtype)), expected)


def test_allow_list_refuses_float16_inf_naming_the_option_and_float64() -> None:
    inf = ArrayRecord({"vae.w": Array(np.array([1.0, np.inf], dtype=np.float16))})
    with pytest.raises(SharingError, match=r"vae.w holds NaN or Inf \(it travels as float16, fed.transfer_dtype"):
        check_reply("vae", reply(inf))
    double = ArrayRecord({"vae.w": Array(np.zeros(2, dtype=np.float64))})
    with pytest.raises(SharingError, match="vae.w travels as float64"):
        check_reply("vae", reply(double))
    lying = ArrayRecord({"vae.w": Array(dtype="bfloat16", shape=(3,), stype=BF16_STYPE, data=b"\0" * 4)})
    with pytest.raises(SharingError, match="vae.w cannot be decoded"):
        check_reply("vae", reply(lying))
    with pytest.raises(SharingError, match="'compute-seconds' is not on the allow-list"):
        check_reply("scale", RecordDict({"metrics": MetricRecord({"compute-seconds": 1.0})}))


# ------------------------------------------------------------------------------ server rounds


class FakeGrid:
    """Answers each site with its own weights in the wire dtype, claiming <node id> seconds of compute."""

    def __init__(self, site_weights: dict[int, dict[str, dict[str, torch.Tensor]]], dtype: str) -> None:
        self.site_weights, self.dtype, self.received = site_weights, dtype, []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"  # the grid stamps every message it sends
            self.received.append(over_the_wire(msg.content))
            out.append(Message(reply(to_array_record(self.site_weights[msg.metadata.dst_node_id], self.dtype),
                                     **{"compute-seconds": float(msg.metadata.dst_node_id)}), reply_to=msg))
        return out


@pytest.mark.parametrize("dtype", HALF)
def test_phase_sends_half_precision_aggregates_in_float32_and_reports_the_cost(dtype: str) -> None:
    start = {"unet": weights(0)["unet"], "controlnet": weights(0)["controlnet"]}
    sites = {1: weights(1), 2: weights(2)}
    grid = FakeGrid(sites, dtype)
    meter = TrafficMeter(grid)  # type: ignore[arg-type]
    rounds: list[Any] = []
    initial = to_array_record(start)
    strategy = PhaseFedAvg("backbone", {1: "A", 2: "B"}, expected={k: tuple(a.shape) for k, a in initial.items()},
                           on_round=lambda *a: rounds.append(a), transfer_dtype=dtype, meter=meter)
    replies = meter.send_and_receive(strategy.configure_train(1, initial, ConfigRecord({}), meter))  # type: ignore[arg-type]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # sent in the wire dtype
    assert {a.dtype for k, a in grid.received[0]["arrays"].items() if k != "unet.steps" and k != "unet.flag"} == {dtype}
    # aggregated in float32: the mean of the sites' rounded weights
    got = from_array_record(arrays)
    assert arrays["unet.w"].dtype == "float32"
    wire = getattr(torch, dtype)
    mean = (sites[1]["unet"]["w"].to(wire).float() + sites[2]["unet"]["w"].to(wire).float()) / 2
    assert torch.allclose(got["unet"]["w"], mean, atol=1e-6)
    assert "compute-seconds" not in metrics  # per site in the cost, not averaged
    cost = strategy.round_cost()
    assert cost["transfer_dtype"] == dtype and cost["max_compute_s"] == 2.0
    assert cost["params_bytes_fp32"] == params_nbytes(initial)
    for site in ("A", "B"):
        s = cost["sites"][site]
        assert s["bytes_sent"] == s["bytes_received"] == to_array_record(start, dtype).count_bytes()
        assert s["bytes_sent"] / initial.count_bytes() < 0.6
    assert cost["sites"]["A"]["compute_s"] == 1.0
    assert cost["overhead_s"] == pytest.approx(cost["wall_s"] - 2.0, abs=1e-3)


def test_cost_summary_means_per_phase() -> None:
    def line(phase: str, wall: float, sent: int) -> dict[str, Any]:
        return {"phase": phase, "cost": {"wall_s": wall, "max_compute_s": wall / 2, "overhead_s": wall / 2,
                                         "overhead_fraction": 0.5, "transfer_dtype": "float16",
                                         "params_bytes_fp32": 400,
                                         "sites": {"A": {"bytes_sent": sent, "bytes_received": sent}}}}

    summary = cost_summary([line("vae", 2.0, 200), line("vae", 4.0, 220), {"phase": "vae"}, line("backbone", 1.0, 50)])
    assert summary["vae"]["rounds"] == 2 and summary["vae"]["wall_s"] == 3.0
    assert summary["vae"]["bytes_sent_per_site"] == 210 and summary["backbone"]["overhead_fraction"] == 0.5


def test_bfloat16_with_central_dp_is_refused_before_any_site_is_waited_for() -> None:
    from aldm_fed.config import compose

    cfg = compose(["experiment=tiny", "fed.transfer_dtype=bfloat16", "fed.privacy.dp.enabled=true"])
    with pytest.raises(ValueError, match="fed.transfer_dtype=bfloat16 cannot be combined with fed.privacy.dp"):
        _check_transfer(cfg)
    _check_transfer(compose(["experiment=tiny", "fed.transfer_dtype=float16", "fed.privacy.dp.enabled=true"]))
