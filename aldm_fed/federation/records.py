"""Model weights <-> Flower records: parameter groups travel as one flat ArrayRecord.

A group is one network's state dict ("vae", "unet", "controlnet"); its tensors travel under
"<group>.<key>", the same names as in our checkpoints (`aldm_fed.checkpoints`).

Floating tensors travel in the run's transfer dtype (`fed.transfer_dtype`: float32, the default,
or float16 / bfloat16, which halve the bytes of a round) and come back as float32
(`from_array_record`): sites train and the server aggregates in float32 only (FedAvg refuses
bfloat16 and returns float64 for integer buffers). Integer and bool buffers travel unchanged.
float16 and float32 travel as NumPy arrays (Flower's own format); NumPy has no bfloat16, so a
bfloat16 tensor travels as its raw little-endian bytes with `stype` `BF16_STYPE`. With float32
transfer a global model installed at a site is bit-identical to the server's copy.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = [
    "BF16_STYPE",
    "TRANSFER_DTYPES",
    "array_tensor",
    "for_transfer",
    "from_array_record",
    "group_of",
    "params_nbytes",
    "to_array_record",
    "transfer_dtype",
    "update_order",
]

TRANSFER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
BF16_STYPE = "torch.bfloat16.raw"  # raw little-endian bfloat16 bytes (NumPy cannot hold them)


def group_of(key: str) -> str:
    """The group a flat key belongs to ("vae.encoder.x.weight" -> "vae")."""
    return key.split(".", 1)[0]


def transfer_dtype(cfg: Any) -> str:
    """`fed.transfer_dtype` of a composed config (absent: "float32").

    Raises:
        ValueError: not one of `TRANSFER_DTYPES`.
    """
    fed = cfg.get("fed") if hasattr(cfg, "get") else None
    value = str((fed.get("transfer_dtype") if fed is not None else None) or "float32")
    if value not in TRANSFER_DTYPES:
        raise ValueError(f"fed.transfer_dtype={value!r}: expected one of {sorted(TRANSFER_DTYPES)}")
    return value


def to_array_record(
    groups: Mapping[str, Mapping[str, torch.Tensor]], dtype: str = "float32"
) -> ArrayRecord:
    """One ArrayRecord holding every group's tensors under "<group>.<key>".

    Args:
        groups: group name -> state dict.
        dtype: the wire dtype of floating tensors (`TRANSFER_DTYPES`); integer/bool buffers
            travel unchanged.

    Raises:
        ValueError: a group name containing a dot, a non-tensor value, an unknown dtype, or a
            finite value that `dtype` cannot hold (float16 overflows beyond +-65504 to inf).
    """
    if dtype not in TRANSFER_DTYPES:
        raise ValueError(f"fed.transfer_dtype={dtype!r}: expected one of {sorted(TRANSFER_DTYPES)}")
    wire = TRANSFER_DTYPES[dtype]
    record = ArrayRecord()
    for name, state in groups.items():
        if "." in name or not name:
            raise ValueError(f"bad parameter group name {name!r}")
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name}.{key}: {type(tensor).__name__} is not a tensor")
            t = tensor.detach().to("cpu")
            if t.is_floating_point():
                cast = t.to(wire)
                if wire != torch.float32 and not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"{name}.{key}: values up to {float(t.abs().max()):.4g} overflow to inf in "
                        f"fed.transfer_dtype={dtype} (largest finite {torch.finfo(wire).max:.4g}); "
                        f"use fed.transfer_dtype=bfloat16 or float32"
                    )
                t = cast
            record[f"{name}.{key}"] = _to_array(t.contiguous())
    return record


def _to_array(t: torch.Tensor) -> Array:
    if t.dtype == torch.bfloat16:
        data = t.reshape(-1).view(torch.int16).numpy()
        if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
            data = data.byteswap()
        return Array(dtype="bfloat16", shape=tuple(t.shape), stype=BF16_STYPE, data=data.tobytes())
    return Array(t.numpy())


def array_tensor(array: Array) -> torch.Tensor:
    """One Array as a tensor in its wire dtype (bfloat16 included).

    Raises:
        ValueError: a bfloat16 array whose byte count does not match its shape.
        TypeError: a serialization Flower's `Array.numpy` does not know.
    """
    if array.stype == BF16_STYPE:
        count = math.prod(array.shape)
        if len(array.data) != 2 * count:
            raise ValueError(f"a bfloat16 array of shape {tuple(array.shape)} needs {2 * count} bytes, "
                             f"it has {len(array.data)}")
        raw = np.frombuffer(array.data, dtype="<i2").copy()
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(tuple(array.shape))
    return torch.from_numpy(array.numpy())


def from_array_record(
    record: ArrayRecord, groups: Iterable[str] | None = None, *, as_sent: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Split an ArrayRecord back into group -> state dict (floating tensors as float32).

    Args:
        record: the record (e.g. the global weights of a round).
        groups: the groups expected; None = whatever the record holds.
        as_sent: keep each tensor's wire dtype (what a signature covers) instead of float32.

    Raises:
        ValueError: a group is missing, or the record holds a group not asked for.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in record.items():
        group, _, rest = key.partition(".")
        if not rest:
            raise ValueError(f"array {key!r} has no '<group>.' prefix")
        tensor = array_tensor(array)
        out.setdefault(group, {})[rest] = tensor.float() if tensor.is_floating_point() and not as_sent else tensor
    if groups is not None:
        wanted = list(groups)
        missing = sorted(set(wanted) - set(out))
        extra = sorted(set(out) - set(wanted))
        if missing or extra:
            raise ValueError(f"parameter groups {sorted(out)} received; expected {sorted(wanted)}")
    return out


def for_transfer(arrays: ArrayRecord, dtype: str) -> tuple[ArrayRecord, ArrayRecord]:
    """The global weights as they travel in `dtype`, and as a site decodes them (float32).

    Updates are measured against the second: what the sites really trained from. At float32 both
    are `arrays` itself (no copy).
    """
    if dtype == "float32":
        return arrays, arrays
    wire = to_array_record(from_array_record(arrays), dtype)
    return wire, to_array_record(from_array_record(wire))


def update_order(record: ArrayRecord) -> list[str]:
    """The keys of `record` in the order its arrays travel as an unnamed list (a SecAgg+ vector):
    sorted, so that server and site agree whatever order a transport keeps."""
    return sorted(record)


def params_nbytes(record: ArrayRecord) -> int:
    """The shared parameters' size at float32: 4 bytes per floating value, the rest as they are."""
    total = 0
    for array in record.values():
        count = math.prod(array.shape)
        kind = "f" if array.stype == BF16_STYPE else np.dtype(array.dtype).kind
        total += 4 * count if kind == "f" else count * np.dtype(array.dtype).itemsize
    return total
