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

from aldm_fed.evaluation.site import METRIC_KEY_PATTERN
from aldm_fed.federation.records import array_tensor, group_of
from aldm_fed.synthesis.audit import AUDIT_KEY_PATTERN

__all__ = [
    "ALLOW_LIST",
    "PHASES",
    "PROTOCOL",
    "PhaseRule",
    "SharingError",
    "allow_list_mod",
    "audit_mod",
    "describe_reply",
    "check_reply",
    "site_reply",
]

PROTOCOL = 3  # bumped whenever the messages below change; the hello phase compares it
# 3: weights may travel as float16/bfloat16 (fed.transfer_dtype, signed as sent); compute-seconds

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
    for key, value in content["metrics"].items():
        if not rule.metric_allowed(key):
            raise SharingError(f"phase {phase}: metric {key!r} is not on the allow-list")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SharingError(f"phase {phase}: metric {key!r} must be a finite number, got {value!r}")
    if rule.config:
        for key, value in content.get("config", ConfigRecord()).items():
            if key not in rule.config or not isinstance(value, str | int) or isinstance(value, bool):
                raise SharingError(f"phase {phase}: config field {key!r}={value!r} may not leave a site")
    if rule.groups:
        _check_arrays(phase, rule, content.get("arrays"), expected)


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
    reply = call_next(msg, context)
    if reply.has_content():
        phase = str(msg.content["config"]["phase"]) if "config" in msg.content else "?"
        check_reply(phase, reply.content)
    return reply


def describe_reply(phase: str, content: RecordDict) -> dict[str, object]:
    """What a reply carries, for the audit log: metrics and strings in full, weights summarised.

    Args:
        phase: the phase the reply answers.
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
            out[name] = {k: v for k, v in record.items()}
    return out


def audit_mod(log_path: Callable[[Context], Path]) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """ClientApp mod: append `describe_reply` of every reply that leaves the site to a JSONL log.

    Args:
        log_path: the log file of the site a context belongs to.
    """

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        if reply.has_content():
            phase = str(msg.content["config"]["phase"]) if "config" in msg.content else "?"
            path = log_path(context)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(describe_reply(phase, reply.content)) + "\n")
        return reply

    return mod
