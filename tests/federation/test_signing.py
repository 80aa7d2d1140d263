"""Signed global models: the server signs every message carrying global weights (Ed25519), a site
verifies it before loading anything, and refuses unsigned, foreign-key and altered messages.

Tiny tensors only; the site's handler runs for real (Flower's ClientApp with our mods), the site
functions behind it are stubs that record what they were given.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import parse_config_args
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from aldm_fed import cli
from aldm_fed.checkpoints import PickleCheckpointError, save_checkpoint
from aldm_fed.federation import apps
from aldm_fed.federation import site as site_fn
from aldm_fed.federation.global_models import install_global
from aldm_fed.federation.launch import run_client
from aldm_fed.federation.records import to_array_record
from aldm_fed.federation.security import make_certificates, public_key_fingerprint
from aldm_fed.federation.signing import (
    SIGNATURE_FIELD,
    SignatureError,
    Signer,
    Verifier,
    ensure_signing_pair,
    install_signing_pair,
    open_global,
    sign_content,
    signed_payload,
    signing_paths,
)
from aldm_fed.federation.strategy import PhaseFedAvg
from aldm_fed.training.artifacts import RunLayout

GROUPS = ("unet", "controlnet")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower stamps a run and node id on every Message it builds (set in its app processes).
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signer, Verifier]:
    key, pub = ensure_signing_pair(tmp_path / "server")
    return Signer.from_file(key), Verifier.from_file(pub)


def weights() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {"unet": {"w": torch.randn(3, 2, generator=g), "steps": torch.tensor([7])},
            "controlnet": {"b": torch.randn(4, generator=g)}}


def backbone_message(rnd: int = 2, scale: float = 0.8125) -> RecordDict:
    config = {"phase": "backbone", "round": rnd, "local-steps": 5, "scale-factor": scale,
              "scale-sha256": "ab" * 32, "meta": json.dumps({"scale_factor": scale, "stage": "backbone"})}
    return RecordDict({"arrays": to_array_record(weights()), "config": ConfigRecord(config)})


def over_the_wire(content: RecordDict) -> RecordDict:
    """What the site receives: the content serialised to Flower's protobuf and parsed back."""
    data = recorddict_to_proto(content).SerializeToString()
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def with_config(content: RecordDict, **changes: Any) -> RecordDict:
    return RecordDict({"arrays": content["arrays"], "config": ConfigRecord({**dict(content["config"]), **changes})})


def flip_weight_byte(content: RecordDict, key: str = "controlnet.b") -> RecordDict:
    arrays = ArrayRecord({k: v for k, v in content["arrays"].items()})
    a = arrays[key]
    data = bytearray(a.data)
    data[-1] ^= 0x01  # one bit of the last element's bytes
    arrays[key] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(data))
    return RecordDict({"arrays": arrays, "config": content["config"]})


# ------------------------------------------------------------------------ sign and verify


def test_round_trip_returns_the_signed_weights(keys):
    signer, verifier = keys
    received = over_the_wire(sign_content(signer, backbone_message()))
    got = verifier.verify(received, GROUPS)
    for group, state in weights().items():
        for key, tensor in state.items():
            assert torch.equal(got[group][key], tensor.float() if tensor.is_floating_point() else tensor)
    assert received["config"]["signature-key"] == verifier.fingerprint
    # The fingerprint is the one `aldm-fed certs` prints for signing.pub.
    assert verifier.fingerprint == public_key_fingerprint(verifier.path)


def test_one_flipped_weight_byte_is_refused(keys):
    signer, verifier = keys
    signed = sign_content(signer, backbone_message(rnd=3))
    tampered = over_the_wire(flip_weight_byte(signed))
    refused = r"\[backbone round 3\] refused the global weights: they hash to .* altered"
    with pytest.raises(SignatureError, match=refused):
        verifier.verify(tampered, GROUPS)
    verifier.verify(over_the_wire(signed), GROUPS)  # the untouched message still passes


def test_one_flipped_signature_byte_is_refused(keys):
    signer, verifier = keys
    signed = sign_content(signer, backbone_message())
    sig = bytearray.fromhex(signed["config"][SIGNATURE_FIELD])
    sig[10] ^= 0x80
    with pytest.raises(SignatureError, match=r"\[backbone round 2\].*signature does not verify"):
        verifier.verify(over_the_wire(with_config(signed, signature=sig.hex())), GROUPS)
    with pytest.raises(SignatureError, match="signature does not verify"):
        verifier.verify(with_config(signed, signature="not hex"), GROUPS)


@pytest.mark.parametrize("change", [
    {"scale-factor": math.nextafter(0.8125, 1.0)},   # the scale factor, by one ulp
    {"meta": json.dumps({"scale_factor": 0.9, "stage": "backbone"})},  # the metadata the site installs
    {"round": 4},                                     # replayed as another round
    {"phase": "vae"},
    {"local-steps": 5.0},                             # same number, another type
    {"extra": "added"},
])
def test_any_changed_setting_is_refused(keys, change):
    signer, verifier = keys
    signed = sign_content(signer, backbone_message())
    with pytest.raises(SignatureError, match="signature does not verify"):
        verifier.verify(over_the_wire(with_config(signed, **change)), GROUPS)


def test_unsigned_and_foreign_keys_are_refused(tmp_path, keys):
    _, verifier = keys
    unsigned = r"\[backbone round 2\] refused the global weights: the message is unsigned"
    with pytest.raises(SignatureError, match=unsigned):
        verifier.verify(over_the_wire(backbone_message()), GROUPS)
    other = Signer.from_file(ensure_signing_pair(tmp_path / "other")[0])
    unknown = f"signed by an unknown key {re.escape(other.fingerprint)}.*trusts {re.escape(verifier.fingerprint)}"
    with pytest.raises(SignatureError, match=unknown):
        verifier.verify(sign_content(other, backbone_message()), GROUPS)
    # Another key that claims to be the trusted one is caught by the signature itself.
    forged = sign_content(other, backbone_message())
    forged = with_config(forged, **{"signature-key": verifier.fingerprint})
    with pytest.raises(SignatureError, match="signature does not verify"):
        verifier.verify(forged, GROUPS)


def test_payload_is_canonical_and_typed():
    assert signed_payload({"a": 1, "b": "x"}) == signed_payload({"b": "x", "a": 1, SIGNATURE_FIELD: "ignored"})
    assert len({signed_payload({"a": v}) for v in (1, 1.0, True, "1", b"\x01", [1])}) == 6


# ------------------------------------------------------------------------------- the server


def test_every_fedavg_round_message_is_signed(keys):
    signer, verifier = keys
    strategy = PhaseFedAvg("backbone", {11: "A", 12: "B"}, expected={}, on_round=lambda *a: None,
                           round_offset=4, signer=signer)
    messages = list(strategy.configure_train(1, to_array_record(weights()), ConfigRecord({"local-steps": 5}), None))
    assert [m.metadata.dst_node_id for m in messages] == [11, 12]
    for msg in messages:
        assert msg.content["config"]["round"] == 5
        verifier.verify(over_the_wire(msg.content), GROUPS)
    unsigned = PhaseFedAvg("backbone", {11: "A"}, expected={}, on_round=lambda *a: None)
    msg = next(iter(unsigned.configure_train(1, to_array_record(weights()), ConfigRecord({}), None)))
    with pytest.raises(SignatureError, match="unsigned"):
        verifier.verify(msg.content, GROUPS)


def test_key_pairs_on_disk(tmp_path):
    key, pub = ensure_signing_pair(tmp_path / "state")
    assert (key, pub) == signing_paths(tmp_path / "state")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    first = Verifier.from_file(pub).fingerprint
    assert Verifier.from_file(ensure_signing_pair(tmp_path / "state")[1]).fingerprint == first  # kept
    # The pair of `aldm-fed certs` is what a deployed server installs and signs with.
    certs = make_certificates(tmp_path / "certs", ["A"])
    key, pub = install_signing_pair(certs.signing_key, certs.signing_pub, tmp_path / "server")
    assert Signer.from_file(key).fingerprint == public_key_fingerprint(certs.signing_pub)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with pytest.raises(ValueError, match="not one key pair"):
        install_signing_pair(certs.signing_key, tmp_path / "state" / "signing" / "signing.pub", tmp_path / "x")
    with pytest.raises(ValueError, match="Ed25519"):
        Verifier.from_file(certs.site_keys["A"].public)  # a P-384 SuperNode key
    with pytest.raises(FileNotFoundError, match="signing.pub"):
        Verifier.from_file(tmp_path / "missing.pub")


# --------------------------------------------------------------------------------- the site


@pytest.fixture
def stub_sites(monkeypatch) -> list[tuple[str, Any]]:
    """The site functions, recording the weights they got instead of training."""
    calls: list[tuple[str, Any]] = []

    def record(phase: str):
        def fn(cfg, site, groups, *args, **kwargs):
            calls.append((phase, groups))
            arrays = to_array_record(groups) if phase == "backbone" else None
            return site_fn.site_reply(phase, metrics={"num-examples": 1}, arrays=arrays)
        return fn

    monkeypatch.setattr(site_fn, "backbone_round", record("backbone"))
    monkeypatch.setattr(site_fn, "scale_statistics", record("scale"))
    return calls


def deployed_context(tmp_path: Path, **node: str) -> Context:
    config = {"site": "A", "data-path": str(tmp_path / "data"), "state-path": str(tmp_path / "siteA"), **node}
    return Context(run_id=1, node_id=11, node_config=config, state=RecordDict(), run_config={})


def deliver(content: RecordDict, context: Context) -> Message:
    """Run the site's real ClientApp (allow-list and audit mods included) on one message."""
    cfg = OmegaConf.create({"device": {"num_threads": 1}, "fed": {"state": "/nonexistent"}})
    msg = Message(content=over_the_wire(content), dst_node_id=11, message_type=MessageType.TRAIN)
    return apps.client_app(cfg)(msg, context)


def test_site_refuses_a_tampered_message_before_touching_its_disk(tmp_path, keys, stub_sites):
    signer, verifier = keys
    context = deployed_context(tmp_path, **{"signing-pub": str(verifier.path)})
    signed = sign_content(signer, backbone_message())
    for bad in (flip_weight_byte(signed), with_config(signed, **{"scale-factor": 0.5}), backbone_message()):
        with pytest.raises(SignatureError, match=r"\[backbone round 2\] refused"):
            deliver(bad, context)
    scale = sign_content(signer, RecordDict({"arrays": to_array_record({"vae": {"w": torch.ones(2)}}),
                                             "config": ConfigRecord({"phase": "scale", "meta": "{}"})}))
    with pytest.raises(SignatureError, match=r"\[scale\] refused .*signature does not verify"):
        deliver(with_config(scale, meta='{"scale_factor": 2.0}'), context)
    assert stub_sites == []  # no site function ran
    assert not (tmp_path / "siteA").exists()  # nothing written, not even the audit log
    reply = deliver(signed, context)  # the genuine message goes through, with exactly its weights
    assert reply.has_content() and [phase for phase, _ in stub_sites] == ["backbone"]
    assert torch.equal(stub_sites[0][1]["controlnet"]["b"], weights()["controlnet"]["b"])
    assert (tmp_path / "siteA" / apps.OUTGOING_LOG).is_file()


def test_site_keys_come_from_its_node_config_or_the_simulation(tmp_path, keys, caplog):
    _, verifier = keys
    cfg = OmegaConf.create({"fed": {"state": str(tmp_path / "server")}, "paths": {"cohort": "c"}})
    deployed = deployed_context(tmp_path, **{"signing-pub": str(verifier.path)})
    assert apps.verifier_of(cfg, deployed).fingerprint == verifier.fingerprint
    # A deployed site never takes its key from the server's run config (fed.state is the server's).
    assert apps.verifier_of(cfg, deployed_context(tmp_path)) is None
    simulated = Context(run_id=1, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert apps.verifier_of(cfg, simulated).fingerprint == verifier.fingerprint
    cfg.fed.state = str(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="signing.pub"):
        apps.verifier_of(cfg, simulated)
    # Without a key (an --insecure site) the weights load, and the log says they were not verified.
    with caplog.at_level(logging.WARNING, logger="aldm_fed.federation.signing"):
        got = open_global(backbone_message(), None, GROUPS, site="A")
    assert torch.equal(got["unet"]["w"], weights()["unet"]["w"])
    assert "UNVERIFIED: site A loads the global weights of backbone round 2" in caplog.text


class _Boom:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_the_sites_model_folder_is_refused_not_run(tmp_path):
    layout = RunLayout(tmp_path / "siteA")
    groups = {"vae": {"w": torch.ones(2)}}
    path = save_checkpoint(layout.final("vae"), groups, {"stage": "vae"})
    meta = json.loads((path / "meta.json").read_text())
    marker = tmp_path / "code-ran"
    (path / "tensors.safetensors").write_bytes(pickle.dumps(_Boom(marker), protocol=4))
    with pytest.raises(PickleCheckpointError, match="refusing to load .*pickle"):
        install_global(layout, "vae", groups, meta)
    assert not marker.exists()


# ---------------------------------------------------------------------------- the launcher


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_tls_client_needs_the_signing_key(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "manifests").mkdir(parents=True)
    (data / "manifests" / "A.json").write_text("{}")
    ca, key = tmp_path / "ca.crt", tmp_path / "A.key"
    ca.write_text("x")
    key.write_text("x")
    with pytest.raises(ValueError, match="signing.pub"):
        run_client(site="A", data=data, server="127.0.0.1:1", state=tmp_path / "s", ca_cert=ca, private_key=key)
    args = ["client", "--site", "A", "--data", str(data)]
    assert "--signing-pub FILE" in cli_error(capsys, *args, "--ca", str(ca), "--key", str(key))
    (tmp_path / "sites").mkdir()  # a certificates folder without signing.pub
    (tmp_path / "sites" / "A.key").write_text("x")
    assert "no signing.pub" in cli_error(capsys, *args, "--certs", str(tmp_path))
    assert "not an OpenSSH public key" in cli_error(capsys, *args, "--ca", str(ca), "--key", str(key),
                                                     "--signing-pub", str(ca))


def test_supernode_passes_the_signing_key_in_its_node_config(tmp_path, monkeypatch, keys):
    from aldm_fed.federation import supernode

    seen: list[list[str]] = []
    monkeypatch.setattr(supernode, "binary", lambda name, env: name)
    monkeypatch.setattr(supernode, "popen", lambda command, env, log: seen.append(command) or None)
    (tmp_path / "ca.crt").write_text("x")
    supernode.start_supernode("h:1", site="A", data_path=tmp_path, state_path=tmp_path / "s",
                              ca_cert=tmp_path / "ca.crt", signing_pub=keys[1].path, port=5)
    node_config = seen[0][seen[0].index("--node-config") + 1]
    assert parse_config_args([node_config])["signing-pub"] == str(keys[1].path.resolve())
