"""What may leave a site: THE allow-list, checked on every reply before it is sent.

A site's reply to the server holds at most an ArrayRecord "arrays" (parameter groups of the
shared networks), a MetricRecord "metrics" (finite scalar numbers) and a ConfigRecord "config"
(a few identifying strings in the hello phase only). Which of them, per phase:

| phase | arrays (groups) | metrics | config |
|---|---|---|---|
| hello | - | n-source, n-target, n-test | site, protocol, version, model-sha256 |
| vae | vae | num-examples, compute-seconds + training scalars | - |
| scale | - | num-examples, latent-count, latent-sum, latent-sum-sq | - |
| backbone | unet, controlnet | num-examples, compute-seconds + training scalars | - |
| local | - | adaptation, synthesis, memorisation-audit (`audit.*`) and classifier scalars | - |

Never: images, latents, masks, case ids, file paths, the site's own ControlNet, its classifier or
its discriminator. Weights travel in `fed.transfer_dtype` (float32, float16 or bfloat16; `records`):
a reply's floating arrays may be in any of these, and a float16 overflow (inf) is refused by name.
Metric names must fully match fixed names (the local phase's classifier numbers are `aldm_fed.evaluation.site.METRIC_KEY_PATTERN`, a list of fixed names too), so a name cannot
smuggle a case id or a path; values must be finite scalars (no lists). `check_reply` is applied by the ClientApp to every outgoing reply
(`allow_list_mod`) and by the server to every incoming one.

Under secure aggregation (`fed.privacy.secagg`, `secure`) a site answers Flower's four SecAgg+
stages instead of sending weights; `check_secure_reply` allows, per stage, only the protocol's
fields (`SECURE_STAGES`: its public keys, its key shares encrypted to its neighbours, its MASKED
update with exactly the shapes of the global weights it received, the shares that unmask the sum)
and, with the masked update, the phase's allow-listed metrics and example count.

`audit_mod` then appends a line per reply to the site's `outgoing.jsonl`: the phase, every metric
and string sent, and for the weights their groups, tensor count, bytes and sha256. A site's IT team
can read exactly what left, and the tests check the allow-list against that log.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from aldm_fed.evaluation.site import METRIC_KEY_PATTERN
from aldm_fed.federation.records import array_tensor, group_of, update_order
from aldm_fed.synthesis.audit import AUDIT_KEY_PATTERN

__all__ = [
    "ALLOW_LIST",
    "FITRES_RECORDS",
    "PHASES",
    "PROTOCOL",
    "SECURE_RECORD",
    "SECURE_STAGES",
    "PhaseRule",
    "SharingError",
    "allow_list_mod",
    "audit_mod",
    "check_metrics",
    "check_reply",
    "check_secure_reply",
    "describe_reply",
    "message_phase",
    "secure_stage",
    "site_reply",
]

PROTOCOL = 4  # bumped whenever the messages below change; the hello phase compares it
# 3: weights may travel as float16/bfloat16 (fed.transfer_dtype, signed as sent); compute-seconds
# 4: secure aggregation (SecAgg+ stages, masked updates)

_TRAIN_SCALARS = ("loss", "l1", "kl", "perceptual", "adv_g", "adv_d", "grad_norm", "steps")
# Seconds the site spent inside its training function in a round (the server's overhead accounting).
_ROUND_COST = "compute-seconds"
# Dtypes a weight may travel in: floating ones in a fed.transfer_dtype, buffers as they are.
_WIRE_DTYPES = frozenset({"float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"})


@dataclass(frozen=True)
class PhaseRule:
    """What a site may send in one phase.

    Args:
        groups: parameter groups allowed in the "arrays" record (all of them must be sent).
        metrics: regular expression every metric name must fully match.
        config: string fields allowed in the "config" record.
    """

    groups: tuple[str, ...] = ()
    metrics: str = r"num-examples"
    config: tuple[str, ...] = ()

    def metric_allowed(self, name: str) -> bool:
        return re.fullmatch(self.metrics, name) is not None


ALLOW_LIST: dict[str, PhaseRule] = {
    "hello": PhaseRule(metrics=r"n-(source|target|test)", config=("site", "protocol", "version", "model-sha256")),
    "vae": PhaseRule(groups=("vae",), metrics=rf"num-examples|{_ROUND_COST}|{'|'.join(_TRAIN_SCALARS)}"),
    "scale": PhaseRule(metrics=r"num-examples|latent-(count|sum|sum-sq)"),
    "backbone": PhaseRule(groups=("unet", "controlnet"),
                          metrics=rf"num-examples|{_ROUND_COST}|{'|'.join(_TRAIN_SCALARS)}"),
    "local": PhaseRule(  # the classifier's numbers: aldm_fed.evaluation.site.SiteEvaluation.metrics
        metrics=rf"adapt\.({'|'.join(_TRAIN_SCALARS)})|synthesis\.n_volumes|n_(source|target|test)_cases"
        rf"|{AUDIT_KEY_PATTERN.pattern}"  # the audit's counts and ratio statistics, never an id
        rf"|{METRIC_KEY_PATTERN.pattern}"
    ),
}
PHASES: tuple[str, ...] = tuple(ALLOW_LIST)

# Secure aggregation: Flower's SecAgg+ record in a server message and in a site's reply, and the
# fields a reply to each stage may hold (bytes, or a list of ints / of bytes). The ciphertexts are
# the site's key shares encrypted to each neighbour (the server forwards them and cannot read
# them); the masked update is uniformly random to anyone without the other sites' shares.
SECURE_RECORD = RECORD_KEY_CONFIGS
SECURE_STAGES: dict[str, dict[str, type | tuple[type, type]]] = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: bytes, Key.PUBLIC_KEY_2: bytes},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: (list, int), Key.CIPHERTEXT_LIST: (list, bytes)},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: (list, bytes)},
    Stage.UNMASK: {Key.NODE_ID_LIST: (list, int), Key.SHARE_LIST: (list, bytes)},
}
# With the masked update, Flower's legacy FitRes records: the phase's metrics, the example count
# that weighs the site, a status, and the (emptied) parameters.
FITRES_RECORDS = ("fitres.metrics", "fitres.num_examples", "fitres.status", "fitres.parameters")


class SharingError(ValueError):
    """A reply holds something the allow-list does not let leave a site."""


def check_reply(
    phase: str,
    content: RecordDict,
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Raise unless `content` is exactly what a site may send in `phase`.

    Args:
        phase: one of `PHASES`.
        content: the reply's RecordDict.
        expected: for weight phases, flat key -> shape the server sent; the reply must hold the
            same keys and shapes (checked by the server; the site passes None).

    Raises:
        SharingError: unknown phase, an unexpected record, group, key, metric name, value type,
            or a non-finite number; wrong keys or shapes against `expected`.
    """
    if phase not in ALLOW_LIST:
        raise SharingError(f"unknown phase {phase!r}; expected one of {PHASES}")
    rule = ALLOW_LIST[phase]
    allowed = {"metrics": MetricRecord}
    if rule.groups:
        allowed["arrays"] = ArrayRecord
    if rule.config:
        allowed["config"] = ConfigRecord
    for name, record in content.items():
        if name not in allowed or not isinstance(record, allowed[name]):
            raise SharingError(
                f"phase {phase}: record {name!r} ({type(record).__name__}) may not leave a site; "
                f"allowed: {sorted(allowed)}"
            )
    if "metrics" not in content:
        raise SharingError(f"phase {phase}: a reply needs its 'metrics' record")
    check_metrics(phase, content["metrics"])
    if rule.config:
        for key, value in content.get("config", ConfigRecord()).items():
            if key not in rule.config or not isinstance(value, str | int) or isinstance(value, bool):
                raise SharingError(f"phase {phase}: config field {key!r}={value!r} may not leave a site")
    if rule.groups:
        _check_arrays(phase, rule, content.get("arrays"), expected)


def check_metrics(phase: str, metrics: Mapping[str, object]) -> None:
    """Raise unless every metric of `metrics` is allow-listed for `phase` and a finite number.

    Raises:
        SharingError: a name off the allow-list or a value that is not a finite scalar.
    """
    rule = ALLOW_LIST[phase]
    for key, value in metrics.items():
        if not rule.metric_allowed(key):
            raise SharingError(f"phase {phase}: metric {key!r} is not on the allow-list")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SharingError(f"phase {phase}: metric {key!r} must be a finite number, got {value!r}")


def secure_stage(content: RecordDict) -> str | None:
    """The SecAgg+ stage a server message asks for; None for a message outside the protocol."""
    record = content.get(SECURE_RECORD)
    return str(record.get(Key.STAGE)) if isinstance(record, ConfigRecord) else None


def message_phase(content: RecordDict) -> str:
    """What a server message is about, for logs: its phase, else "secagg:<stage>", else "?"."""
    config = content.get("config")
    if isinstance(config, ConfigRecord) and "phase" in config:
        return str(config["phase"])
    stage = secure_stage(content)
    return f"secagg:{stage}" if stage is not None else "?"


def check_secure_reply(stage: str | None, request: RecordDict, reply: RecordDict) -> None:
    """Raise unless `reply` is exactly what a site may answer to the SecAgg+ `stage` of `request`.

    Args:
        stage: the request's stage, read before the request was handled (`secure_stage`: Flower's
            mod pops it from the message).
        request: the server's message (at the masking stage its phase and the global weights,
            whose shapes the masked update must have).
        reply: the site's reply as it would leave.

    Raises:
        SharingError: an unknown stage, a record or field the stage does not allow, a wrong type,
            metrics off the phase's allow-list, or a masked update of other shapes.
    """
    if stage not in SECURE_STAGES:
        raise SharingError(f"unknown secure-aggregation stage {stage!r}; expected one of {sorted(SECURE_STAGES)}")
    collect = stage == Stage.COLLECT_MASKED_VECTORS
    allowed = {SECURE_RECORD, *(FITRES_RECORDS if collect else ())}
    for name in reply:
        if name not in allowed:
            raise SharingError(f"secagg {stage}: record {name!r} may not leave a site; allowed: {sorted(allowed)}")
    fields = reply.get(SECURE_RECORD)
    if not isinstance(fields, ConfigRecord) or set(fields) != set(SECURE_STAGES[stage]):
        raise SharingError(f"secagg {stage}: the reply must hold exactly the fields {sorted(SECURE_STAGES[stage])}, "
                           f"got {sorted(fields) if isinstance(fields, ConfigRecord) else None}")
    for key, kind in SECURE_STAGES[stage].items():
        value = fields[key]
        ok = (isinstance(value, list) and all(type(v) is kind[1] for v in value)) if isinstance(kind, tuple) \
            else type(value) is kind
        if not ok:
            raise SharingError(f"secagg {stage}: field {key!r} has the wrong type ({type(value).__name__})")
    if collect:
        _check_masked_update(request, reply, fields[Key.MASKED_PARAMETERS])


def _check_masked_update(request: RecordDict, reply: RecordDict, masked: list[bytes]) -> None:
    from flwr.common import bytes_to_ndarray

    phase = str(request["config"]["phase"]) if "config" in request else "?"
    if phase not in ALLOW_LIST or not ALLOW_LIST[phase].groups:
        raise SharingError(f"secagg: phase {phase!r} has no shared weights to aggregate")
    where = f"secagg phase {phase}"
    if any(name not in reply for name in FITRES_RECORDS):
        raise SharingError(f"{where}: the masked update needs the records {list(FITRES_RECORDS)}")
    check_metrics(phase, reply["fitres.metrics"])
    count = reply["fitres.num_examples"]
    if set(count) != {"num_examples"} or isinstance(count["num_examples"], bool) \
            or not isinstance(count["num_examples"], int):
        raise SharingError(f"{where}: fitres.num_examples must hold one integer 'num_examples'")
    status = reply["fitres.status"]
    if set(status) != {"code", "message"} or status["code"] != 0 or status["message"] != "":
        raise SharingError(f"{where}: fitres.status must be code 0 with an empty message")
    if len(reply["fitres.parameters"]) != 0:
        raise SharingError(f"{where}: plain parameters may not leave a site under secure aggregation")
    arrays = request["arrays"]
    shapes = [(1,)] + [tuple(arrays[k].shape) for k in update_order(arrays)]  # the weight, then the update
    if len(masked) != len(shapes):
        raise SharingError(f"{where}: {len(masked)} masked arrays, expected {len(shapes)} (the weight + the "
                           f"global weights' {len(shapes) - 1} arrays)")
    for i, (data, shape) in enumerate(zip(masked, shapes)):
        try:
            values = bytes_to_ndarray(data)
        except Exception as exc:  # NumPy raises several types for a bad header
            raise SharingError(f"{where}: masked array {i} cannot be decoded ({exc})") from None
        if values.dtype.kind not in "iu" or tuple(values.shape) != shape:
            raise SharingError(f"{where}: masked array {i} is {values.dtype} {tuple(values.shape)}, expected "
                               f"integers of shape {shape}")


def _check_arrays(
    phase: str, rule: PhaseRule, arrays: ArrayRecord | None, expected: Mapping[str, tuple[int, ...]] | None
) -> None:
    if arrays is None:
        raise SharingError(f"phase {phase}: the reply carries no 'arrays' record")
    groups = {group_of(k) for k in arrays}
    if groups != set(rule.groups):
        raise SharingError(
            f"phase {phase}: parameter groups {sorted(groups)} sent; only {sorted(rule.groups)} may leave a site"
        )
    if expected is not None:
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        if missing or extra:
            raise SharingError(f"phase {phase}: {len(missing)} keys missing, {len(extra)} unexpected "
                               f"(e.g. {(missing or extra)[:3]})")
    for key, array in arrays.items():
        if expected is not None and tuple(array.shape) != tuple(expected[key]):
            raise SharingError(f"phase {phase}: {key} has shape {tuple(array.shape)}, expected {tuple(expected[key])}")
        try:
            values = array_tensor(array)
        except (TypeError, ValueError) as exc:
            raise SharingError(f"phase {phase}: {key} cannot be decoded ({exc})") from None
        if tuple(values.shape) != tuple(array.shape):
            raise SharingError(f"phase {phase}: {key} says shape {tuple(array.shape)} but holds {tuple(values.shape)}")
        dtype = str(values.dtype).removeprefix("torch.")
        if dtype not in _WIRE_DTYPES:
            raise SharingError(f"phase {phase}: {key} travels as {dtype}; allowed: {sorted(_WIRE_DTYPES)}")
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            why = (f" (it travels as {dtype}, fed.transfer_dtype: values beyond +-{torch.finfo(values.dtype).max:.4g} "
                   f"overflow to inf; use fed.transfer_dtype=bfloat16 or float32)" if dtype == "float16" else "")
            raise SharingError(f"phase {phase}: {key} holds NaN or Inf{why}")


def site_reply(
    phase: str,
    *,
    metrics: Mapping[str, float],
    arrays: ArrayRecord | None = None,
    config: Mapping[str, str | int] | None = None,
) -> RecordDict:
    """The content of a site's reply, checked against the allow-list before it is built.

    Args:
        phase: one of `PHASES`.
        metrics: scalar metrics (plain Python numbers).
        arrays: the parameter groups (`records.to_array_record`), for weight phases.
        config: identifying strings, for the hello phase.

    Raises:
        SharingError: anything the allow-list does not allow.
    """
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
        "metrics": MetricRecord({k: float(v) if isinstance(v, float) else v for k, v in metrics.items()})
    }
    if arrays is not None:
        records["arrays"] = arrays
    if config is not None:
        records["config"] = ConfigRecord(dict(config))
    content = RecordDict(records)
    check_reply(phase, content)
    return content


def allow_list_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: every reply of the site passes `check_reply` on its way out.

    A handler bug that put anything else into a reply fails the message here instead of sending it.
    """
    stage, phase = secure_stage(msg.content), message_phase(msg.content)  # before Flower's mod pops the stage
    reply = call_next(msg, context)
    if reply.has_content():
        if stage is not None:
            check_secure_reply(stage, msg.content, reply.content)
        else:
            check_reply(phase, reply.content)
    return reply


def describe_reply(phase: str, content: RecordDict) -> dict[str, object]:
    """What a reply carries, for the audit log: metrics and strings in full, weights and the
    secure-aggregation protocol's bytes (keys, encrypted shares, masked updates) summarised.

    Args:
        phase: the phase the reply answers (`message_phase`).
        content: the reply's RecordDict.
    """
    out: dict[str, object] = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "phase": phase}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            digest, nbytes = hashlib.sha256(), 0
            for key in sorted(record):
                data = record[key].data
                digest.update(key.encode() + b"\0" + data)
                nbytes += len(data)
            out[name] = {"groups": sorted({group_of(k) for k in record}), "tensors": len(record),
                         "bytes": nbytes, "sha256": digest.hexdigest()}
        else:
            out[name] = {k: _summary(v) for k, v in record.items()}
    return out


def _summary(value: object) -> object:
    """Bytes (or a list of bytes) as their count, size and sha256; anything else as it is."""
    items = value if isinstance(value, list) and value and all(isinstance(v, bytes) for v in value) else None
    if isinstance(value, bytes):
        items = [value]
    if items is None:
        return value
    digest = hashlib.sha256()
    for item in items:
        digest.update(len(item).to_bytes(8, "little") + item)
    return {"items": len(items), "bytes": sum(map(len, items)), "sha256": digest.hexdigest()}


def audit_mod(log_path: Callable[[Context], Path]) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """ClientApp mod: append `describe_reply` of every reply that leaves the site to a JSONL log.

    Args:
        log_path: the log file of the site a context belongs to.
    """

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        phase = message_phase(msg.content)  # before Flower's SecAgg+ mod pops the stage
        reply = call_next(msg, context)
        if reply.has_content():
            path = log_path(context)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(describe_reply(phase, reply.content)) + "\n")
        return reply

    return mod
