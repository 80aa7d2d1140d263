"""Model weights <-> Flower records: parameter groups travel as one flat ArrayRecord.

A group is one network's state dict ("vae", "unet", "controlnet"); its tensors travel under
"<group>.<key>", the same names as in our checkpoints (`aldm_fed.checkpoints`). Floating tensors
travel as float32 (FedAvg refuses bfloat16 and returns float64 for integer buffers), and come
back as float32, so a global model installed at a site is bit-identical to the server's copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord

__all__ = ["from_array_record", "group_of", "to_array_record"]


def group_of(key: str) -> str:
    """The group a flat key belongs to ("vae.encoder.x.weight" -> "vae")."""
    return key.split(".", 1)[0]


def to_array_record(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> ArrayRecord:
    """One ArrayRecord holding every group's tensors under "<group>.<key>".

    Args:
        groups: group name -> state dict.

    Raises:
        ValueError: a group name containing a dot, or a non-tensor value.
    """
    flat: dict[str, torch.Tensor] = {}
    for name, state in groups.items():
        if "." in name or not name:
            raise ValueError(f"bad parameter group name {name!r}")
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name}.{key}: {type(tensor).__name__} is not a tensor")
            t = tensor.detach().to("cpu")
            flat[f"{name}.{key}"] = (t.float() if t.is_floating_point() else t).contiguous()
    return ArrayRecord(torch_state_dict=flat)


def from_array_record(
    record: ArrayRecord, groups: Iterable[str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Split an ArrayRecord back into group -> state dict (floating tensors as float32).

    Args:
        record: the record (e.g. the global weights of a round).
        groups: the groups expected; None = whatever the record holds.

    Raises:
        ValueError: a group is missing, or the record holds a group not asked for.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in record.to_torch_state_dict().items():
        group, _, rest = key.partition(".")
        if not rest:
            raise ValueError(f"array {key!r} has no '<group>.' prefix")
        out.setdefault(group, {})[rest] = tensor.float() if tensor.is_floating_point() else tensor
    if groups is not None:
        wanted = list(groups)
        missing = sorted(set(wanted) - set(out))
        extra = sorted(set(out) - set(wanted))
        if missing or extra:
            raise ValueError(f"parameter groups {sorted(out)} received; expected {sorted(wanted)}")
    return out
